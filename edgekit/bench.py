"""Bench stage: latency of the same streaming entries in PyTorch eager, ONNX Runtime and the TVM bundle, on the
same inputs after warm-up, one thread count for all; what is timed per call is the bundle's unit's (a frame
model per frame and chunk size, a segment LM per byte of its segment step, decode step and generation)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgekit import units
from edgekit.artifact import load, load_library
from edgekit.engines import torch_flushes_denormals, use_threads
from edgekit.units import BenchOptions


DENORMALS = {"tvm": "flushed to zero in every kernel (the library saves and restores the caller's mode)",
             "onnxruntime": "session.set_denormal_as_zero", "pytorch": "torch.set_flush_denormal(True)"}


def bench(bundle_path: Path, options: BenchOptions | None = None, progress: Callable[[str], None] = lambda m: None,
          report_path: Path | None = None, **fields) -> dict:
    """Latency per engine; saved as bench.json in the bundle (or at `report_path`). `options` (or its fields: calls, warmup, engines,
    seed, threads) say how much to time, which engines, and one thread count for all (None: each engine's own)."""
    bundle = load(bundle_path)  # for another machine: refused, emulated timings would mislead
    load_library(bundle)  # a library that fails its checks fails here, before any engine is timed
    options = options if options is not None else BenchOptions(**fields)
    counts = use_threads(options.threads)

    def torch_model():
        from edgekit import models

        return models.from_bundle(bundle).float()

    m = bundle.manifest
    with torch_flushes_denormals():
        timed = units.of(bundle).bench(bundle, options, torch_model, progress)
    report = {"bundle": str(bundle.path), "target": m["target"]["name"], "model": m["model"]["family"],
              "threads": counts, "denormals": DENORMALS, **timed}
    return bundle.save_report("bench.json", report, report_path)
