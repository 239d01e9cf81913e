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
    os.symlink(victim, b / "validation.json")
    report = validate(b, frames=50)
    assert victim.read_text() == "precious" and not (b / "validation.json").is_symlink()
    assert json.loads((b / "validation.json").read_text())["frames"] == 50 and report["report"] == str(b / "validation.json")


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
