"""Units as plugins: a model family is one file (a toy family registered here goes through every stage), every
registered family compiles and validates, sessions of any unit open without torch or TVM's compiler, the core
names no model, and CLI output survives a pipe."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgekit import models, units
from edgekit.bench import bench
from edgekit.compile import compile
from edgekit.streaming import StreamingModel
from edgekit.validate import validate

ROOT = Path(__file__).resolve().parents[1]


class Leaky(StreamingModel):
    """A toy frame model that is not in models/: a leaky integrator of projected frames, read out linearly."""

    family = "leaky-toy"
    running_means = {"mean_logits": "logits"}

    def __init__(self, input_size: int = 6, hidden: int = 8, classes: int = 3, decay: float = 0.9):
        super().__init__()
        self.input_size, self.hidden, self.classes, self.decay = input_size, hidden, classes, decay
        self.output_sizes = {"logits": (classes,)}
        self.inp, self.out = nn.Linear(input_size, hidden), nn.Linear(hidden, classes)

    def config(self) -> dict:
        return dict(input_size=self.input_size, hidden=self.hidden, classes=self.classes, decay=self.decay)

    def frame_state_shapes(self):
        return {"h": ((self.hidden,), "float32")}

    def forward_frames(self, x):
        u, h, ys = self.inp(x), torch.zeros(x.shape[0], self.hidden, dtype=x.dtype), []
        for t in range(x.shape[1]):
            h = self.decay * h + u[:, t]
            ys.append(self.out(h))
        return {"logits": torch.stack(ys, 1)}

    def advance_frame(self, x_t, state, drained, frames):
        state["h"] = self.decay * state["h"] + self.inp(x_t)
        return {"logits": self.out(state["h"])}, state


def test_a_family_outside_models_goes_through_every_stage(tmp_path, monkeypatch):
    """Registered at test time, without touching edgekit/: compile, validate (error and memory checks), bench."""
    monkeypatch.setitem(models.FAMILIES, "leaky-toy", models.Family(
        "leaky-toy", Leaky, "frame", {"tiny": {}}, "a toy leaky integrator", lambda sd: {}))
    bundle = compile("leaky-toy", "host", tmp_path / "toy", config="tiny", chunks=(1, 4))
    assert bundle.manifest["unit"] == "frame" and set(bundle.manifest["entries"]) == {"step", "chunk4"}
    report = validate(bundle.path, frames=600, chunk=4)
    assert report["passed"] and {"logits_error", "mean_logits_error", "constant_memory"} <= set(report["checks"])
    assert (report["outputs"]["logits"]["max_abs_error"] < 1e-5
            and report["outputs"]["logits"]["reference_max_abs"] > 0.1)
    timed = bench(bundle.path, calls=20, warmup=2, threads=1)
    assert {r["engine"] for r in timed["results"]} == {"pytorch", "onnxruntime", "tvm", "tvm-compute"}


def _smallest(fam: models.Family) -> str:
    return min(fam.configs, key=lambda c: sum(p.numel() for p in fam.cls(**fam.configs[c]).parameters()))


SHORT = {"frame": dict(frames=300), "segment": dict(segments=6, decode_segments=1),  # a short stream per unit
         "memory": dict(documents=4, document_segments=2)}


@pytest.mark.parametrize("family", list(models.FAMILIES))
def test_every_family_compiles_and_validates(family, tmp_path):
    fam = models.family(family)
    chunks = {"chunks": (1, 4)} if fam.unit == "frame" else {}  # a spiking step unrolled 16 times compiles for a minute
    bundle = compile(family, "host", tmp_path / family, config=_smallest(fam), **chunks)
    report = validate(bundle.path, **SHORT[fam.unit])
    assert report["passed"], report["checks"]


RUNTIME_ONLY = """
import sys, numpy as np, edgekit
frame, segment = edgekit.Session(sys.argv[1]), edgekit.Session(sys.argv[2])
frame.step(np.zeros((1, 1, frame.input_size), np.float32))
segment.score(np.zeros(2 * segment.bundle.manifest["segment"], np.int64))
segment.feed(np.array([1, 2, 3]))
heavy = [m for m in ("torch", "onnx", "onnxruntime", "tvm", "tvm.relax", "tvm.s_tir", "edgekit.pipeline",
                     "edgekit.models", "rich") if m in sys.modules]
print("imported:", heavy)
"""


def test_sessions_of_every_unit_run_without_torch_or_the_compiler(tiny_bundle, tiny_segment_bundle):
    """`edgekit.Session` opens a frame bundle and a segment bundle in a fresh process and streams through both;
    neither torch, onnx nor TVM's compiler (the `tvm` package itself loads it) was ever imported."""
    segment = tiny_segment_bundle
    out = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(tiny_bundle.path), str(segment.path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "imported: []", out


CORE = [p for p in (ROOT / "edgekit").rglob("*.py") if "apps" not in p.parts and p.name != "cli.py"]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_names_no_model_or_app(path):
    """Stages, units and runtime speak of units and families, never of HMT, Aaren or keyword spotting."""
    found = re.findall(r"hmt|aaren|keyword|kws|spotting", path.read_text(), flags=re.IGNORECASE)
    assert not found, f"{path.name} names {sorted(set(found))}"


def test_no_import_cycles():
    out = subprocess.run([sys.executable, str(ROOT.parent / "shared" / "tools" / "import_cycles.py"), str(ROOT)],
                         capture_output=True, text=True)
    if out.returncode == 2 or "No such file" in out.stderr:
        pytest.skip("the import-cycle tool is not beside this checkout")
    assert "cycle" not in out.stdout.replace("0 cycles", ""), out.stdout


def test_unit_options_refuse_another_units_options():
    with pytest.raises(Exception, match="frames: not an option of segment-streaming models"):
        units.get("segment").validate_options(frames=10)
    with pytest.raises(Exception, match="chunks: not an option of segment-streaming models"):
        units.get("segment").export_options(chunks=(1, 4))
    assert units.get("frame").validate_options(frames=7).frames == 7


def test_tables_are_never_cut_when_piped(monkeypatch):
    """However wide the figures get, a piped table keeps every header and number whole."""
    from edgekit import cli

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    console = cli._console()
    row = {"frames_per_call": 16, "p50_us": 1.23456789e11, "p90_us": 2e11, "p99_us": 9.87654321e12,
           "max_us": 1e13, "frames_per_second": 1e-7, "real_time_factor": 1.2345e7}
    report = {"model": "m" * 60, "target": "t" * 40, "hop_ms": 10.0, "threads": {"tvm": 1}, "denormals": {},
              "bundle": "/a/very/long/path/" + "x" * 150, "report": "/a/very/long/path/" + "x" * 150 + "/bench.json",
              "results": [{"engine": e, **row} for e in ("pytorch", "onnxruntime", "tvm", "tvm-compute")]}
    for piece in units.get("frame").render_bench(report):
        console.print(piece)
    text = sys.stdout.getvalue()
    assert "…" not in text and "tvm-compute" in text and "9876543210000.0" in text and "x" * 150 in text


def test_cli_json_and_piped_progress(tiny_bundle):
    """--json prints one JSON object on stdout; progress goes to stderr, one line per stage when piped."""
    cmd = [sys.executable, "-m", "edgekit"]
    r = subprocess.run([*cmd, "validate", str(tiny_bundle.path), "--frames", "200", "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["frames"] == 200 and "streaming" in r.stderr
    r = subprocess.run([*cmd, "info", str(tiny_bundle.path), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)["unit"] == "frame"
    r = subprocess.run([*cmd, "targets"], capture_output=True, text=True, check=True)
    assert "…" not in r.stdout and "aarch64-linux-gnu-gcc" in r.stdout


BOARD = """
import importlib.abc, sys

class NoCompiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxruntime", "onnxscript", "snntorch"):
            raise ImportError(f"No module named {name!r} (a board: runtime install only)")

sys.meta_path.insert(0, NoCompiler())
"""


def test_a_board_without_torch_validates_benches_and_describes_bundles_of_every_unit(tiny_bundle, tiny_segment_bundle,
                                                                                     tmp_path):
    """The runtime-only install a board has, made real: torch, onnx and ONNX Runtime cannot be imported at all.
    `edgekit validate` compares with the golden record, `bench --engine tvm` and `info` work, for both units."""
    segment = tiny_segment_bundle
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BOARD)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    run = lambda *args: subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True,  # noqa: E731
                                       text=True, env=env)
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "runtime install only" in probe.stderr
    for bundle in (tiny_bundle.path, segment.path):
        r = run("validate", str(bundle), "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["passed"] and "golden record" in report["reference"]
        r = run("bench", str(bundle), "--engine", "tvm", "--calls", "20", "--warmup", "2", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["results"], r.stderr
        assert run("info", str(bundle)).returncode == 0
