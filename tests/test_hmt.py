"""HMT: the eager reference, the fixed-shape segment step, token-by-token generation and the host artifact agree."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekit import models
from edgekit.apps.textgen import generate, load_engine
from edgekit.errors import CheckpointError, EdgekitError, InputShapeError
from edgekit.models import hmt
from edgekit.models.hmt import CONFIGS, HMT, infer_config
from edgekit.streaming import TorchEngine
from edgekit.units.segment import Generator

VALIDATE = importlib.import_module("edgekit.validate")  # the stage module (edgekit.validate is its function)

TINY = CONFIGS["tiny"]  # L 8, N 3, k 2, j 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sharp(dtype: torch.dtype = torch.float64, std: float = 0.5, config: dict = TINY, seed: int = 0) -> HMT:
    """Large random weights: peaked attention and recall, so that every path (memory, sensory, masks) shows."""
    torch.manual_seed(seed)
    model = HMT(**config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model


def segments(model: HMT, count: int, extra: int = 0, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, count * model.L + extra), generator=torch.Generator().manual_seed(seed))


def test_fixed_step_equals_reference_past_the_cache_float64():
    """5N segments and a short last one: the cache wraps (the ring's write index goes round 5 times)."""
    model = sharp()
    x = segments(model, 5 * model.N, extra=3)
    with torch.no_grad():
        ref_logits, ref_mem = model.reference(x)
        scored = model.score(x)
        logits, mem = scored["logits"], scored["memory_embedding"]
    assert ref_mem.shape[1] == 5 * model.N + 1
    assert float((logits - ref_logits).abs().max()) < 1e-10
    assert float((mem - ref_mem).abs().max()) < 1e-10
    assert float(ref_logits.abs().max()) > 1.0  # not a trivially small comparison


def test_every_memory_path_matters():
    """Recall, sensory tokens and the first-segment vector each change the logits (so the test above sees them)."""
    model = sharp()
    x = segments(model, 6)
    with torch.no_grad():
        full = model.reference(x)[0]
        no_recall = model.reference(x, recall=False)[0]
        no_sensory = model.reference(x, sensory=False)[0]
        y = x.clone()
        y[:, :model.L] = (y[:, :model.L] + 1) % 256  # segment 0 only: reaches segment 5 through memory alone
        changed = model.reference(y)[0]
        changed_no_recall = model.reference(y, recall=False)[0]
    last = slice(5 * model.L, 6 * model.L)
    assert float((full - no_recall)[:, last].abs().max()) > 1e-3
    assert float((full - no_sensory)[:, model.L:].abs().max()) > 1e-3
    assert float((full - changed)[:, last].abs().max()) > 1e-6
    assert torch.equal(changed_no_recall[:, last], no_recall[:, last])  # beyond k: no path


def test_empty_segment_leaves_the_state_and_first_segment_uses_p0():
    model = sharp()
    state = model.init_state(2, torch.float64)
    with torch.no_grad():
        out, after = model.segment_step(torch.zeros(2, model.L, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                                        state)
        assert all(torch.equal(after[n], state[n]) for n in state)
        x = segments(model, 1)
        out, after = model.segment_step(x, torch.full((2,), model.L), state)
        p0 = model.first_memory.expand(2, 1, -1)
        h = model.run_compact(torch.cat([p0, model.embed(x), p0], dim=1))
    torch.testing.assert_close(out["logits"], model.logits(h[:, 1:-1]))
    assert after["memory_valid"][:, 0].eq(1).all() and after["memory_valid"][:, 1:].eq(0).all()
    assert after["write"].eq(1).all() and after["sensory_len"].eq(model.k).all()


def test_generation_is_the_reference_on_every_prefix():
    """Token by token (segment steps while the summary grows, decode steps after, the segment step at each
    boundary), the next-byte logits equal the reference run on the stream so far."""
    model = sharp()
    x = segments(model, model.N + 2, extra=5, batch=1)
    gen = Generator(TorchEngine(model))
    worst = 0.0
    for t in range(x.shape[1]):
        logits = gen.feed(int(x[0, t]))
        with torch.no_grad():
            want = model.reference(x[:, :t + 1])[0][0, -1].numpy()
        worst = max(worst, float(np.abs(logits - want).max()))
    assert worst < 1e-9
    assert gen.calls["decode"] == (model.N + 2) * (model.L - model.j - 1) + (5 - model.j)
    assert len(gen.segment) == 5 and len(gen.segment) < model.L  # bounded: at most one segment of ids
    prefilled = Generator(TorchEngine(model))
    np.testing.assert_allclose(prefilled.prefill(x[0].tolist()), logits, atol=1e-10)
    runs = [Generator(TorchEngine(model)) for _ in range(2)]
    for gen in runs:
        gen.prefill(bytes(x[0, :13].tolist()))
    a, b = (generate(gen, 30, temperature=0.0) for gen in runs)
    assert a == b and len(a) == 30


def test_state_bytes_default_config_vs_kv_cache():
    model = HMT(**CONFIGS["small"])
    # N x d float32 memories, N validity flags, write index, k sensory ids, their count.
    assert model.state_bytes() == 16 * 256 * 4 + 16 * 4 + 8 + 8 * 8 + 8 == 16_528
    assert hmt.KVCacheLM.cache_bytes(model, 10_000) == 2 * 4 * 256 * 4 * 10_000  # 81.9 MB
    params = sum(p.numel() for p in model.parameters())
    assert 3_000_000 < params < 4_000_000


def test_checkpoint_round_trip(tmp_path):
    model = sharp(torch.float32)
    path = tmp_path / "hmt.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = models.build("hmt", checkpoint=path)
    assert loaded.config() == model.config() and infer_config(model.state_dict()) == model.config()
    x = segments(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.reference(x)[0], model.reference(x)[0])
    with pytest.raises(CheckpointError, match="hmt_config"):
        infer_config({k: v for k, v in model.state_dict().items() if k != "hmt_config"})


@pytest.fixture(scope="module")
def tiny_library(tiny_segment_bundle):
    """Both steps exported (checked against ONNX Runtime) and compiled for this host, once per test session, by the
    generic `edgekit compile hmt --config tiny` (conftest); the model is the bundle's own weights.pt."""
    bundle = tiny_segment_bundle
    model = HMT(**bundle.manifest["model"]["config"]).eval()
    model.load_state_dict(torch.load(bundle.path / bundle.manifest["model"]["weights"]))
    return model, bundle.path, bundle.manifest


def test_host_artifact_equals_reference_past_the_cache(tiny_library):
    model, out, meta = tiny_library
    assert set(meta["entries"]) == {"segment", "decode"} and meta["state_bytes"] == model.state_bytes()
    assert meta["model"]["family"] == "hmt" and "onnx/segment.onnx" in meta["files"]
    assert meta["golden"]["segments"] == model.N + 4  # the golden record wraps the memory cache
    eng = load_engine(out)
    x = segments(model, 4 * model.N, extra=5, batch=1)
    with torch.no_grad():
        ref_logits, ref_mem = model.double().reference(x)
        model.float()
    state, logits, mems = eng.init_state(), [], []
    for s in range(0, x.shape[1], model.L):
        seg = x[0, s:s + model.L].numpy()
        o, _, state = eng.segment(np.pad(seg, (0, model.L - len(seg))), len(seg), state)
        logits.append(o["logits"][:len(seg)])
        mems.append(o["memory_embedding"])
    assert np.abs(np.concatenate(logits) - ref_logits[0].numpy()).max() < 1e-4
    assert np.abs(np.stack(mems) - ref_mem[0].numpy()).max() < 1e-4
    assert float(ref_logits.std()) > 1e-2 and float(ref_mem.std()) > 1e-2  # 100x the tolerance: not trivial


def test_host_artifact_generates_like_pytorch(tiny_library):
    model, out, _ = tiny_library
    prompt = bytes(range(65, 65 + 11))
    torch_gen, tvm_gen = Generator(TorchEngine(model)), Generator(load_engine(out))
    torch_gen.prefill(prompt)
    tvm_gen.prefill(prompt)
    a, b = generate(torch_gen, 40, temperature=0.0), generate(tvm_gen, 40, temperature=0.0)
    assert a == b
    np.testing.assert_allclose(tvm_gen.last, torch_gen.last, atol=1e-4)
    assert tvm_gen.calls == torch_gen.calls
    eng = tvm_gen.engine  # out-of-range inputs are refused before the unchecked compiled gathers
    with pytest.raises(InputShapeError):
        eng.segment(np.zeros(model.L, dtype=np.int64), model.L + 1, eng.init_state())
    with pytest.raises(InputShapeError):
        eng.segment(np.full(model.L, 256), model.L, eng.init_state())


def test_cli_generate(tmp_path, monkeypatch):
    from edgekit.cli import main

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    r = CliRunner().invoke(main, ["generate", "--config", "tiny", "--engine", "pytorch", "--tokens", "20",
                                  "--prompt", "Hello"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Hello")
    r = CliRunner().invoke(main, ["generate", "--config", "tiny", "--checkpoint", "x.pt"])
    assert r.exit_code != 0 and "not both" in r.output


def test_cli_generate_bundle_and_cache(tiny_library, tmp_path, monkeypatch):
    """`--bundle` runs a bundle made by `edgekit compile hmt`; `--engine tvm` finds the same bundle in the cache
    (keyed cfg-tiny) instead of compiling; both print what eager PyTorch prints at temperature 0."""
    import shutil

    from edgekit import __version__
    from edgekit.cli import main

    _, out, _ = tiny_library
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    args = ["generate", "--tokens", "25", "--temperature", "0", "--prompt", "Hello, memory"]
    want = CliRunner().invoke(main, args + ["--config", "tiny", "--engine", "pytorch"])
    assert want.exit_code == 0, want.output
    assert want.stdout.startswith("Hello, memory") and len(want.stdout) > len("Hello, memory\n")
    r = CliRunner().invoke(main, args + ["--bundle", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout == want.stdout
    shutil.copytree(out, tmp_path / "bundles" / f"hmt-cfg-tiny-host-{__version__}")
    r = CliRunner().invoke(main, args + ["--config", "tiny"])
    assert r.exit_code == 0, r.output
    assert "first use" not in r.output and r.stdout == want.stdout


def test_cli_generate_refuses_other_bundles(tiny_library, tmp_path):
    import json
    import shutil

    from edgekit.cli import main

    _, out, _ = tiny_library
    r = CliRunner().invoke(main, ["generate", "--bundle", str(tmp_path), "--tokens", "1"])
    assert r.exit_code == 2 and "not an edgekit bundle" in " ".join(r.output.split())
    other = tmp_path / "other"  # a valid bundle (checksums rewritten) whose manifest names another family
    shutil.copytree(out, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["unit"] = "frame"
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(main, ["generate", "--bundle", str(other), "--tokens", "1"])
    assert r.exit_code == 2 and "not a segment-level LM" in " ".join(r.output.split()), r.output
    (other / "model.so").write_bytes(b"tampered")
    r = CliRunner().invoke(main, ["generate", "--bundle", str(other), "--tokens", "1"])
    assert r.exit_code == 2 and "sha256 mismatch" in " ".join(r.output.split()), r.output


def test_validate_segment_bundle_scores_and_decodes_against_the_reference(tiny_library, tmp_path):
    """`edgekit validate` on a segment bundle: past the cache wrap, the last segments fed byte by byte (the
    generation path), in the artifact's own process; a reference one weight away fails it."""
    v, validate = VALIDATE, VALIDATE.validate
    model, out, _ = tiny_library
    report = validate(out, segments=3 * model.N + 2, decode_segments=2)
    assert report["passed"], report["checks"]
    assert set(report["outputs"]) == {"logits", "memory_embedding", "logits_byte_by_byte"}
    assert report["outputs"]["logits"]["max_abs_error"] < 1e-4 and report["next_byte_agreement"] > 0.99
    assert report["execution"] == "native, own process" and report["rss_bytes"]["at_T"] is not None
    assert "constant_memory" in report["checks"] and report["rss_bytes"]["growth"] is not None
    short = validate(out, segments=1, decode_segments=0)  # T/10 and T are the same point: no memory check
    assert short["passed"] and "constant_memory" not in short["checks"] and short["rss_bytes"]["growth"] is None
    assert report["outputs"]["logits_byte_by_byte"]["error_by_decile"][0] is None  # only the last segments fed
    text = tmp_path / "t.txt"
    text.write_bytes(b"the quick brown fox " * 7)
    assert validate(out, segments=5, decode_segments=1, text=text)["passed"]
    with pytest.raises(EdgekitError, match="frames: not an option of segment-streaming models"):
        validate(out, frames=100)
    real = v.reference_model

    def perturbed(bundle):
        net = real(bundle)
        with torch.no_grad():
            net.first_memory[0] += 0.1
        return net

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(v, "reference_model", perturbed)
        bad = validate(out, segments=model.N + 2, decode_segments=0)
    assert not bad["passed"] and not bad["checks"]["logits_error"]
    with pytest.raises(EdgekitError, match="decode-segments"):
        validate(out, segments=2, decode_segments=3)


def test_validate_segment_bundle_without_torch_uses_the_golden_record(tiny_library, monkeypatch):
    """On a board without torch the bundle's golden record is the reference; it is the float64 reference."""
    v = VALIDATE
    _, out, meta = tiny_library
    monkeypatch.setattr(v, "reference_model", lambda bundle: None)  # what it returns where torch is missing
    report = v.validate(out, segments=999)
    assert report["passed"] and report["segments"] == meta["golden"]["segments"] and "golden" in report["reference"]
    with pytest.raises(EdgekitError, match="golden record"):
        v.validate(out, seed=1)


def test_bench_segment_bundle(tiny_library, monkeypatch):
    from edgekit.bench import bench

    _, out, _ = tiny_library
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # restored afterwards: bench sets it for the run
    report = bench(out, calls=20, warmup=2, threads=1)
    assert report["threads"]["requested"] == 1 and report["threads"]["tvm"] >= 1
    rows = {(r["engine"], r["call"]) for r in report["results"]}
    assert rows == {(e, c) for e in ("pytorch", "onnxruntime", "tvm") for c in ("segment", "decode", "generate")}
    assert all(r["bytes_per_second"] > 0 for r in report["results"])
    assert (Path(out) / "bench.json").is_file()


def test_a_token_outside_the_vocabulary_is_refused_and_leaves_the_stream_intact(tiny_library):
    model, out, _ = tiny_library
    gen, clean = Generator(load_engine(out)), Generator(load_engine(out))
    for g in (gen, clean):
        g.prefill(b"abc")
    with pytest.raises(InputShapeError, match="not in \\[0, 256\\)"):
        gen.feed(256)
    np.testing.assert_array_equal(gen.feed(ord("d")), clean.feed(ord("d")))
