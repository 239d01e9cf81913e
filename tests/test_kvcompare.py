"""The Aaren vs KV-cache comparison: every engine computes the same network and the report has the expected
shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.apps import kvcompare
from edgekit.compile import compile
from edgekit.measure import FrameSource
from edgekit.models import from_bundle as reference_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "aaren-small"
    return compile("aaren", "host", out, config="small", chunks=(1, 4))


def test_engines_compute_the_same_network(bundle, tmp_path):
    """Each engine, stepped from the start, then moved on by `reach`, then stepped again, gives the float64
    parallel reference's logits (the KV-cache ones through the exported and the TVM-compiled cache step)."""
    net = reference_model(bundle).float()
    onnx_path = kvcompare.export_kv_step(net, tmp_path / "kv.onnx")
    lib = kvcompare.build_kv_step_tvm(onnx_path, tmp_path / "kv.so")
    source = FrameSource(net.input_size, 3)
    with torch.no_grad():
        want = reference_model(bundle).forward_frames(torch.from_numpy(source.frames(0, 310)).double())["logits"]
    engines = {"pytorch-aaren": kvcompare.TorchAaren(net), "pytorch-kvcache": kvcompare.TorchKV(net),
               "onnxruntime-aaren": kvcompare.OrtAaren(bundle, 1), "tvm-aaren": kvcompare.TvmAaren(bundle),
               "onnxruntime-kvcache": kvcompare.OrtKV(net, onnx_path, 1), "tvm-kvcache": kvcompare.TvmKV(net, lib)}
    assert set(engines) == set(kvcompare.ENGINES)
    for name, engine in engines.items():
        engine.reserve(8)
        got = [engine.step(source.frames(t, t + 1)) for t in range(3)]
        engine.reach(source.frames(3, 300))  # past the reserved room: the caches grow
        got += [engine.step(source.frames(t, t + 1)) for t in range(300, 310)]
        got = np.concatenate([g.reshape(1, 1, -1) for g in got], axis=1)
        ref = torch.cat([want[:, :3], want[:, 300:]], dim=1).numpy()
        assert np.abs(got - ref).max() < 1e-5, name
        expected = 310 * kvcompare_bytes_per_token(net) if engine.kind == "kv-cache" else bundle.manifest["state_bytes"]
        assert engine.memory_bytes() == expected, name


def kvcompare_bytes_per_token(net) -> int:
    return sum(2 * 4 * b.attn.heads * b.attn.d_head for b in net.blocks)


def test_compare_report(bundle):
    report = kvcompare.compare(bundle.path, lengths=(40, 200), engines=("tvm-aaren", "pytorch-kvcache"), window=5,
                               warmup=2, agreement_tokens=300)
    rows = {e["engine"]: e["rows"] for e in report["engines"]}
    assert [r["length"] for r in rows["tvm-aaren"]] == [40, 200]
    assert {r["memory_bytes"] for r in rows["tvm-aaren"]} == {bundle.manifest["state_bytes"]}
    per_token = report["kv_cache_bytes_per_token"]
    assert [r["memory_bytes"] for r in rows["pytorch-kvcache"]] == [47 * per_token, 207 * per_token]
    assert all(r["finite"] and r["p50_us"] > 0 for e in rows.values() for r in e)
    assert max(report["agreement"]["max_abs_error"].values()) < 1e-12
    assert len(report["agreement"]["max_abs_error"]) == 10  # 5 forms, every pair
    md = (bundle.path / "kv_compare.md").read_text()
    assert "| tvm-aaren | 200 |" in md and "exact softmax vs step" in md
    assert (bundle.path / "kv_compare.json").exists()
