"""Property-based: whatever a manifest, a checkpoint or a WAV header holds, edgekit answers with one clear error
(an EdgekitError, which the CLI prints without a traceback), writes nothing outside the bundle and loses no file."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit import artifact
from edgekit.audio import WavReader
from edgekit.checkpoint import read_state_dict
from edgekit.errors import EdgekitError
from edgekit.runtime import Session

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=8)
FIELDS = ["schema", "files", "library", "unit", "entries", "state", "delay", "batch", "input", "outputs", "model",
          "target", "golden", "running_means"]
PATHS = st.sampled_from(["model.so", "/etc/passwd", "../x", "onnx/../../y", "", ".", "a\\b", "weights.pt/"])
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return tiny_bundle.path, root


def _mutated(pristine, change) -> tuple:
    src, root = pristine
    work = root / "case"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    manifest = json.loads((work / "manifest.json").read_text())
    change(manifest)
    (work / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "case" not in p.parts}
    return work, root, before


DELETED = object()


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values | PATHS | st.just(DELETED))
def test_any_manifest_field_value_gives_a_clear_error_or_a_working_bundle(pristine, field, value):
    change = (lambda m: m.pop(field)) if value is DELETED else (lambda m: m.__setitem__(field, value))
    work, root, before = _mutated(pristine, change)
    try:
        Session(artifact.load(work)).run(__import__("numpy").zeros((1, 8, 40), "float32"))
    except EdgekitError:
        pass
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "case" not in p.parts}
    assert after == before  # nothing outside the bundle was written


@SETTINGS
@given(path=PATHS, digest=st.text(max_size=70))
def test_any_files_entry_gives_a_clear_error(pristine, path, digest):
    work, _, _ = _mutated(pristine, lambda m: m["files"].__setitem__(path, digest))
    try:
        artifact.load(work)
    except EdgekitError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_any_checkpoint_bytes_give_a_clear_error(tmp_path, data):
    path = tmp_path / "ck.pt"
    path.write_bytes(data)
    try:
        read_state_dict(path)
    except EdgekitError:
        pass


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(channels=st.sampled_from([1, 2]) | st.integers(0, 65535),
       rate=st.sampled_from([16000, 22050]) | st.integers(0, 2**32 - 1),
       width=st.sampled_from([1, 2, 3, 4]) | st.integers(0, 65535),
       fmt=st.sampled_from([1, 3, 0xFFFE]) | st.integers(0, 65535), body=st.binary(max_size=200),
       cut=st.integers(0, 300))
def test_any_wav_header_gives_a_clear_error_or_samples(tmp_path, channels, rate, width, fmt, body, cut):
    header = (b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt " +
              struct.pack("<IHHIIHH", 16, fmt, channels, rate, rate * channels * width % 2**32,
                          channels * width % 2**16, 8 * width % 2**16) + b"data" + struct.pack("<I", len(body)))
    path = tmp_path / "a.wav"
    path.write_bytes((header + body)[:len(header) + len(body) - cut] if cut else header + body)
    try:
        with WavReader(path) as r:
            for _ in r.blocks():
                pass
    except EdgekitError:
        pass
