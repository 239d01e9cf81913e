"""The native runner: built into a bundle, it streams frames with TVM's C++ runtime alone and validates against
PyTorch like a Python session; it refuses modified libraries, edited manifests and NaN frames on its own."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from edgekit import Session, emulator
from edgekit.artifact import load
from edgekit.compile import compile
from edgekit.errors import BundleError
from edgekit.report import report
from edgekit.runner import NativeSession, add_runner
from edgekit.validate import validate


@pytest.fixture(scope="module")
def native_bundle(tiny_bundle, tmp_path_factory):
    copy = tmp_path_factory.mktemp("native") / "lmu-tiny"
    shutil.copytree(tiny_bundle.path, copy)
    return add_runner(copy)


def _run(bundle, *args, **kw):
    return subprocess.run([str(bundle.path / bundle.manifest["runner"]["executable"]), str(bundle.path), *args],
                          capture_output=True, env={"PATH": "/usr/bin:/bin"}, **kw)


def test_the_runner_is_a_checksummed_bundle_file_and_needs_no_python(native_bundle):
    runner = native_bundle.manifest["runner"]
    assert {runner["executable"], *runner["libraries"]} <= set(native_bundle.manifest["files"])
    load(native_bundle.path)  # every checksum, the runner's included
    linked = subprocess.run(["ldd", str(native_bundle.path / runner["executable"])], capture_output=True,
                            text=True).stdout
    assert "libtvm_runtime.so => " + str(native_bundle.path / "runner") in linked and "python" not in linked


def test_runner_streams_a_file_like_the_python_session(native_bundle, tmp_path):
    x = np.random.default_rng(3).standard_normal((1, 37, 40), dtype=np.float32)  # 9 chunks of 4, then 1 frame
    x.transpose(1, 0, 2).tofile(tmp_path / "x.f32")
    proc = _run(native_bundle, "--in", str(tmp_path / "x.f32"), "--out", str(tmp_path / "y.f32"), "--chunk", "4",
                "--times", str(tmp_path / "t.json"))
    assert proc.returncode == 0, proc.stderr
    want = Session(native_bundle).run(x, chunk=4)
    delay = native_bundle.manifest["delay"]
    got = np.fromfile(tmp_path / "y.f32", np.float32).reshape(37 + delay, 24)[delay:]
    np.testing.assert_array_equal(got, np.concatenate([want["logits"][0], want["mean_logits"][0]], axis=1))
    times = json.loads((tmp_path / "t.json").read_text())
    assert times["frames"] == [4] * 9 + [1, 0] and len(times["call_ns"]) == 11 and min(times["call_ns"]) > 0
    assert times["peak_rss_bytes"] > 0 and 0 < times["load_seconds"] <= times["first_output_seconds"]


def test_runner_refuses_a_modified_library_an_edited_manifest_and_nan_frames(native_bundle, tmp_path):
    x = tmp_path / "x.f32"
    np.zeros((8, 1, 40), np.float32).tofile(x)
    bad = tmp_path / "bad"
    shutil.copytree(native_bundle.path, bad)
    with open(bad / "model.so", "ab") as f:
        f.write(b"\0")
    proc = subprocess.run([str(native_bundle.path / "runner/edgekit-run"), str(bad), "--in", str(x)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "model.so was modified after compilation" in proc.stderr
    shutil.copyfile(native_bundle.path / "model.so", bad / "model.so")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "delay": manifest["delay"] - 1}))
    proc = subprocess.run([str(native_bundle.path / "runner/edgekit-run"), str(bad), "--in", str(x)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "the manifest was edited" in proc.stderr
    nan = np.zeros((8, 1, 40), np.float32)
    nan[5, 0, 3] = np.nan
    nan.tofile(x)
    proc = _run(native_bundle, "--in", str(x), text=True)
    assert proc.returncode == 2 and "frame 5 holds NaN or Inf" in proc.stderr


def test_validate_through_the_native_runner(native_bundle, tmp_path):
    report = validate(native_bundle.path, frames=300, chunk=4, report_path=tmp_path / "v.json", runner="native")
    assert report["passed"] and report["execution"] == "native runner" and report["runner"] == "native"
    assert report["outputs"]["logits"]["max_abs_error"] < 1e-5
    session = NativeSession(native_bundle)
    x = np.random.default_rng(0).standard_normal((1, 12, 40), dtype=np.float32)
    np.testing.assert_array_equal(session.run(x, 4)["logits"], Session(native_bundle).run(x, 4)["logits"])
    assert [f for f, _ in session.times] == [4, 4, 4, 0]
    with pytest.raises(Exception, match="flushed"):
        session.flush()
    session.close()


def test_a_bundle_without_runner_says_how_to_add_it(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="edgekit runner"):
        validate(tiny_bundle.path, frames=8, report_path=tmp_path / "v.json", runner="native")


@pytest.mark.slow
def test_emulated_rpi5_runner_validates_and_an_emulated_board_reports_over_rpc(tmp_path):
    from test_report import _free_port, serve, stop

    bundle = add_runner(compile("lmuformer", "rpi5", tmp_path / "lmu-rpi5", config="tiny", chunks=(1, 4)).path)
    checked = validate(bundle.path, frames=200, chunk=4, runner="native")
    assert checked["passed"] and "qemu-aarch64" in checked["execution"]
    port = _free_port()
    server = serve(*emulator.python_command(emulator.prepare()), port=port)
    try:
        result = report(bundle.path, tmp_path / "rep", calls=4, warmup=1, rpc=f"127.0.0.1:{port}")
    finally:
        stop(server)
    assert [r["engine"] for r in result["runs"]] == ["rpc", "rpc"] and result["machine"]["arch"] == "aarch64"
    assert result["machine"]["emulated"] and "not board timings" in (tmp_path / "rep/report.md").read_text()


def test_a_manifest_pointing_the_runner_outside_the_bundle_is_refused(native_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(native_bundle.path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["runner"]["executable"] = "../../bin/sh"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a plain relative path"):
        NativeSession(load(bad))
