"""Spiking LMUFormer: the public checkpoint layout, the neuron against spikingjelly's equations, and the streaming
step against the reference (identical spikes in fp32 eager, flush included)."""
from __future__ import annotations

import pytest
import torch

from edgekit.errors import CheckpointError
from edgekit.models import build
from edgekit.models.slmuformer import LIF, SLMUFormer, lif_step

@pytest.fixture(scope="module")
def tiny() -> SLMUFormer:
    return build("slmuformer", "tiny", seed=1).emit_spikes()


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def test_scv2_has_the_public_parameter_count_and_keys():
    model = build("slmuformer", "scv2")
    assert sum(p.numel() for p in model.parameters()) == 1_689_894
    embed = [k for n in ("", "1", "2", "3")
             for k in (f"patch_embed.proj_conv{n}.weight", *_bn(f"patch_embed.proj_bn{n}"))]
    attn, mlp = "block.0.attn", "block.0.mlp"
    expected = {*embed, "patch_embed.rpe_conv.weight", *_bn(f"{attn}.prev_bn"),
                *[f"{attn}.lmu.{k}" for k in ("A", "B", "H", "fft_H", "W_u.weight", "W_u.bias", "W_h.weight",
                                              "W_h.bias")],
                *_bn(f"{attn}.lmu.bn_u"), *_bn(f"{attn}.lmu.bn_m"), *_bn(f"{attn}.lmu.bn_h"),
                f"{attn}.proj_conv.weight", f"{attn}.proj_conv.bias", *_bn(f"{attn}.proj_bn"),
                *_bn(f"{mlp}.fc1_bn"), f"{mlp}.fc1_conv.weight", f"{mlp}.fc1_conv.bias",
                *_bn(f"{mlp}.fc2_bn"), f"{mlp}.fc2_conv.weight", f"{mlp}.fc2_conv.bias",
                *_bn("head_bn"), "head.weight", "head.bias"}
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd[f"{attn}.lmu.W_h.weight"].shape == (256, 768) and sd[f"{attn}.lmu.fft_H"].shape == (512, 129)
    assert sd[f"{attn}.lmu.bn_u.weight"].shape == (1,) and model.delay == 5


@pytest.mark.parametrize("prefix", ["", "module."])
def test_checkpoint_loads_with_or_without_dataparallel_prefix(tmp_path, tiny, prefix):
    path = tmp_path / "slmu.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in tiny.state_dict().items()}}, path)
    loaded = build("slmuformer", checkpoint=path)
    assert loaded.config() == tiny.config()
    x = torch.randn(1, 9, tiny.input_size)
    with torch.no_grad():
        assert torch.equal(loaded(x)["logits"], tiny(x)["logits"])


def test_a_non_spiking_lmuformer_checkpoint_is_refused(tmp_path):
    path = tmp_path / "lmu.pth"
    torch.save(build("lmuformer", "tiny").state_dict(), path)
    with pytest.raises(CheckpointError, match="spiking LMUFormer"):
        build("slmuformer", checkpoint=path)


def _spikingjelly(x: torch.Tensor, threshold: float, tau: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiStepLIFNode(decay_input=True, v_reset=0) as written: H = V + (X - V)/tau, S = H >= th, V = H (1 - S)."""
    v, spikes, membranes = torch.zeros_like(x[:, 0]), [], []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / tau
        s = (h >= threshold).float()
        v = h * (1 - s)
        spikes.append(s)
        membranes.append(v)
    return torch.stack(spikes, 1), torch.stack(membranes, 1)


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_snntorch_neuron_and_step_equal_spikingjelly_equations(threshold):
    th = threshold
    # H lands exactly on the threshold at frames 0 (V = 0) and 2 (V = th/2), just below it at frame 3
    edge = torch.tensor([2 * th, th, 1.5 * th, torch.nextafter(torch.tensor(2 * th), torch.tensor(0.0)).item()])
    x = torch.cat([torch.randn(15, 300, 8, generator=torch.Generator().manual_seed(0)) * 1.5,
                   torch.nn.functional.pad(edge.view(1, 4, 1).expand(1, 4, 8), (0, 0, 0, 296))])
    want_s, want_v = _spikingjelly(x, th)
    assert want_s[-1, :4, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    lif = LIF(8, threshold=th)
    got_s, got_v = lif(x)
    assert torch.equal(got_s, want_s) and torch.equal(got_v, want_v)
    v, steps = torch.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        s, v = lif_step(x[:, t], v, th)
        steps.append(s)
    assert torch.equal(torch.stack(steps, 1), want_s)
    assert not list(lif.parameters()) and not lif.state_dict()


def _public_forward(model: SLMUFormer, x: torch.Tensor) -> torch.Tensor:
    """The public slmu_rnn_ms_conv1d forward, written after its layer order with plain module calls on [B, C, N]:
    the utterance's logits (head per frame, then the mean over frames)."""
    def lif(a: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:  # a [B, C, N], time along N
        return _spikingjelly(a.transpose(1, 2), threshold)[0].transpose(1, 2)

    p = model.patch_embed
    h = lif(p.proj_bn(p.proj_conv(x.transpose(1, 2))))
    h = lif(p.proj_bn1(p.proj_conv1(h)))
    h = p.proj_conv3(lif(p.proj_bn2(p.proj_conv2(h))))
    h = h + p.rpe_conv(lif(p.proj_bn3(h)))
    for blk in model.block:
        attn, cell, mlp = blk.attn, blk.attn.lmu, blk.mlp
        xs = lif(attn.prev_bn(h), 0.5).transpose(1, 2)
        u = lif(cell.bn_u(cell.W_u(xs).transpose(1, 2))).transpose(1, 2)
        m = lif(cell.bn_m(cell.memory(u).transpose(1, 2))).transpose(1, 2)
        h = h + attn.proj_bn(attn.proj_conv(lif(cell.bn_h(cell.W_h(torch.cat([m, xs], dim=-1)).transpose(1, 2)))))
        h = h + mlp.fc2_conv(lif(mlp.fc2_bn(mlp.fc1_conv(lif(mlp.fc1_bn(h))))))
    return model.head(lif(model.head_bn(h)).transpose(1, 2)).mean(dim=1)


def test_matches_the_public_layer_order(tiny):
    x = torch.randn(2, 64, tiny.input_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(tiny(x)["mean_logits"][:, -1], _public_forward(tiny, x), rtol=0, atol=1e-4)


def _assert_same(y: dict[str, torch.Tensor], z: dict[str, torch.Tensor]) -> None:
    assert y.keys() == z.keys()
    for name in y:
        if name.startswith("spikes."):
            assert torch.equal(y[name], z[name]), f"{name}: {(y[name] != z[name]).sum()} spikes differ"
        else:
            torch.testing.assert_close(z[name], y[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("frames", [1, 3, 7, 128, 200])
def test_stream_gives_identical_spikes_to_forward(tiny, frames, chunk):
    x = torch.randn(2, frames, tiny.input_size, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        _assert_same(tiny(x), tiny.stream(x, chunk=chunk))


def test_layers_are_active_so_spike_equality_means_something(tiny):
    with torch.no_grad():
        y = tiny(torch.randn(2, 128, tiny.input_size, generator=torch.Generator().manual_seed(5)))
    rates = {k: float(v.mean()) for k, v in y.items() if k.startswith("spikes.")}
    assert len(rates) == 11 and all(0.02 < r < 0.5 for r in rates.values()), rates


def test_scv2_stream_gives_identical_spikes_to_forward():
    model = build("slmuformer", "scv2", seed=2).emit_spikes()
    x = torch.randn(1, 24, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _assert_same(model(x), model.stream(x, chunk=4))


def test_flush_pads_each_conv_input_not_the_stream(tiny):
    """Offline, each centred conv pads its own input (spikes) with zeros; feeding zero frames is not the same."""
    x = torch.randn(1, 3, tiny.input_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        tail, _ = tiny.flush(tiny.step_chunk(x, tiny.init_state())[1])
        padded_input = tiny(torch.cat([x, torch.zeros(1, tiny.delay, tiny.input_size)], dim=1))
        streamed = tiny.stream(x)
    assert tail["logits"].shape[1] == tiny.delay == 5
    torch.testing.assert_close(streamed["logits"], tiny(x)["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(streamed["logits"], padded_input["logits"][:, :3])


def test_spike_outputs_are_in_the_step_signature_aligned_with_logits():
    model = build("slmuformer", "tiny")
    assert [s.name for s in model.emit_spikes(False).output_spec()] == ["logits", "mean_logits"]
    model.emit_spikes()
    names = [s.name for s in model.output_spec()]
    assert names[:2] == ["logits", "spikes.patch_embed.proj_lif"] and len(names) == 13
    fifo = {s.name: s.shape for s in model.state_spec(batch=3) if s.name.startswith("s.")}
    assert fifo == {"s.patch_embed.proj_lif": (3, 32, 4), "s.patch_embed.proj_lif1": (3, 32, 3),
                    "s.patch_embed.proj_lif2": (3, 32, 2), "s.patch_embed.proj_lif3": (3, 32, 1)}
    y, _ = model.step(torch.randn(3, model.input_size), model.init_state(3))
    assert set(y) == {s.name for s in model.output_spec()}
    assert SLMUFormer(**model.config()).output_sizes == model.output_sizes  # the manifest's config rebuilds it
    assert model.emit_spikes(False).output_sizes.keys() == {"logits"}


def test_public_parallel_form_agrees_with_the_reference(tiny):
    """`parallel=True` (one GEMM over all frames, FFT memory) rounds differently; spikes may flip, rarely."""
    x = torch.randn(4, 128, tiny.input_size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y, p = tiny(x), tiny.forward_frames(x, parallel=True)
    for name in y:
        if name.startswith("spikes."):
            assert (y[name] == p[name]).float().mean() > 0.999, name


def test_compiled_spiking_bundle_reports_spike_agreement_sparsity_and_skippable_work(tmp_path):
    from edgekit.compile import compile
    from edgekit.validate import validate

    bundle = compile("slmuformer", "host", tmp_path / "slmu", config="tiny", chunks=(1,))
    report = validate(bundle.path, frames=256, utterance=128)
    assert set(report["spikes"]) == set(build("slmuformer", "tiny").spike_layers())
    assert all(s["agreement"] > 0.99 and 0.0 < s["sparsity_reference"] < 1.0 for s in report["spikes"].values())
    assert report["predictions"]["mean_logits"]["agreement_per_utterance"] == 1.0
    assert "logits_error" not in report["checks"] and report["criteria"]["spike_agreement_min"] == 0.999
    macs = report["macs"]
    assert 0 < macs["skippable"] < macs["fed_by_spikes"] < macs["per_frame"]
