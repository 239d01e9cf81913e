"""The native runner: built into a bundle, it streams frames (or a byte LM's segments and tokens) with TVM's C++
runtime alone, retrieving a memory bundle's blocks from its bank itself, and validates against PyTorch like a
Python session; it refuses modified libraries, edited manifests, modified bank nodes and NaN frames on its own."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from edgekit import Session, emulator, runner
from edgekit.artifact import load
from edgekit.compile import compile
from edgekit.errors import BundleError, EdgekitError
from edgekit.report import report
from edgekit.runner import add_runner
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
    session, python = runner.session(native_bundle), Session(native_bundle)
    x = np.random.default_rng(0).standard_normal((1, 12, 40), dtype=np.float32)
    np.testing.assert_array_equal(session.run(x, 4)["logits"], python.run(x, 4)["logits"])
    assert [(e, f) for e, f, _ in session.worker.times] == [("chunk4", 4)] * 3 + [("flush", 0)]
    state = session.worker("read_state")
    assert all(np.array_equal(state[k], v) for k, v in python.read_state().items())
    with pytest.raises(Exception, match="flushed"):
        session.flush()
    session.worker.close()


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
        runner.session(load(bad))


def test_compile_builds_the_runner_and_it_streams_and_generates_bytes_like_the_python_session(tiny_segment_bundle,
                                                                                              tmp_path):
    """Whole segments through the segment step, the rest fed byte by byte (segment steps while the segment holds
    at most `summary` bytes, decode steps after): the logits of the next byte after each, as the session's; then
    greedy generation, fed back byte by byte."""
    bundle, L = tiny_segment_bundle, tiny_segment_bundle.manifest["segment"]
    built = bundle.manifest["runner"]
    assert {built["executable"], *built["libraries"]} <= set(bundle.manifest["files"])
    text = np.random.default_rng(4).integers(0, 256, 2 * L + 6).astype(np.uint8)
    (tmp_path / "text").write_bytes(text.tobytes())
    proc = _run(bundle, "--in", str(tmp_path / "text"), "--out", str(tmp_path / "y.f32"), "--times",
                str(tmp_path / "t.json"))
    assert proc.returncode == 0, proc.stderr
    session = Session(bundle)
    want = np.concatenate([session.score(text[:2 * L])["logits"].reshape(2 * L, -1),
                           session.feed(text[2 * L:])["logits"][0]])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "y.f32", np.float32).reshape(want.shape), want)
    times = json.loads((tmp_path / "t.json").read_text())
    summary = bundle.manifest["summary"]
    assert times["entry"] == ["segment"] * (2 + summary) + ["decode"] * (6 - summary)
    assert times["tokens"] == [L, L, *range(1, summary + 1), *[1] * (6 - summary)] and min(times["call_ns"]) > 0
    generated = _run(bundle, "--in", str(tmp_path / "text"), "--generate", "12")
    logits, want = want[-1], []
    for _ in range(12):  # greedy, as the runner generates: each byte the arg-max of the logits before it
        want.append(int(np.argmax(logits)))
        logits = session.feed(np.array(want[-1:]))["logits"][0, -1]
    assert generated.returncode == 0 and generated.stdout == bytes(want), generated.stderr


def test_validate_a_segment_bundle_through_the_native_runner(tiny_segment_bundle, tmp_path):
    report = validate(tiny_segment_bundle.path, segments=6, decode_segments=2, report_path=tmp_path / "v.json",
                      runner="native")
    assert report["passed"] and report["execution"] == "native runner"
    assert report["outputs"]["logits"]["max_abs_error"] < 1e-5 and report["next_byte_agreement"] == 1.0
    session, L = runner.session(tiny_segment_bundle), tiny_segment_bundle.manifest["segment"]
    session.feed(np.arange(3))
    with pytest.raises(EdgekitError, match="score takes whole segments of 8 tokens at a segment boundary"):
        session.score(np.arange(L))
    with pytest.raises(EdgekitError, match=r"token id 256 is not in \[0, 256\)"):
        session.feed(np.array([5, 256]))
    session.reset()
    session.score(np.arange(L))
    assert [e for e, _, _ in session.worker.times] == ["segment"] * 4  # the refused calls ran nothing
    python = Session(tiny_segment_bundle)
    python.score(np.arange(L))
    state = session.worker("read_state")  # what a Python segment session holds as its state
    want = {s["name"]: python.engine.vm.numpy(t) for s, t in zip(python.engine.state_specs, python.gen.state)}
    assert all(state[k].dtype == v.dtype and np.array_equal(state[k], v) for k, v in want.items())
    session.worker.close()


def test_a_memory_bundle_retrieves_validates_and_refuses_a_modified_node_natively(tiny_memory_bundle, tmp_path):
    """The runner retrieves a document's block from the bank itself (embedding, tree walk, nodes read one by one
    and checked against their sha256) and streams with it, as the Python session does."""
    bundle, L = tiny_memory_bundle, tiny_memory_bundle.manifest["segment"]
    report = validate(bundle.path, documents=4, document_segments=2, report_path=tmp_path / "v.json", runner="native")
    assert report["passed"] and report["path_agreement"] == 1.0 and report["execution"] == "native runner"
    document = np.random.default_rng(2).integers(0, 256, 3 * L + 5).astype(np.uint8)
    (tmp_path / "doc").write_bytes(document.tobytes())
    proc = _run(bundle, "--in", str(tmp_path / "doc"), "--out", str(tmp_path / "y.f32"))
    assert proc.returncode == 0, proc.stderr
    python = Session(bundle)
    path = python.fetch(document)["path"]
    want = np.concatenate([python.score(document[:3 * L])["logits"].reshape(3 * L, -1),
                           python.feed(document[3 * L:])["logits"][0]])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "y.f32", np.float32).reshape(want.shape), want)
    bad = tmp_path / "bad"
    shutil.copytree(bundle.path, bad)
    with open(bad / "memory/bank.bin", "r+b") as f:
        f.seek(int(path[-1]) * bundle.manifest["memory"]["node_bytes"] + 5)
        f.write(b"\x01")
    session = runner.session(load(bad))
    with pytest.raises(EdgekitError, match=f"node {path[-1]} was modified after compilation"):
        session.fetch(document)
    with pytest.raises(EdgekitError, match="no memory block fetched yet"):
        session.score(document[:L])
    session.worker.close()
