"""What validation and benchmarks measure with, for every unit: deterministic input streams addressable by
index range, the error tally against a reference, resident memory, and latency percentiles. numpy only."""
from __future__ import annotations

import ctypes
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.errors import EdgekitError

WINDOW = 4096  # items (frames, bytes) per seeded block of an input stream, and per reference window
DECILES = 10
RSS_CHANGE_MAX = 5 * 2**20  # resident memory may move this much between T/10 and T


def seeded(seed: int, start: int, stop: int, block: int, draw: Callable[[np.random.Generator], np.ndarray]
           ) -> np.ndarray:
    """Items [start, stop) along axis 1 of a stream drawn block by block from default_rng([seed, block index])."""
    blocks = range(start // block, (stop - 1) // block + 1)
    data = np.concatenate([draw(np.random.default_rng([seed, b])) for b in blocks], axis=1)
    return data[:, start - blocks[0] * block:stop - blocks[0] * block]


class FrameSource:
    """Deterministic random input frames, addressable by index range without holding the whole stream."""

    def __init__(self, features: int, seed: int, block: int = WINDOW):
        self.features, self.seed, self.block = features, seed, block

    def frames(self, start: int, stop: int, batch: int = 1) -> np.ndarray:
        if stop <= start:
            return np.zeros((batch, 0, self.features), np.float32)
        return seeded(self.seed, start, stop, self.block,
                      lambda g: g.standard_normal((batch, self.block, self.features), dtype=np.float32))


class TokenSource:
    """Deterministic byte ids by index range: seeded uniform random bytes, or a text file's bytes, repeated."""

    def __init__(self, seed: int, text: Path | None = None, block: int = WINDOW):
        self.seed, self.block = seed, block
        self.text = np.frombuffer(Path(text).read_bytes(), np.uint8).astype(np.int64) if text is not None else None
        if self.text is not None and not self.text.size:
            raise EdgekitError(f"{text} is empty", "pass a text file with at least one byte")

    def tokens(self, start: int, stop: int) -> np.ndarray:
        if self.text is not None:
            return self.text[np.arange(start, stop) % self.text.size]
        return seeded(self.seed, start, stop, self.block, lambda g: g.integers(0, 256, (1, self.block)))[0]


@dataclass
class Tally:
    """What the comparison has seen so far, output by output; `items` is the stream length (frames, segments)."""

    items: int
    quantized: bool = False  # also count errors in the output's own int8 steps (a quantized bundle's criterion)
    error: dict[str, np.ndarray] = field(default_factory=dict)  # max abs error per decile of the stream
    peak: dict[str, float] = field(default_factory=dict)
    spikes: dict[str, np.ndarray] = field(default_factory=dict)  # [agree, total, zeros artifact, zeros reference]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # [agree per item, items, agree at end, ends]
    steps: dict[str, np.ndarray] = field(default_factory=dict)  # [codes that differ, codes, max error in steps]

    def add(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray], first: int, means: list[str]) -> None:
        """Outputs [batch, n, ...] of items first..first+n-1. Spike outputs (`spikes.<layer>`) are counted for
        agreement; the others by their max abs error; those in `means` also by their arg-max."""
        items = np.arange(first, first + next(iter(got.values())).shape[1])
        for name, g in got.items():
            w = want[name]
            if name.startswith("spikes."):
                s = self.spikes.setdefault(name, np.zeros(4, np.int64))
                s += [(g == w).sum(), g.size, (g == 0).sum(), (w == 0).sum()]
                continue
            e = self.error.setdefault(name, np.full(DECILES, -np.inf))  # -inf: no item of that decile yet
            diff = np.abs(g.astype(np.float64) - w).max(axis=tuple(i for i in range(w.ndim) if i != 1))
            np.maximum.at(e, (items * DECILES) // self.items, diff)
            self.peak[name] = max(self.peak.get(name, 0.0), float(np.abs(w).max()))
            if self.quantized:
                self._steps(name, g.astype(np.float64), w)
            if name in means:
                p = self.predictions.setdefault(name, np.zeros(4, np.int64))
                agree = g.argmax(-1) == w.argmax(-1)  # [batch, n] per frame; [batch, n, L] per token
                p[:2] += [agree.sum(), agree.size]

    def _steps(self, name: str, g: np.ndarray, w: np.ndarray) -> None:
        """Each output row on the int8 grid the quantized reference's own scale puts it on (step = max|row| / 127,
        edgekit.quantize's scheme): how many codes differ, and the largest error in steps."""
        step = np.maximum(np.abs(w).max(axis=-1, keepdims=True), 1e-30) / 127
        s = self.steps.setdefault(name, np.zeros(3))
        s += [(np.round(g / step) != np.round(w / step)).sum(), g.size, 0]
        s[2] = max(s[2], float((np.abs(g - w) / step).max()))

    def end_of_segment(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray], means: list[str]) -> None:
        for name in means:
            self.predictions[name][2:] += [(got[name][:, -1].argmax(-1) == want[name][:, -1].argmax(-1)).sum(),
                                           got[name].shape[0]]

    def errors(self) -> dict:
        """Per real-valued output: max abs and relative error, the reference's magnitude, error by decile (and for
        a quantized tally: the fraction of output codes that differ, the max error in quantization steps)."""
        return {o: {"max_abs_error": float(e.max()), "reference_max_abs": self.peak[o],
                    "max_rel_error": float(e.max() / max(self.peak[o], 1e-30)),
                    "error_by_decile": [float(v) if v >= 0 else None for v in e],
                    **({"codes_differing": float(self.steps[o][0] / self.steps[o][1]),
                        "max_error_steps": float(self.steps[o][2])} if o in self.steps else {})}
                for o, e in self.error.items()}


def error_checks(outputs: dict, atol: float, rtol: float) -> dict[str, bool]:
    """An output passes within atol, or within rtol of the reference's magnitude."""
    return {f"{o}_error": r["max_abs_error"] <= atol or r["max_rel_error"] <= rtol for o, r in outputs.items()}


def step_checks(outputs: dict, max_steps: float, max_codes_differing: float) -> dict[str, bool]:
    """A quantized bundle's output passes within `max_steps` of its quantization step with at most that fraction
    of its codes differing (a code on a rounding boundary may flip, and the recurrence carries it on)."""
    return {**{f"{o}_within_{max_steps:g}_steps": r["max_error_steps"] <= max_steps for o, r in outputs.items()},
            **{f"{o}_codes_differing": r["codes_differing"] <= max_codes_differing for o, r in outputs.items()}}


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default). For this one, freed heap is first handed back to the
    system: reference windows come and go, and allocator caching would otherwise hide or fake growth."""
    if pid is None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(pid: int | None = None) -> int:
    """The highest resident memory a process (this one by default) has had (VmHWM)."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def pieces(total: int, size: int, cuts: list[int] = ()) -> list[int]:
    """Ends of the pieces [0, total) is streamed in: every `size` items, and also at each cut (where memory is
    read), so that T/10 and T are two different points of the stream whenever T >= 2."""
    return sorted({*range(size, total, size), total, *(c for c in cuts if 0 < c < total)})


def rss_marks(total: int) -> set[int]:
    """Where along a stream of `total` items the artifact's resident memory is read: T/10 and T."""
    return {max(1, total // 10), total}


def memory(rss: dict[int, int], total: int) -> dict:
    """The artifact process's RSS at T/10 and T and, where those are two different points of the stream
    (T >= 2), the check that it stayed flat; a shorter stream gets no memory check."""
    first = max(1, total // 10)
    start, end = rss.get(first), rss.get(total)
    measured = first < total and start is not None and end is not None
    growth = end - start if measured else None
    return {"checks": {"constant_memory": abs(growth) <= RSS_CHANGE_MAX} if measured else {},
            "rss_bytes": {"at_T/10": start, "at_T": end, "growth": growth,
                          "peak_validating_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}


def summarize(call_seconds: list[float], per_call: int, unit: str = "frame", hop: float | None = None) -> dict:
    """Latency percentiles per `unit` (frame or byte) of calls that each handle `per_call` of them; with a hop
    (seconds of input per item), the real-time factor of the median."""
    per_unit = np.asarray(call_seconds) / per_call
    p50, p90, p99 = np.percentile(per_unit, [50, 90, 99])
    return {f"{unit}s_per_call": per_call, "calls": len(per_unit),
            "p50_us": p50 * 1e6, "p90_us": p90 * 1e6, "p99_us": p99 * 1e6, "max_us": per_unit.max() * 1e6,
            f"{unit}s_per_second": 1.0 / per_unit.mean(), **({"real_time_factor": p50 / hop} if hop else {})}


def time_calls(fn: Callable[[np.ndarray], object], xs, warmup: int) -> list[float]:
    """Seconds of each call fn(x) for x in xs, after fn on the first `warmup` of them untimed."""
    for x in xs[:warmup]:
        fn(x)
    times = []
    for x in xs:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times
