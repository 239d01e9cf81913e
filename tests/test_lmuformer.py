"""LMUFormer: compatibility with the public lmu_rnn_conv1d, and streaming == parallel reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.signal import cont2discrete

from edgekit.errors import CheckpointError
from edgekit.models import build
from edgekit.models.lmuformer import CONFIGS, LMUFormer, lmu_matrices

SMALL = dict(input_size=4, dim=8, mlp_ratio=1, num_classes=2, seq_len=8, embed_layers=1)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so folding and affine forms are really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@pytest.fixture(scope="module")
def scv2() -> LMUFormer:
    torch.manual_seed(0)
    return randomize_bn(LMUFormer(**CONFIGS["scv2"]).eval())


def public_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The public lmu_rnn_conv1d forward written out from its state dict alone (B, N, C in; B, classes out):
    Tokenizer convs, x + rpe_conv(x), LMU by direct recurrence, proj, ConvFFN, head, mean over frames."""
    bn = lambda h, p: F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],  # noqa: E731
                                   sd[f"{p}.bias"], False, 0.0, 1e-5)
    h = x.transpose(1, 2)
    for i in range(4):
        h = bn(F.relu(F.conv1d(h, sd[f"patch_embed.conv_layers.{i}.0.weight"], padding=1)),
               f"patch_embed.conv_layers.{i}.3")
    h = h + F.conv1d(h, sd["patch_embed.rpe_conv.weight"], padding=1)
    p = "block.0.attn"
    seq = h.transpose(1, 2)
    u = F.relu(F.linear(seq, sd[f"{p}.lmu.W_u.weight"], sd[f"{p}.lmu.W_u.bias"]))
    m, mem = torch.zeros(x.shape[0], sd[f"{p}.lmu.A"].shape[0], dtype=x.dtype), []
    for t in range(seq.shape[1]):
        m = m @ sd[f"{p}.lmu.A"].T + u[:, t] @ sd[f"{p}.lmu.B"].T
        mem.append(m)
    hid = F.relu(F.linear(torch.cat([torch.stack(mem, 1), seq], -1), sd[f"{p}.lmu.W_h.weight"],
                          sd[f"{p}.lmu.W_h.bias"]))
    h = h + bn(F.conv1d(hid.transpose(1, 2), sd[f"{p}.proj_conv.weight"], sd[f"{p}.proj_conv.bias"]), f"{p}.proj_bn")
    q = "block.0.mlp"
    f1 = F.gelu(bn(F.conv1d(h, sd[f"{q}.fc1_conv.weight"], sd[f"{q}.fc1_conv.bias"]), f"{q}.fc1_bn"))
    h = h + F.relu(bn(F.conv1d(f1, sd[f"{q}.fc2_conv.weight"], sd[f"{q}.fc2_conv.bias"]), f"{q}.fc2_bn"))
    return F.linear(h.transpose(1, 2), sd["head.weight"], sd["head.bias"]).mean(1)


def test_scv2_has_the_published_parameter_count(scv2):
    assert sum(p.numel() for p in scv2.parameters()) == 1_621_796


def public_lmu(order: int, theta: float, method: str = "zoh") -> tuple[np.ndarray, np.ndarray]:
    """A, B as the public LMUFFTCell.stateSpaceMatrices builds them (scipy, float64; it then casts to float32)."""
    q = np.arange(order, dtype=np.float64).reshape(-1, 1)
    r = (2 * q + 1) / theta
    i, j = np.meshgrid(q, q, indexing="ij")
    a = r * np.where(i < j, -1, (-1.0) ** (i - j + 1))
    b = r * ((-1.0) ** q)
    ad, bd, *_ = cont2discrete((a, b, np.ones((1, order)), np.zeros((1,))), dt=1.0, method=method)
    return ad, bd


def save_public_checkpoint(path, order: int, theta: float, method: str = "zoh") -> None:
    """A small lmu_rnn_conv1d checkpoint whose LMU buffers (float32 A, B, H, fft_H) are built like the public code."""
    sd = LMUFormer(**SMALL, theta=1.0, order=order).state_dict()
    a, b = (torch.from_numpy(m).float() for m in public_lmu(order, theta, method))
    h = torch.cat([torch.linalg.matrix_power(a, t) @ b for t in range(SMALL["seq_len"])], dim=-1)
    sd.update({"block.0.attn.lmu.A": a, "block.0.attn.lmu.B": b, "block.0.attn.lmu.H": h,
               "block.0.attn.lmu.fft_H": torch.fft.rfft(h, n=2 * h.shape[1], dim=-1)})
    torch.save(sd, path)


def test_lmu_matrices_equal_scipy_zoh_as_in_the_public_code():
    ad, bd = public_lmu(256, 128)
    a_ours, b_ours = lmu_matrices(256, 128.0)
    assert np.abs(a_ours.numpy() - ad).max() < 1e-10 and np.abs(b_ours.numpy() - bd).max() < 1e-10


@pytest.mark.parametrize("frames", [128, 300, 17])
def test_forward_matches_the_public_model_at_any_length(scv2, frames):
    x = torch.randn(2, frames, 128, dtype=torch.float64)
    ref = public_forward({k: v.double() for k, v in scv2.state_dict().items() if not v.is_complex()}, x)
    with torch.no_grad():
        ours = scv2.double()(x)["mean_logits"][:, -1]
    scv2.float()
    assert (ours - ref).abs().max() < 1e-9


@pytest.mark.parametrize("frames,chunk", [(1, 1), (3, 1), (5, 1), (6, 4), (40, 1), (40, 16), (131, 4)])
def test_streaming_equals_the_parallel_forward(scv2, frames, chunk):
    x = torch.randn(2, frames, 128)
    with torch.no_grad():
        ref = scv2(x)
    out = scv2.stream(x, chunk=chunk)
    for name in ("logits", "mean_logits"):
        assert out[name].shape == ref[name].shape
        assert (out[name] - ref[name]).abs().max() < 2e-5, name


def test_state_is_fixed_size_and_delay_is_five(scv2):
    assert scv2.delay == 5
    shapes = {s.name: s.shape for s in scv2.state_spec(batch=3)}
    assert shapes["memory0"] == (3, 256) and shapes["conv0"] == (3, 128, 2) and shapes["frames"] == (3, 1)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_checkpoint_loads_with_or_without_dataparallel_prefix(scv2, tmp_path, prefix):
    path = tmp_path / "best_model.pth"
    torch.save({prefix + k: v for k, v in scv2.state_dict().items()}, path)
    model = build("lmuformer", checkpoint=path)
    assert model.config() == scv2.config()
    x = torch.randn(1, 20, 128)
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], scv2(x)["logits"])


def test_config_is_inferred_from_checkpoint_shapes(tmp_path):
    torch.manual_seed(1)
    small = LMUFormer(input_size=40, dim=64, depth=2, mlp_ratio=2, num_classes=12, theta=64.0, seq_len=64)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    assert build("lmuformer", checkpoint=tmp_path / "small.pt").config() == small.config()


def test_missing_and_unexpected_keys_are_listed(scv2, tmp_path):
    sd = dict(scv2.state_dict())
    del sd["block.0.mlp.fc1_bn.bias"]
    sd["block.0.attn.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        build("lmuformer", checkpoint=tmp_path / "bad.pt")
    assert "block.0.mlp.fc1_bn.bias" in str(e.value) and "block.0.attn.extra" in str(e.value)


def test_wrong_shapes_are_listed(scv2, tmp_path):
    sd = dict(scv2.state_dict())
    sd["block.0.attn.proj_conv.weight"] = torch.zeros(256, 256, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"proj_conv.weight: checkpoint \(256, 256, 3\), model \(256, 256, 1\)"):
        build("lmuformer", checkpoint=tmp_path / "bad.pt")


@pytest.mark.parametrize("order", [1, 4, 16, 64])
@pytest.mark.parametrize("theta", [1.0, 5.0, 127.0, 128.0, 1000.0, 4096.0, 2.5])
def test_theta_is_recovered_from_public_lmu_matrices(tmp_path, order, theta):
    """1/B[0] misses theta by a few frames at small orders (order 16, theta 128 was read as 127 and refused)."""
    save_public_checkpoint(tmp_path / "lmu.pt", order, theta)
    assert build("lmuformer", checkpoint=tmp_path / "lmu.pt").config()["theta"] == theta


@pytest.mark.parametrize("order,theta", [(4, 5.0), (16, 128.0), (64, 100.0), (256, 128.0)])
def test_euler_lmu_matrices_are_refused(tmp_path, order, theta):
    save_public_checkpoint(tmp_path / "euler.pt", order, theta, method="euler")
    with pytest.raises(CheckpointError, match="block.0.attn.lmu.A is not the zero-order-hold"):
        build("lmuformer", checkpoint=tmp_path / "euler.pt")


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build("lmuformer", checkpoint=tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        build("lmuformer", checkpoint=tmp_path / "absent.pt")
