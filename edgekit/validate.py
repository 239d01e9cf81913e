"""Validate stage: stream a bundle over T frames and compare every output frame with the PyTorch parallel
reference, computed in float64 window by window so that memory stays flat however long the stream is."""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.artifact import Bundle, load
from edgekit.errors import EdgekitError
from edgekit.runtime import Session

WINDOW = 4096  # frames of reference computed per forward call


class FrameSource:
    """Deterministic random input frames, addressable by index range without holding the whole stream."""

    def __init__(self, features: int, seed: int, block: int = WINDOW):
        self.features, self.seed, self.block = features, seed, block

    def frames(self, start: int, stop: int, batch: int = 1) -> np.ndarray:
        blocks = range(start // self.block, (stop - 1) // self.block + 1) if stop > start else []
        data = np.concatenate([np.random.default_rng([self.seed, b]).standard_normal(
            (batch, self.block, self.features), dtype=np.float32) for b in blocks], axis=1) if blocks else \
            np.zeros((batch, 0, self.features), np.float32)
        first = (start // self.block) * self.block
        return data[:, start - first:stop - first]


def reference_model(bundle: Bundle):
    """The PyTorch model a bundle was compiled from, in float64, rebuilt from the weights it carries."""
    import torch

    from edgekit import models

    m = bundle.manifest["model"]
    net = models.family(m["family"]).cls(**m["config"])
    net.load_state_dict(torch.load(bundle.path / m["weights"], map_location="cpu", weights_only=True))
    return net.double().eval()


class Reference:
    """Per-frame reference outputs for any frame range, computed in float64 with enough past context.

    Models with a finite horizon are recomputed over [start - horizon, stop + delay); running means are then
    accumulated here across ranges, so they cover the whole stream exactly as the step's running means do.
    """

    def __init__(self, bundle: Bundle, source: FrameSource, total: int):
        self.net, self.source, self.total = reference_model(bundle), source, total
        self.delay, self.horizon = bundle.manifest["delay"], bundle.manifest["horizon"]
        self.running_means = bundle.manifest["running_means"]
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0
        if self.horizon is None and total > WINDOW * 16:
            raise EdgekitError(f"the {self.net.family} reference has no finite horizon; {total} frames would be "
                               "recomputed in one piece", f"validate with --frames {WINDOW * 16} or fewer")

    def outputs(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Reference outputs for frames [start, stop); calls must come in order, without gaps."""
        import torch

        lo = 0 if self.horizon is None else max(0, start - self.horizon)
        hi = min(self.total, stop + self.delay)
        x = torch.from_numpy(self.source.frames(lo, hi)).double()
        with torch.no_grad():
            y = {k: v.numpy()[:, start - lo:stop - lo] for k, v in self.net.forward_frames(x).items()}
        for name, src in self.running_means.items():
            csum = self.sums.get(src, 0) + np.cumsum(y[src], axis=1)
            counts = np.arange(self.count + 1, self.count + stop - start + 1).reshape(1, -1, *[1] * (y[src].ndim - 2))
            y[name] = csum / counts
            self.sums[src] = csum[:, -1:]
        self.count += stop - start
        return y


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def validate(bundle_path: Path, frames: int = 10_000, chunk: int = 1, seed: int = 0, atol: float = 1e-4,
             rtol: float = 1e-3, progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Stream the bundle over `frames` frames against the float64 reference; return (and save) the report.

    Pass criteria: every output's max abs error <= atol, or its error relative to the reference's magnitude
    <= rtol; and resident memory at T within 5 MiB of that at T/10 (the stream keeps constant memory)."""
    if frames < 1:
        raise EdgekitError(f"--frames must be positive, got {frames}")
    bundle = load(bundle_path)
    session = Session(bundle)
    source = FrameSource(session.input_size, seed)
    ref = Reference(bundle, source, frames)
    delay, batch = session.delay, session.batch
    buckets = 10
    err = {o: np.zeros(buckets) for o in session.outputs}
    ref_peak = {o: 0.0 for o in session.outputs}
    rss, t0 = {}, time.perf_counter()

    def compare(got: dict[str, np.ndarray], start: int) -> None:
        stop = start + next(iter(got.values())).shape[1]
        want = ref.outputs(start, stop)
        for o in session.outputs:
            diff = np.abs(got[o].astype(np.float64) - want[o]).max(axis=tuple(i for i in range(want[o].ndim) if i != 1))
            bucket = (np.arange(start, stop) * buckets) // frames
            np.maximum.at(err[o], bucket, diff)
            ref_peak[o] = max(ref_peak[o], float(np.abs(want[o]).max()))

    def compare_emitted(got: dict[str, np.ndarray]) -> None:
        nonlocal next_frame
        n, keep = next(iter(got.values())).shape[1], max(0, -next_frame)  # the first `delay` calls emit nothing
        if n > keep:
            compare({o: v[:, keep:] for o, v in got.items()}, next_frame + keep)
        next_frame += n

    next_frame = -delay
    window = max(chunk, (WINDOW // chunk) * chunk)
    for start in range(0, frames, window):
        stop = min(frames, start + window)
        compare_emitted(session.feed(source.frames(start, stop, batch), chunk))
        for mark in (frames // 10, frames):
            if start < mark <= stop:
                rss[mark] = rss_bytes()
        progress(stop, frames)
    if delay:
        compare_emitted(session.flush())
    elapsed = time.perf_counter() - t0
    outputs = {o: {"max_abs_error": float(err[o].max()), "reference_max_abs": ref_peak[o],
                   "max_rel_error": float(err[o].max() / max(ref_peak[o], 1e-30)),
                   "error_by_decile": [float(e) for e in err[o]]} for o in session.outputs}
    rss_growth = rss[frames] - rss[frames // 10] if frames // 10 in rss else 0
    checks = {
        **{f"{o}_error": r["max_abs_error"] <= atol or r["max_rel_error"] <= rtol for o, r in outputs.items()},
        "constant_memory": rss_growth <= 5 * 2**20,
    }
    report = {
        "bundle": str(bundle.path), "target": bundle.target["name"], "frames": frames, "chunk": chunk,
        "seed": seed, "reference": "PyTorch parallel forward, float64, windowed over the model's horizon",
        "tolerance": {"atol": atol, "rtol": rtol, "rss_growth_bytes": 5 * 2**20},
        "outputs": outputs,
        "state_bytes": bundle.manifest["state_bytes"],
        "rss_bytes": {"at_T/10": rss.get(frames // 10), "at_T": rss.get(frames), "growth": rss_growth,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "seconds": round(elapsed, 2),
        "checks": checks,
        "passed": all(checks.values()),
    }
    bundle.record("validation.json", report)
    return report

