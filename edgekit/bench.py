"""Bench stage: latency of the same streaming entries in PyTorch eager, ONNX Runtime and the TVM bundle, on the
same inputs after warm-up, one thread count for all; what is timed per call is the bundle's unit's (a frame
model per frame and chunk size, a segment LM per byte of its segment step, decode step and generation)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgekit import units
from edgekit.artifact import Bundle, load, load_library
from edgekit.engines import torch_flushes_denormals, use_threads
from edgekit.errors import EdgekitError
from edgekit.units import BenchOptions

ROUNDS = 5  # several bundles are timed in this many rounds, one after the other in each, so they share machine states


DENORMALS = {"tvm": "flushed to zero in every kernel (the library saves and restores the caller's mode)",
             "onnxruntime": "session.set_denormal_as_zero", "pytorch": "torch.set_flush_denormal(True)"}


def bench(bundle_path: Path | Sequence[Path], options: BenchOptions | None = None,
          progress: Callable[[str], None] = lambda m: None, report_path: Path | None = None, **fields) -> dict:
    """Latency per engine; saved as bench.json in the bundle (or at `report_path`). `options` (or its fields: calls,
    warmup, engines, seed, threads) say how much to time, which engines, and one thread count for all (None: each
    engine's own). Several bundles (e.g. fp32 and int8 builds of one model) are timed in interleaved rounds, each
    row the median over rounds, with each bundle's p50 ratio to the first one's, round by round; that report is
    saved in the first bundle."""
    paths = [Path(bundle_path)] if isinstance(bundle_path, (str, Path)) else [Path(p) for p in bundle_path]
    bundles = [load(p) for p in paths]  # for another machine: refused, emulated timings would mislead
    for b in bundles:
        load_library(b)  # a library that fails its checks fails here, before any engine is timed
    if len({units.of(b).name for b in bundles}) > 1:
        raise EdgekitError("bundles of different units time different things", "bench them one at a time")
    options = options if options is not None else BenchOptions(**fields)
    counts = use_threads(options.threads)
    rounds = ROUNDS if len(bundles) > 1 else 1
    each = dataclasses.replace(options, calls=max(1, options.calls // rounds))
    timed = {b.path: [] for b in bundles}
    with torch_flushes_denormals():
        for r in range(rounds):
            for b in bundles:
                say = (progress if rounds == 1
                       else lambda msg, b=b: progress(f"round {r + 1}/{rounds}, {b.path.name}: {msg}"))
                timed[b.path].append(_time(b, each, say))
    first, m = bundles[0], bundles[0].manifest
    report = {**{k: v for k, v in timed[first.path][0].items() if k != "results"},
              "bundle": str(first.path), "target": m["target"]["name"], "model": m["model"]["family"],
              "threads": counts, "denormals": DENORMALS,
              "results": [row for b in bundles for row in _median_rows(timed[b.path])]}
    if len(bundles) > 1:
        report |= {"bundles": [str(b.path) for b in bundles], "rounds": rounds,
                   "ratios": [ratio for b in bundles[1:] for ratio in _ratios(timed[b.path], timed[first.path])]}
    return first.save_report("bench.json", report, report_path)


def _time(bundle: Bundle, options: BenchOptions, progress: Callable[[str], None]) -> dict:
    def torch_model():
        from edgekit import models

        return models.from_bundle(bundle).float()

    timed = units.of(bundle).bench(bundle, options, torch_model, progress)
    for row in timed["results"]:
        row |= {"bundle": str(bundle.path), "precision": bundle.manifest["precision"]}
    return timed


def _median_rows(rounds: list[dict]) -> list[dict]:
    """Each row's numbers as their median over rounds (rows come in the same order every round)."""
    if len(rounds) == 1:
        return rounds[0]["results"]
    merged = []
    for rows in zip(*[r["results"] for r in rounds]):
        merged.append({k: float(np.median([row[k] for row in rows])) if isinstance(v, float) else v
                       for k, v in rows[0].items()})
    return merged


def _ratios(rounds: list[dict], baseline: list[dict]) -> list[dict]:
    """Per engine and call size: this bundle's p50 over the first bundle's, round by round, and their median."""
    out = []
    for rows, base in zip(zip(*[r["results"] for r in rounds]), zip(*[r["results"] for r in baseline])):
        if "p50_us" not in rows[0]:
            continue
        by_round = [row["p50_us"] / b["p50_us"] for row, b in zip(rows, base)]
        out.append({"engine": rows[0]["engine"], "bundle": rows[0]["bundle"], "precision": rows[0]["precision"],
                    "baseline": base[0]["bundle"],
                    "per_call": {k: v for k, v in rows[0].items() if k.endswith("_per_call")},
                    "p50_ratio": float(np.median(by_round)), "p50_ratio_by_round": by_round})
    return out
