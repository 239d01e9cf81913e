"""Aaren: the parallel scan, the step, the chunked step and softmax attention over a KV cache are one function."""
from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch

from edgekit.errors import CheckpointError
from edgekit.models import build
from edgekit.models.aaren import NEG, Aaren, SoftmaxKVCache, combine, scan

TINY = dict(input_size=8, d_model=32, layers=2, heads=4, ffn=64, num_classes=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(dtype: torch.dtype = torch.float64, sharpen: float = 4.0, config: dict = TINY) -> Aaren:
    """A small model whose queries are scaled up, so the softmax is peaked and the running max matters."""
    torch.manual_seed(0)
    model = Aaren(**config).to(dtype).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.query.mul_(sharpen)
    return model


def equal_scores(model: Aaren) -> Aaren:
    """Keys zeroed: every score is 0, so every token weighs e^0 = 1 and c counts tokens exactly."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.key.weight.zero_()
            blk.attn.key.bias.zero_()
    return model


@torch.no_grad()
def stepped(model: Aaren, x: torch.Tensor) -> dict[str, torch.Tensor]:
    state, outs = model.init_state(x.shape[0]), []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state)
        outs.append(y)
    return {k: torch.stack([o[k] for o in outs], dim=1) for k in outs[0]}


@torch.no_grad()
def softmax_baseline(model: Aaren, x: torch.Tensor) -> torch.Tensor:
    cache = SoftmaxKVCache(model, batch=x.shape[0], capacity=16)
    return torch.stack([cache.step(x[:, t]) for t in range(x.shape[1])], dim=1)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_forms_agree_float64_10k_tokens():
    model = tiny(config=dict(input_size=4, d_model=16, layers=2, heads=2, ffn=32, num_classes=5))
    x = torch.randn(1, 10_000, 4, dtype=torch.float64)
    with torch.no_grad():
        scanned = model(x)
        chunked = model.stream(x, chunk=64)
    step, soft = stepped(model, x), softmax_baseline(model, x)
    errors = {"step-scan": max_err(step["logits"], scanned["logits"]),
              "step-softmax": max_err(step["logits"], soft), "scan-softmax": max_err(scanned["logits"], soft),
              "chunk64-step": max_err(chunked["logits"], step["logits"]),
              "mean_logits chunk64-scan": max_err(chunked["mean_logits"], scanned["mean_logits"])}
    print("float64, 10,000 tokens, max abs error:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-12


@pytest.mark.parametrize("chunk", [5, 16])
def test_forms_agree_float32(chunk: int):
    model = build("aaren", "small")
    x = torch.randn(2, 301, model.input_size)
    with torch.no_grad():
        scanned, chunked = model(x), model.stream(x, chunk=chunk)
    step = stepped(model, x)
    soft = softmax_baseline(copy.deepcopy(model).double(), x.double())
    for name in scanned:
        torch.testing.assert_close(step[name], scanned[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chunked[name], step[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step["logits"].double(), soft, rtol=1e-4, atol=1e-5)


def test_kv_cache_prefill_matches_stepping():
    """Prefill (the parallel form, chunked, resumed from a cached prefix) fills the same cache and gives the same
    logits as stepping token by token; steps after it continue exactly."""
    model = tiny()
    x = torch.randn(2, 90, TINY["input_size"], dtype=torch.float64)
    want = softmax_baseline(model, x)
    cache = SoftmaxKVCache(model, batch=2, capacity=4)
    got = torch.cat([cache.prefill(x[:, :37], chunk=16), cache.prefill(x[:, 37:80], chunk=8),
                     torch.stack([cache.step(x[:, t]) for t in range(80, 90)], dim=1)], dim=1)
    assert cache.length == 90 and cache.cache_bytes() == 2 * len(model.blocks) * 2 * 90 * 32 * 8
    assert max_err(got, want) < 1e-12
    stepped_cache = SoftmaxKVCache(model, batch=2, capacity=4)
    for t in range(90):
        stepped_cache.step(x[:, t])
    for a, b in zip(cache.keys + cache.values, stepped_cache.keys + stepped_cache.values):
        assert max_err(a[:, :90], b[:, :90]) < 1e-12


def compensated(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The value of the Kahan pair sum.<name>, carry.<name>, in float64."""
    return state[f"sum.{name}"].double() - state[f"carry.{name}"].double()


@pytest.mark.parametrize("count", [2.0**24 - 8, 2.0**24, 2.0**26])
def test_fp32_state_keeps_counting_past_2_24(count: float):
    """In fp32, c + 1 rounds back to c from 2^24 = 16,777,216 on (c + 16, a chunk's sum, from 2^28): a plain sum
    stops counting while a goes on, and a / c drifts. From a state injected as if `count` tokens of weight 1 had
    been seen (a scaled alike, so the outputs are unchanged), 64 more tokens by the step and by chunks of 16 leave
    the compensated c at count + 64 exactly and a where float64 math from the same state puts it.
    See examples/aaren/long_stream_probe.py for the compiled artifact."""
    model = equal_scores(tiny(torch.float32))
    x = torch.randn(1, 80, model.input_size)
    layers = range(len(model.blocks))
    with torch.no_grad():
        _, state = model.step_chunk(x[:, :16], model.init_state())
        for j in layers:
            state[f"sum.a{j}"] = state[f"sum.a{j}"] * (count / 16)
            state[f"sum.c{j}"] = torch.full_like(state[f"sum.c{j}"], count)
        stepped, chunked = dict(state), dict(state)
        for t in range(16, 80):
            y, stepped = model.step(x[:, t], stepped)
        for t in range(16, 80, 16):
            _, chunked = model.step_chunk(x[:, t:t + 16], chunked)
        y64, want = copy.deepcopy(model).double().step_chunk(x[:, 16:].double(),
                                                             {k: v.double() for k, v in state.items()})
    for got in (stepped, chunked):
        for j in layers:
            assert torch.equal(compensated(got, f"c{j}"), torch.full_like(compensated(want, f"c{j}"), count + 64))
            torch.testing.assert_close(compensated(got, f"a{j}"), compensated(want, f"a{j}"), rtol=0, atol=1e-3)
    torch.testing.assert_close(y["logits"].double(), y64["logits"][:, -1], rtol=1e-4, atol=1e-5)


def test_chunk_is_parallel_not_unrolled():
    """The chunk folds K tokens with one scan: the attention's score op runs once per layer, not K times."""
    model, calls = build("aaren"), []
    for blk in model.blocks:
        blk.attn.key.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model.step_chunk(torch.randn(1, 32, model.input_size), model.init_state())
    assert len(calls) == len(model.blocks)


def very_negative(model: Aaren, level: float = -1e4, spread: float = 20.0) -> Aaren:
    """Scores around `level` (spread by the inputs): e^s underflows, so a state started at m = 0 gives 0/0."""
    with torch.no_grad():
        for blk in model.blocks:
            d = blk.attn.d_head
            blk.attn.query.fill_(1.0)
            blk.attn.key.bias.fill_(level / math.sqrt(d))
            blk.attn.key.weight.mul_(spread)
    return model


def test_very_negative_scores_no_nan():
    x = torch.randn(2, 200, TINY["input_size"], dtype=torch.float64)
    model = very_negative(tiny())
    with torch.no_grad():
        h = model.blocks[0].norm1(model.embed(x))
        s = model.blocks[0].attn.scores(model.blocks[0].attn.keys_values(h)[0])
        assert float(s.max()) < -9_000
        scanned, chunked = model(x), model.stream(x, chunk=7)
    step, soft = stepped(model, x), softmax_baseline(model, x)
    for y in (scanned["logits"], chunked["logits"], step["logits"]):
        assert torch.isfinite(y).all()
        assert max_err(y, soft) < 1e-9
    model32, x32 = model.float(), x.float()
    with torch.no_grad():
        outs32 = [model32(x32)["logits"], model32.stream(x32, chunk=7)["logits"], stepped(model32, x32)["logits"]]
    for y in outs32:
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, outs32[0], rtol=1e-3, atol=1e-3)


def test_first_token_gets_weight_one():
    """From the zero state (m = 0) a token of score -1e4 must come out with c = 1 and a = v exactly."""
    model = very_negative(tiny())
    x = torch.randn(3, model.input_size, dtype=torch.float64)
    with torch.no_grad():
        _, state = model.step(x, model.init_state(3))
        attn = model.blocks[0].attn
        k, v = attn.keys_values(model.blocks[0].norm1(model.embed(x)))
    assert torch.equal(state["sum.c0"], torch.ones_like(state["sum.c0"]))
    assert torch.equal(state["sum.a0"], v)
    assert not state["carry.c0"].any() and not state["carry.a0"].any()
    assert torch.equal(state["m0"], attn.scores(k))


@pytest.mark.parametrize("empty_m", [0.0, NEG, -math.inf])
def test_empty_state_is_identity(empty_m: float):
    s, v = torch.tensor([[-1e4, 3.0]]), torch.randn(1, 2, 4)
    leaf = (s, torch.ones_like(s), v)
    empty = (torch.full_like(s, empty_m), torch.zeros_like(s), torch.zeros_like(v))
    for got in (combine(empty, leaf), combine(leaf, empty)):
        for g, w in zip(got, leaf):
            assert torch.equal(g, w)
    both = combine(empty, empty)
    assert all(not torch.isnan(t).any() for t in both) and torch.equal(both[1], torch.zeros_like(s))


def test_scan_is_not_the_cumsum_shortcut():
    """cumsum(e^{s - cummax s}) weights each term by a different max: for s = (0, 10), v = (1, 0) it gives 1/2
    where softmax gives 1/(1 + e^10). The scan must give the softmax."""
    s = torch.tensor([[[0.0], [10.0]]], dtype=torch.float64)  # [B=1, T=2, H=1]
    v = torch.tensor([[[[1.0]], [[0.0]]]], dtype=torch.float64)  # [1, 2, 1, D=1]
    _, u, w = scan(s, v)
    want = 1.0 / (1.0 + math.exp(10.0))
    assert float(w[0, 1, 0, 0] / u[0, 1, 0]) == pytest.approx(want, rel=1e-12)
    e = torch.exp(s - torch.cummax(s, dim=1).values)
    shortcut = torch.cumsum(e.unsqueeze(-1) * v, dim=1) / torch.cumsum(e, dim=1).unsqueeze(-1)
    assert float(shortcut[0, 1, 0, 0]) == pytest.approx(0.5)

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 257, 3, generator=g, dtype=torch.float64) * 10 + torch.linspace(-50, 50, 257).view(1, -1, 1)
    v = torch.randn(2, 257, 3, 4, generator=g, dtype=torch.float64)
    _, u, w = scan(s, v)
    mask = torch.ones(257, 257, dtype=torch.bool).tril()  # [query t, key i]
    p = torch.softmax(s.transpose(1, 2).unsqueeze(2).masked_fill(~mask, -math.inf), dim=-1)  # [B, H, t, i]
    exact = torch.einsum("bhti,bihd->bthd", p, v)
    assert max_err(w / u.unsqueeze(-1), exact) < 1e-12


@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                (torch.float64, torch.float64)])
def test_state_dtype(dtype: torch.dtype, state_dtype: torch.dtype):
    model = tiny(dtype)
    x = torch.randn(1, 4, model.input_size, dtype=dtype)
    with torch.no_grad():
        _, state = model.step(x[:, 0], model.init_state())
        _, state = model.step_chunk(x, state)
    assert all(state[n].dtype == state_dtype for n in model.frame_state_shapes())


def test_fp16_weights_count_past_fp16_range():
    """c counts tokens (exactly, when all scores are equal): 70,000 tokens overflow fp16 but not the fp32 state."""
    model = equal_scores(tiny(torch.float16))
    state, x = model.init_state(), torch.randn(1, 70_000, model.input_size, dtype=torch.float16)
    with torch.no_grad():
        for t in range(0, x.shape[1], 10_000):
            y, state = model.step_chunk(x[:, t:t + 10_000], state)
    assert torch.equal(state["sum.c1"], torch.full_like(state["sum.c1"], 70_000.0))
    assert torch.isfinite(y["logits"]).all()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    config = dict(input_size=5, d_model=24, layers=3, heads=3, ffn=40, num_classes=7)
    model = Aaren(**config).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "aaren.pt")
    loaded = build("aaren", checkpoint=tmp_path / "aaren.pt")
    assert loaded.config() == config
    x = torch.randn(2, 20, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.save(build("lmuformer", "tiny").state_dict(), tmp_path / "lmu.pt")
    with pytest.raises(CheckpointError, match="not an Aaren"):
        build("aaren", checkpoint=tmp_path / "lmu.pt")


def test_configs():
    for name, blocks, d_model in (("small", 2, 64), ("base", 4, 128)):
        model = build("aaren", name)
        assert (model.delay, len(model.blocks), model.embed.out_features) == (0, blocks, d_model)
    assert build("aaren").config()["d_model"] == 64


class _Entry(torch.nn.Module):
    """step (frames = 0) or step_chunk (frames = K) with the state as explicit tensors."""

    def __init__(self, model: Aaren, frames: int):
        super().__init__()
        self.model, self.frames = model, frames
        self.state_names = [s.name for s in model.state_spec()]
        self.output_names = [s.name for s in model.output_spec()]

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        run = self.model.step_chunk if self.frames else self.model.step
        y, new = run(x, dict(zip(self.state_names, state)))
        return (*[y[n] for n in self.output_names], *[new[n] for n in self.state_names])


@pytest.mark.parametrize("frames", [0, 8])
def test_onnx_export_matches_onnxruntime(frames: int):
    import onnxruntime as ort

    model = build("aaren")
    entry = _Entry(model, frames).eval()
    shape = (2, frames, model.input_size) if frames else (2, model.input_size)
    names = ["x", *entry.state_names]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(entry, (torch.randn(shape), *model.init_state(2).values()), buf, input_names=names,
                          output_names=[*entry.output_names, *[f"next.{n}" for n in entry.state_names]],
                          opset_version=17, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 5 * max(frames, 1), model.input_size)
    state = model.init_state(2)
    got, torch_state = [], dict(state)
    with torch.no_grad():
        for t in range(0, x.shape[1], max(frames, 1)):
            x_t = x[:, t:t + frames] if frames else x[:, t]
            out = sess.run(None, {"x": x_t.numpy(), **{n: v.numpy() for n, v in state.items()}})
            want = entry(x_t, *torch_state.values())
            for g, w in zip(out, want):
                np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)
            state = {n: torch.from_numpy(v) for n, v in zip(entry.state_names, out[len(entry.output_names):])}
            torch_state = dict(zip(entry.state_names, want[len(entry.output_names):]))
            got.append(torch.from_numpy(out[0]).view(2, -1, *model.output_sizes["logits"]))
        reference = model(x)["logits"]
    torch.testing.assert_close(torch.cat(got, dim=1), reference, rtol=1e-4, atol=1e-5)
