"""`edgekit report`: runs per engine and chunk size in report.json, a Markdown page and PNG plots; it never writes
over what is not its own and never times a bundle under emulation."""
import json
import shutil

import pytest

from edgekit.errors import EdgekitError
from edgekit.report import report
from edgekit.runner import add_runner


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
        assert r["peak_rss_bytes"] > 10 * 2**20 and r["rss_bytes"] and r["init_seconds"] > 0
    assert saved["machine"]["logical_cpus"] >= 1 and saved["machine"]["pinned_to_cpus"]
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
