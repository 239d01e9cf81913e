"""`edgekit report`: runs per engine and chunk size in report.json, a Markdown page and PNG plots; it never writes
over what is not its own and never times a bundle under emulation."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from edgekit.report import report
from edgekit.runner import add_runner

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def native_bundle(tiny_bundle, tmp_path_factory):
    copy = tmp_path_factory.mktemp("report") / "lmu-tiny"
    shutil.copytree(tiny_bundle.path, copy)
    return add_runner(copy)


def test_report_times_both_engines_and_writes_json_markdown_and_plots(native_bundle, tmp_path):
    out = tmp_path / "rep"
    result = report(native_bundle.path, out, calls=20, warmup=3)
    saved = json.loads((out / "report.json").read_text())
    assert [(r["engine"], r["frames_per_call"]) for r in saved["runs"]] == \
        [("python", 1), ("python", 4), ("native", 1), ("native", 4)]
    for r in saved["runs"]:
        assert r["calls"] == 20 and len(r["call_us"]) == 23 and r["warmup"] == 3
        assert 0 < r["min_us"] <= r["p50_us"] <= r["p99_us"] <= r["p99_9_us"] <= r["max_us"]
        assert r["peak_rss_bytes"] > 4 * 2**20 and r["rss_bytes"] and r["init_seconds"] > 0
    assert saved["machine"]["logical_cpus"] >= 1 and saved["machine"]["pinned_to_cpus"]
    profile = saved["runs"][0]["profile"]  # the Python engine's per-kernel profile
    assert profile and all(not k["function"].startswith("vm.builtin.") and k["calls_per_step"] > 0 for k in profile)
    assert "Per-kernel profile" in (out / "report.md").read_text()
    for png in result["plots"]:
        assert (out / png).read_bytes().startswith(b"\x89PNG")
        assert f"]({png})" in (out / "report.md").read_text()


def test_report_refuses_a_used_directory_and_an_emulated_bundle(native_bundle, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(EdgekitError, match="not an edgekit report"):
        report(native_bundle.path, tmp_path, engines=("native",), calls=1, warmup=0, force=True)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    arm = tmp_path / "arm"
    shutil.copytree(native_bundle.path, arm)
    manifest = json.loads((arm / "manifest.json").read_text())
    manifest["target"] = {**manifest["target"], "arch": "aarch64"}
    (arm / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgekitError, match="this machine is x86_64"):
        report(arm, tmp_path / "rep", calls=1, warmup=0)
    assert not (tmp_path / "rep").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*python: str, port: int) -> subprocess.Popen:
    """An `edgekit serve` on loopback (under `python`: the CLI here, or an emulated Python), once it is ready."""
    code = f"from edgekit.remote import serve; serve('127.0.0.1', {port}, lambda line: print(line, flush=True))"
    proc = subprocess.Popen([*python, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == f"ready on 127.0.0.1:{port}", proc.stderr.read()
    return proc


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    assert server.wait(timeout=60) == 143  # SIGTERM unwinds through the cleanup of session processes


def test_report_over_rpc_on_loopback_and_serve_takes_exactly_its_port(native_bundle, tmp_path):
    port = _free_port()
    server = serve(sys.executable, port=port)
    try:
        taken = subprocess.run([sys.executable, "-m", "edgekit", "serve", "--port", str(port), "--host", "127.0.0.1"],
                               capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
        result = report(native_bundle.path, tmp_path / "rep", calls=8, warmup=2, rpc=f"127.0.0.1:{port}")
    finally:
        stop(server)
    assert [(r["engine"], r["frames_per_call"]) for r in result["runs"]] == [("rpc", 1), ("rpc", 4)]
    assert all(len(r["call_us"]) == 10 and r["p50_us"] > 0 and r["peak_rss_bytes"] > 0 for r in result["runs"])
    assert result["machine"]["rpc"] == f"127.0.0.1:{port}" and not result["machine"]["emulated"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again: nothing of the server is left listening


def test_report_times_a_segment_bundle_per_segment_and_per_token(tiny_segment_bundle, tmp_path):
    """A byte LM's natural calls: its segment step over whole segments, and bytes fed one at a time as generation
    feeds them; both engines, each over one carried stream."""
    result = report(tiny_segment_bundle.path, tmp_path / "rep", calls=12, warmup=2)
    L = tiny_segment_bundle.manifest["segment"]
    assert [(r["engine"], r["call"], r["latency_per"], r["tokens_per_call"]) for r in result["runs"]] == \
        [("python", "segment", "segment", L), ("python", "feed", "token", 1),
         ("native", "segment", "segment", L), ("native", "feed", "token", 1)]
    for r in result["runs"]:
        assert (r["calls"] == 12 and len(r["call_us"]) == 14
                and 0 < r["min_us"] <= r["p50_us"] <= r["p99_us"] <= r["max_us"])
        assert r["peak_rss_bytes"] > 4 * 2**20 and r["rss_bytes"] and "real_time_factor" not in r
    assert all(r["profile"] for r in result["runs"][:2])  # the Python engine's per-kernel profile, both calls
    page = (tmp_path / "rep/report.md").read_text()
    assert f"| native | segment ({L} tokens) | 12 |" in page and "| python | feed (1 token) | 12 |" in page
    assert "RTF" not in page and json.loads((tmp_path / "rep/report.json").read_text())["unit"] == "segment"
