"""Bundles that cannot be turned against their user: --force deletes only provable bundles, the manifest names
only files inside the bundle with their checksums, the library carries its own interface, reports never follow a
symlink and a read-only bundle loses no results."""
from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit import artifact
from edgekit.cli import main
from edgekit.compile import compile
from edgekit.errors import BundleError
from edgekit.runtime import Session
from edgekit.validate import validate


def edited(src, dst, change) -> str:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return str(dst)


def test_force_never_deletes_a_folder_that_is_not_a_bundle(tmp_path):
    """A folder with a manifest.json of another program and the user's sources is kept, even with --force."""
    w = tmp_path / "w"
    (w / "src").mkdir(parents=True)
    (w / "manifest.json").write_text('{"name": "app"}')
    (w / "src" / "main.js").write_text("code")
    r = CliRunner().invoke(main, ["compile", "lmuformer", "--config", "tiny", "-o", str(w), "--force"])
    assert r.exit_code == 2 and "not an edgekit bundle" in " ".join(r.output.split()), r.output
    assert (w / "src" / "main.js").read_text() == "code"


def test_force_keeps_a_bundle_holding_a_users_file(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    (b / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not an edgekit bundle"):
        artifact.check_destination(b, force=True)
    (b / "notes.txt").unlink()
    (b / "validation.json").write_text("{}")  # edgekit's own report may go with the bundle
    artifact.check_destination(b, force=True)


@pytest.mark.parametrize("field,value", [
    ("library", "/tmp/evil.so"), ("library", "../model.so"), ("weights", "../../x.pt"), ("files", "/etc/passwd"),
])
def test_manifest_paths_outside_the_bundle_are_refused(tiny_bundle, tmp_path, field, value):
    def change(m):
        if field == "weights":
            m["model"]["weights"] = value
        elif field == "files":
            m["files"][value] = "0" * 64
        else:
            m[field] = value

    bundle = edited(tiny_bundle.path, tmp_path / "b", change)
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle"):
        artifact.load(bundle)
    r = CliRunner().invoke(main, ["info", bundle])
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["info", str(tiny_bundle.path)])  # the manifest's own sha256, to compare
    assert r.exit_code == 0 and artifact.file_sha256(tiny_bundle.path / "manifest.json") in r.output


def test_a_library_without_its_checksum_is_never_loaded(tiny_bundle, tmp_path):
    """`"files": {}` plus a corrupted library: refused, by load and by every session (even unverified)."""
    bundle = edited(tiny_bundle.path, tmp_path / "b", lambda m: m.update(files={}))
    (tmp_path / "b" / "model.so").write_bytes(b"\x7fELF corrupted")
    with pytest.raises(BundleError, match="without its checksum"):
        artifact.load(bundle)
    ok = tmp_path / "ok"
    shutil.copytree(tiny_bundle.path, ok)
    loaded = artifact.load(ok)
    (ok / "model.so").write_bytes(b"\x7fELF swapped after the check")  # the worker's time-of-check gap
    with pytest.raises(BundleError, match="model.so was modified"):
        Session(loaded)


def test_a_symlinked_bundle_file_is_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    (b / "weights.pt").rename(tmp_path / "elsewhere.pt")
    os.symlink(tmp_path / "elsewhere.pt", b / "weights.pt")
    with pytest.raises(BundleError, match="symbolic link"):
        artifact.load(b)


def test_an_edited_interface_is_caught_by_the_library(tiny_bundle, tmp_path):
    """delay 5 -> 2 in the manifest: the library's own interface digest disagrees, sessions and bench refuse."""
    bundle = edited(tiny_bundle.path, tmp_path / "b", lambda m: m.update(delay=2))
    with pytest.raises(BundleError, match="interface .* is not the one compiled into its library"):
        Session(bundle).run(np.zeros((1, 50, 40), np.float32))
    r = CliRunner().invoke(main, ["bench", bundle, "--calls", "5", "--engine", "tvm"])
    assert r.exit_code == 2 and "manifest was edited" in r.output


def test_old_schema_is_refused_clearly(tiny_bundle, tmp_path):
    bundle = edited(tiny_bundle.path, tmp_path / "b", lambda m: m.update(schema=1))
    with pytest.raises(BundleError, match="schema 1, this edgekit reads 2"):
        artifact.load(bundle)
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        artifact.load(bundle)


def test_reports_replace_a_symlink_instead_of_following_it(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, b)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (b / "validation.json").unlink(missing_ok=True)  # an earlier test may have validated the shared bundle
    os.symlink(victim, b / "validation.json")
    report = validate(b, frames=50)
    assert victim.read_text() == "precious" and not (b / "validation.json").is_symlink()
    assert (json.loads((b / "validation.json").read_text())["frames"] == 50
            and report["report"] == str(b / "validation.json"))


def test_a_read_only_bundle_keeps_its_results(tiny_bundle, tmp_path, monkeypatch):
    """Writing the report fails (EROFS, injected: root ignores permissions): the results are printed, with a
    warning and --report; --report PATH writes them elsewhere."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(artifact.tempfile, "mkstemp", read_only)
    r = CliRunner().invoke(main, ["validate", str(tiny_bundle.path), "--frames", "50"])
    assert r.exit_code == 0 and "pass logits_error" in r.output, r.output
    assert "could not write" in r.output and "Read-only file system" in r.output and "--report" in r.output
    monkeypatch.undo()
    out = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["validate", str(tiny_bundle.path), "--frames", "50", "--report", str(out)])
    assert r.exit_code == 0 and json.loads(out.read_text())["frames"] == 50


def test_killed_compiles_leave_no_debris(tmp_path):
    stale = tmp_path / ".b.partial-999999999"  # a PID that no process has
    stale.mkdir()
    (stale / "model.so").write_bytes(b"half")
    compile("lmuformer", "host", tmp_path / "b", config="tiny", chunks=(1,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_non_finite_frames_are_refused_unless_allowed_and_then_propagate(tiny_bundle):
    """A NaN frame is refused with the state kept; allowed, it makes every later output NaN, as PyTorch's own
    streaming step does (the parallel offline form spreads it over the whole sequence instead)."""
    import torch

    from edgekit.models import from_bundle

    x = np.random.default_rng(0).standard_normal((1, 60, 40)).astype(np.float32)
    session = Session(tiny_bundle)
    before = session.feed(x[:, :20])
    bad = x[:, 20:21].copy()
    bad[0, 0, 3] = np.nan
    with pytest.raises(Exception, match="NaN or Inf; the call was refused"):
        session.step(bad)
    after = session.feed(x[:, 20:])  # the refused call left no trace: the stream continues as if never made
    clean = Session(tiny_bundle).run(x)
    np.testing.assert_allclose(np.concatenate([before["logits"], after["logits"]], 1)[:, 5:], clean["logits"][:, :55],
                               atol=1e-6)
    y = x.copy()
    y[0, 20, 3] = np.nan
    got = Session(tiny_bundle, allow_nonfinite=True).run(y)["logits"][0]
    with torch.no_grad():
        want = from_bundle(tiny_bundle).float().stream(torch.from_numpy(y))["logits"][0].numpy()
    assert np.array_equal(np.isnan(got).any(-1), np.isnan(want).any(-1)) and np.isnan(got[-1]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in dot")  # pytest resets the session module's filter
def test_frames_written_into_the_sessions_own_buffer_step_without_a_copy_and_are_checked_alike(tiny_bundle):
    x = np.random.default_rng(1).standard_normal((1, 12, 40)).astype(np.float32)
    want = Session(tiny_bundle).feed(x)["logits"]
    session = Session(tiny_bundle)
    buffer = session.input_buffer(1)
    got = []
    for t in range(12):
        buffer[...] = x[:, t:t + 1]
        got.append(session.step(buffer)["logits"].copy())
    np.testing.assert_array_equal(np.concatenate(got, 1), want)
    buffer[0, 0, 7] = -np.inf
    with pytest.raises(Exception, match="frame 0 of this call holds NaN or Inf"):
        session.step(buffer)
    with pytest.raises(Exception, match="no entry for chunks of 3 frames"):
        session.input_buffer(3)


def test_session_misuse_is_one_clear_error(tiny_bundle):
    session = Session(tiny_bundle)
    with pytest.raises(Exception, match="at least one frame"):
        session.step(np.zeros((1, 0, 40), np.float32))
    with pytest.raises(Exception, match="chunk must be at least 1"):
        session.feed(np.zeros((1, 4, 40), np.float32), chunk=0)
    assert session.run(np.zeros((1, 0, 40), np.float32))["logits"].shape == (1, 0, 12)
    session.reset()
    session.feed(np.zeros((1, 8, 40), np.float32))
    session.flush()
    with pytest.raises(Exception, match="flushed"):
        session.step(np.zeros((1, 1, 40), np.float32))
    with pytest.raises(Exception, match="flushed"):
        session.flush()
    session.reset()
    session.step(np.zeros((1, 1, 40), np.float32))


@pytest.mark.parametrize("args,message", [
    (["validate", "{b}", "--chunk", "0"], "must be positive"),
    (["validate", "{b}", "--chunk", "-3"], "must be positive"),
    (["validate", "{b}", "--frames", "3", "--chunk", "4"], "never calls the chunk-4 entry"),
    (["validate", "{b}", "--atol", "nan"], "--atol and --rtol must be >= 0"),
    (["validate", "{b}", "--atol", "-1"], "--atol and --rtol must be >= 0"),
    (["validate", "{b}", "--segments", "3"], "segments: not an option of frame-streaming models"),
    (["compile", "lmuformer", "--config", "tiny", "--chunk", "100000", "-o", "{t}/x"], "over 1024 frames"),
    (["compile", "lmuformer", "--config", "tiny", "-o", "{t}/file/sub"], "cannot write the bundle"),
    (["compile", "lmuformer", "--checkpoint", "{t}/empty.pt", "-o", "{t}/y"], "cannot read checkpoint"),
    (["generate", "--temperature", "nan", "--config", "tiny"], "--temperature"),
    (["stream", "--wav", "{t}/a.wav", "--threshold", "-1"], "threshold"),
    (["stream", "--wav", "{t}/a.wav", "--repeat", "0"], "repeat"),
    (["bench", "{b}", "--calls", "0"], "calls"),
])
def test_bad_input_is_one_clear_error(tiny_bundle, tmp_path, args, message):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "empty.pt").write_bytes(b"")
    args = [a.format(b=tiny_bundle.path, t=tmp_path) for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_checkpoint_with_nan_weights_is_named(tmp_path):
    import torch

    from edgekit.errors import CheckpointError
    from edgekit.models import build

    sd = build("lmuformer", "tiny").state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() == 2)
    sd[key][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"NaN or Inf weights in {key}"):
        build("lmuformer", checkpoint=tmp_path / "nan.pt")


def test_disk_full_during_compile_leaves_nothing(tmp_path, monkeypatch):
    import torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    r = CliRunner().invoke(main, ["compile", "lmuformer", "--config", "tiny", "--chunk", "1", "-o",
                                  str(tmp_path / "b")])
    assert r.exit_code == 2 and "No space left on device" in r.output and "nothing was written" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_validation_reads_memory_at_two_points_of_a_short_stream(tiny_bundle):
    report = validate(tiny_bundle.path, frames=300, chunk=4)
    assert "constant_memory" in report["checks"]
    assert report["rss_bytes"]["at_T/10"] is not None and report["rss_bytes"]["growth"] is not None


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_compile_says_so_and_leaves_nothing(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "compile", "lmuformer", "--config", "tiny", "-o",
                             str(tmp_path / "b")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".b.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 143) and "Traceback" not in err, err
    assert "interrupted; nothing was written" in err or sig == "SIGTERM"
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_is_one_clear_error(tmp_path, monkeypatch):
    from pathlib import Path

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    r = CliRunner().invoke(main, ["compile", "lmuformer", "--config", "tiny", "-o", str(tmp_path / "ro" / "b")])
    assert r.exit_code == 2 and "Read-only file system" in r.output and "Traceback" not in r.output, r.output


def test_a_manifest_config_that_builds_no_model_is_one_clear_error(tiny_bundle, tmp_path):
    bundle = edited(tiny_bundle.path, tmp_path / "b", lambda m: m["model"]["config"].update(wings=2))
    r = CliRunner().invoke(main, ["validate", bundle, "--frames", "20"])
    assert r.exit_code == 2 and "does not build a lmuformer" in " ".join(r.output.split()), r.output


def test_a_prompt_that_is_not_utf8_reaches_the_model_as_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    r = CliRunner().invoke(main, ["generate", "--config", "tiny", "--engine", "pytorch", "--tokens", "3",
                                  "--prompt", "caf\udce9"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_a_corrupted_cached_bundle_is_rebuilt(tmp_path, monkeypatch):
    from edgekit.apps.cache import host_bundle

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    first = host_bundle("lmuformer", config="tiny", chunks=(1,))
    (first.path / "model.so").write_bytes(b"corrupted")
    said = []
    again = host_bundle("lmuformer", config="tiny", progress=said.append, chunks=(1,))
    assert again.path == first.path and any("rebuilding" in s for s in said)
    Session(again).step(np.zeros((1, 1, 40), np.float32))
