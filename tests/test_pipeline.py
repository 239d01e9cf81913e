"""Export -> compile -> bundle -> validate -> bench on the host, and the errors users get on bad input."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgekit import artifact
from edgekit.cli import main
from edgekit.compile import compile, import_entries
from edgekit.errors import BundleError, CompileError, EdgekitError, InputShapeError
from edgekit.models import build
from edgekit.runtime import Session
from edgekit.validate import validate


def test_bundle_holds_manifest_library_onnx_and_checksums(tiny_bundle):
    m = tiny_bundle.manifest
    assert set(m["entries"]) == {"step", "chunk4", "flush"}
    assert {"model.so", "weights.pt", "onnx/step.onnx", "onnx/chunk4.onnx", "onnx/flush.onnx"} <= set(m["files"])
    assert m["target"]["name"] == "host" and m["delay"] == 5 and m["model"]["family"] == "lmuformer"
    assert m["versions"]["apache-tvm"].startswith("0.27") and m["versions"]["torch"].startswith("2.13")
    assert m["state_bytes"] == sum(4 * int(np.prod(s["shape"])) for s in m["state"])
    for rel, digest in m["files"].items():
        assert artifact.file_sha256(tiny_bundle.path / rel) == digest


def test_exported_graphs_are_checked_and_batchnorm_is_folded(tiny_bundle):
    for entry in tiny_bundle.manifest["entries"].values():
        graph = onnx.load(tiny_bundle.path / entry["onnx"])
        onnx.checker.check_model(graph, full_check=True)
        assert graph.opset_import[0].version >= 17
        assert "BatchNormalization" not in {n.op_type for n in graph.graph.node}
        assert [i.name for i in graph.graph.input][-1] == "state"  # the state packed into one vector
        assert [o.name for o in graph.graph.output] == ["outputs", "state_out"]


@pytest.mark.parametrize("chunk", [1, 4])
def test_artifact_stream_equals_pytorch_forward(tiny_bundle, chunk):
    model = build("lmuformer", "tiny")
    x = np.random.default_rng(0).standard_normal((1, 23, 40), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    out = Session(tiny_bundle).run(x, chunk=chunk)
    for name in ("logits", "mean_logits"):
        assert np.abs(out[name] - ref[name].numpy()).max() < 1e-5


def test_validate_passes_and_writes_a_report(tiny_bundle):
    report = validate(tiny_bundle.path, frames=2_000, chunk=4)
    assert report["passed"], report["checks"]
    assert report["outputs"]["mean_logits"]["max_abs_error"] < 1e-5
    assert len(report["outputs"]["logits"]["error_by_decile"]) == 10
    saved = json.loads((tiny_bundle.path / "validation.json").read_text())
    assert saved["frames"] == 2_000 and saved["rss_bytes"]["at_T"] is not None


def test_validate_detects_a_wrong_artifact(tiny_bundle, tmp_path):
    """Swap in weights the library was not built from: validation must fail, not pass by construction."""
    bundle = tmp_path / "tampered"
    shutil.copytree(tiny_bundle.path, bundle)
    sd = torch.load(bundle / "weights.pt")
    sd["head.bias"] += 0.01
    torch.save(sd, bundle / "weights.pt")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["weights.pt"] = artifact.file_sha256(bundle / "weights.pt")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = validate(bundle, frames=50)
    assert not report["passed"] and not report["checks"]["logits_error"]


def test_bench_times_all_three_engines(tiny_bundle):
    from edgekit.bench import bench

    report = bench(tiny_bundle.path, calls=20, warmup=2)
    engines = {(r["engine"], r["frames_per_call"]) for r in report["results"]}
    assert {("pytorch", 1), ("onnxruntime", 4), ("tvm", 4), ("tvm-compute", 1)} <= engines
    assert all(r["frames_per_second"] > 0 for r in report["results"])


def test_wrong_input_shape_is_refused(tiny_bundle):
    s = Session(tiny_bundle)
    with pytest.raises(InputShapeError, match="features=40"):
        s.step(np.zeros((1, 1, 41), np.float32))
    with pytest.raises(BundleError, match="no entry for chunks of 3"):
        s.step(np.zeros((1, 3, 40), np.float32))


def test_modified_bundle_is_refused(tiny_bundle, tmp_path):
    bundle = tmp_path / "modified"
    shutil.copytree(tiny_bundle.path, bundle)
    with open(bundle / "model.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="model.so was modified"):
        artifact.load(bundle)


def test_bundle_for_another_machine_is_refused(tiny_bundle, tmp_path):
    bundle = tmp_path / "arm"
    shutil.copytree(tiny_bundle.path, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"].update(name="visionfive2", arch="riscv64")  # a machine this one neither is nor emulates
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="built for target visionfive2 \\(riscv64\\)"):
        Session(bundle)


def test_existing_output_is_kept_unless_forced(tiny_bundle, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(BundleError, match="already exists"):
        compile("lmuformer", "host", out, config="tiny", chunks=(1,))
    with pytest.raises(BundleError, match="not an edgekit bundle"):
        compile("lmuformer", "host", out, config="tiny", chunks=(1,), force=True)
    assert (out / "precious.txt").read_text() == "user data"


def test_force_replaces_a_bundle_and_failure_leaves_nothing(tiny_bundle, tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, out)  # a bundle already there (the session's, copied: one compile fewer)
    first = (out / "manifest.json").read_text()
    import tvm

    def broken(*args, **kwargs):
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(tvm, "compile", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        compile("lmuformer", "host", out, config="tiny", chunks=(1,), force=True)
    assert (out / "manifest.json").read_text() == first  # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no partial directory left behind
    monkeypatch.undo()
    compile("lmuformer", "host", out, config="tiny", chunks=(1,), force=True)
    artifact.load(out)


def test_an_op_tvm_cannot_import_is_named(tmp_path):
    node = helper.make_node("DFT", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "step.onnx")
    with pytest.raises(CompileError, match="does not support op\\(s\\) DFT"):
        import_entries({"step": tmp_path / "step.onnx"})


@pytest.mark.parametrize("args,message", [
    (["compile", "lmuformr", "--config", "tiny", "-o", "x"], "choose one of: lmuformer, slmuformer, aaren"),
    (["compile", "lmuformer", "--config", "tiny", "-t", "pi", "-o", "x"], "choose one of: arm64 (arm)"),
    (["compile", "lmuformer", "--config", "huge", "-o", "x"], "choose one of: scv2, tiny"),
    (["validate", "nowhere"], "is not an edgekit bundle"),
])
def test_cli_errors_are_one_clear_message(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_cli_compile_validate_bench_roundtrip(tmp_path):
    out = str(tmp_path / "lmu")
    runner = CliRunner()
    r = runner.invoke(main, ["compile", "lmuformer", "--config", "tiny", "-o", out, "--chunk", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["validate", out, "--frames", "300", "--chunk", "4"])
    assert r.exit_code == 0 and "pass constant_memory" in r.output, r.output
    r = runner.invoke(main, ["bench", out, "--calls", "20", "--warmup", "2", "--engine", "tvm"])
    assert r.exit_code == 0 and "tvm-compute" in r.output, r.output


def test_validate_without_torch_uses_the_golden_record(tiny_bundle, monkeypatch):
    """On a board with only the runtime, the bundle's own float64 reference outputs are the reference."""
    v = importlib.import_module("edgekit.validate")  # the stage module (edgekit.validate is its function)
    monkeypatch.setattr(v, "reference_model", lambda bundle: None)  # what it returns where torch is missing
    report = v.validate(tiny_bundle.path, frames=100_000, chunk=4)
    assert report["passed"] and "golden record" in report["reference"] and report["frames"] == 512
    assert report["outputs"]["mean_logits"]["max_abs_error"] < 1e-5
    with pytest.raises(EdgekitError, match="golden record"):
        v.validate(tiny_bundle.path, utterance=100)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning is only visible with 2+ CPUs")
def test_tvm_thread_pool_leaves_the_process_on_all_its_cpus():
    """TVM's pool would pin the calling thread to one core on start; PyTorch's threads then shared that core."""
    code = ("import os, edgekit; from edgekit.tvm_runtime import num_threads; before = os.sched_getaffinity(0); "
            "num_threads(); print(before == os.sched_getaffinity(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
