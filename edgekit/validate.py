"""Validate stage: stream a bundle over T frames and compare every output frame with the PyTorch parallel
reference, computed in float64 piece by piece so that memory stays flat however long the stream is.

Real-valued outputs are judged by their error; spike outputs (`spikes.<layer>`) by the fraction of spikes that
agree, since a compiled artifact may flip a spike whose membrane sits within rounding of the threshold; and the
running-mean outputs by whether their arg-max (the prediction) agrees.
"""
from __future__ import annotations

import ctypes
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.artifact import Bundle, load
from edgekit.errors import EdgekitError
from edgekit.runtime import open_session

WINDOW = 4096  # frames of reference computed per forward call
GOLDEN, GOLDEN_FRAMES = "reference.npz", 512  # reference outputs shipped in the bundle, for boards without torch
WHOLE_SEQUENCE_LIMIT = WINDOW * 16  # a reference without a finite horizon and with a delay is computed in one piece
DECILES = 10
RSS_CHANGE_MAX = 5 * 2**20  # resident memory may move this much between T/10 and T


def _seeded(seed: int, start: int, stop: int, block: int, draw: Callable[[np.random.Generator], np.ndarray]
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
        return _seeded(self.seed, start, stop, self.block,
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
        return _seeded(self.seed, start, stop, self.block, lambda g: g.integers(0, 256, (1, self.block)))[0]


def reference_model(bundle: Bundle):
    """The PyTorch model a bundle was compiled from, in float64, rebuilt from the weights it carries."""
    import torch

    from edgekit import models

    m = bundle.manifest["model"]
    net = models.family(m["family"]).cls(**m["config"])
    net.load_state_dict(torch.load(bundle.path / m["weights"], map_location="cpu", weights_only=True))
    return net.double().eval()


def write_golden(net, path: Path) -> dict:
    """The float64 reference outputs of the start of the seed-0 stream, so that a board with only the runtime
    installed can still validate the bundle against PyTorch's numbers; returns the manifest's record of it."""
    import torch

    if getattr(net, "unit", "frame") == "segment":
        return _write_segment_golden(net, path)
    x = torch.from_numpy(FrameSource(net.input_size, 0).frames(0, GOLDEN_FRAMES)).double()
    with torch.no_grad():
        y = net.double().forward_frames(x)
    net.float()
    np.savez(path, **{k: v.numpy() for k, v in y.items()})
    return {"file": GOLDEN, "frames": GOLDEN_FRAMES, "seed": 0}


class Reference:
    """Per-frame float64 reference outputs of one segment [offset, offset + length) of the stream, in order.

    A short segment is computed by `forward` in one piece. A longer one, for a model with a finite horizon, by
    `forward` over [start - horizon, stop + delay) per range; for a causal model without one, by carrying its
    float64 state through `step_chunk` (its parallel chunk form where it has one); any other model in one piece.
    Running means are accumulated here.
    """

    def __init__(self, net, source: FrameSource, offset: int, length: int, running_means: dict[str, str]):
        self.net, self.source, self.offset, self.length = net, source, offset, length
        self.running_means, self.sums, self.count = running_means, {}, 0
        self.state = net.init_state(1) if net.horizon is None and net.delay == 0 and length > WINDOW else None
        self.whole = None
        if length <= WINDOW or (net.horizon is None and net.delay):
            if length > WHOLE_SEQUENCE_LIMIT:
                raise EdgekitError(f"the {net.family} reference has no finite horizon and a delay: {length} frames "
                                   "would be recomputed in one piece",
                                   f"validate with --frames {WHOLE_SEQUENCE_LIMIT} or fewer, or with --utterance")
            self.whole = self._forward(0, length)

    def _x(self, start: int, stop: int):
        import torch

        return torch.from_numpy(self.source.frames(self.offset + start, self.offset + stop)).double()

    def _forward(self, start: int, stop: int) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            return {k: v.numpy() for k, v in self.net.forward_frames(self._x(start, stop)).items()}

    def outputs(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Reference outputs for segment frames [start, stop); calls come in order, without gaps."""
        import torch

        if self.whole is not None:
            y = {k: v[:, start:stop] for k, v in self.whole.items()}
        elif self.state is not None:
            with torch.no_grad():
                out, self.state = self.net.step_chunk(self._x(start, stop), self.state)
            y = {k: v.numpy() for k, v in out.items() if k not in self.running_means}
        else:
            lo, hi = max(0, start - self.net.horizon), min(self.length, stop + self.net.delay)
            y = {k: v[:, start - lo:stop - lo] for k, v in self._forward(lo, hi).items()}
        for name, src in self.running_means.items():
            csum = self.sums.get(src, 0) + np.cumsum(y[src], axis=1)
            counts = np.arange(self.count + 1, self.count + stop - start + 1).reshape(1, -1, *[1] * (y[src].ndim - 2))
            y[name] = csum / counts
            self.sums[src] = csum[:, -1:]
        self.count += stop - start
        return y


class GoldenReference(Reference):
    """Reference outputs read from the bundle's golden record instead of computed (no torch needed)."""

    def __init__(self, bundle: Bundle, offset: int, length: int):
        with np.load(bundle.path / bundle.manifest["golden"]["file"]) as f:
            self.whole = {k: f[k][:, offset:offset + length] for k in f.files}
        self.running_means, self.sums, self.count, self.state = bundle.manifest["running_means"], {}, 0, None


@dataclass
class Tally:
    """What the comparison has seen so far, output by output."""

    frames: int
    error: dict[str, np.ndarray] = field(default_factory=dict)  # max abs error per decile of the stream
    peak: dict[str, float] = field(default_factory=dict)
    spikes: dict[str, np.ndarray] = field(default_factory=dict)  # [agree, total, zeros artifact, zeros reference]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # [agree per frame, frames, agree at end, ends]

    def add(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray], first: int, means: list[str]) -> None:
        frames = np.arange(first, first + next(iter(got.values())).shape[1])
        for name, g in got.items():
            w = want[name]
            if name.startswith("spikes."):
                s = self.spikes.setdefault(name, np.zeros(4, np.int64))
                s += [(g == w).sum(), g.size, (g == 0).sum(), (w == 0).sum()]
                continue
            e = self.error.setdefault(name, np.full(DECILES, -np.inf))  # -inf: no frame of that decile yet
            diff = np.abs(g.astype(np.float64) - w).max(axis=tuple(i for i in range(w.ndim) if i != 1))
            np.maximum.at(e, (frames * DECILES) // self.frames, diff)
            self.peak[name] = max(self.peak.get(name, 0.0), float(np.abs(w).max()))
            if name in means:
                p = self.predictions.setdefault(name, np.zeros(4, np.int64))
                p[:2] += [(g.argmax(-1) == w.argmax(-1)).sum(), g.shape[0] * g.shape[1]]

    def end_of_segment(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray], means: list[str]) -> None:
        for name in means:
            self.predictions[name][2:] += [(got[name][:, -1].argmax(-1) == want[name][:, -1].argmax(-1)).sum(),
                                           got[name].shape[0]]


def skippable_macs(net, spikes: dict[str, dict]) -> dict:
    """Multiply-adds per frame, and how many of them multiply a zero spike at the measured sparsity."""
    fanout, total = net.spike_fanout(), net.macs_per_frame()
    skip = {layer: fanout[layer] * s["sparsity_artifact"] for layer, s in spikes.items()}
    return {"per_frame": total, "fed_by_spikes": sum(fanout.values()), "skippable": round(sum(skip.values())),
            "skippable_fraction": sum(skip.values()) / total, "skippable_by_layer": {k: round(v) for k, v in skip.items()}}


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of the process running the artifact (this one, or the emulated one). Here, freed heap is
    first handed back to the system: the reference's float64 windows come and go, and allocator caching would
    otherwise hide or fake growth of the stream itself."""
    if pid is None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def validate(bundle_path: Path, frames: int | None = None, chunk: int = 1, seed: int = 0, atol: float = 1e-4,
             rtol: float = 1e-3, utterance: int | None = None, spike_agreement: float = 0.999,
             prediction_agreement: float = 0.999, segments: int | None = None, decode_segments: int = 2,
             text: Path | None = None, progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Stream the bundle over `frames` frames (default 10,000) against the float64 reference; return (and save)
    the report. A segment-level LM's bundle is streamed over `segments` segments instead (`_validate_segments`).

    utterance=N splits the stream into independent utterances of N frames, each from a fresh state and flushed
    (as a keyword spotter sees them); otherwise it is one stream. Pass criteria: real-valued outputs within
    atol or within rtol of the reference's magnitude (for spiking models, where one flipped spike moves the
    logits, the prediction criterion replaces this); each spike layer's agreement >= spike_agreement; the
    running-mean predictions' agreement >= prediction_agreement; resident memory at T within 5 MiB of T/10.
    """
    bundle = load(bundle_path, check_machine=False)
    if bundle.manifest.get("unit", "frame") == "segment":
        if frames is not None or utterance is not None or chunk != 1:
            raise EdgekitError(f"{bundle.path} holds a segment-level LM: it streams text segments, not frames",
                               "use --segments (and --decode-segments, --text) instead of --frames/--chunk/--utterance")
        return _validate_segments(bundle, 256 if segments is None else segments, decode_segments, seed, text,
                                  atol, rtol, progress)
    if segments is not None or text is not None:
        raise EdgekitError(f"{bundle.path} holds a frame-streaming model: --segments and --text are for "
                           "segment-level LMs", "use --frames")
    frames = 10_000 if frames is None else frames
    if frames < 1 or (utterance is not None and utterance < 1):
        raise EdgekitError("--frames and --utterance must be positive")
    session = open_session(bundle, isolated=True)  # the artifact's memory apart from the reference's
    source = FrameSource(session.input_size, seed)
    try:
        net = reference_model(bundle)
    except ImportError:  # a board with only the runtime: compare with the golden record compiled into the bundle
        net, golden = None, bundle.manifest["golden"]
        if seed != golden["seed"] or utterance:
            raise EdgekitError("without PyTorch, validation compares with the bundle's golden record: "
                               f"{golden['frames']} frames of seed {golden['seed']}, one stream",
                               "drop --seed/--utterance, or install edgekit[compile] for any stream")
        frames = golden["frames"]  # the record is one finished stream of exactly this length
    means = list(bundle.manifest["running_means"])
    tally, rss, t0 = Tally(frames), {}, time.perf_counter()
    length = utterance or frames
    marks = {max(1, frames // 10), frames}
    done = 0
    for offset in range(0, frames, length):
        seg = min(length, frames - offset)
        ref = Reference(net, source, offset, seg, bundle.manifest["running_means"]) if net is not None else \
            GoldenReference(bundle, offset, seg)
        session.reset()
        next_frame, last = -session.delay, ({}, {})

        def compare(got: dict[str, np.ndarray]) -> None:
            nonlocal next_frame, last
            n, keep = next(iter(got.values())).shape[1], max(0, -next_frame)  # the first `delay` calls emit nothing
            if n > keep:
                got = {o: v[:, keep:] for o, v in got.items()}
                want = ref.outputs(next_frame + keep, next_frame + n)
                tally.add(got, want, offset + next_frame + keep, means)
                last = (got, want)
            next_frame += n

        window = max(chunk, (WINDOW // chunk) * chunk)
        for start in range(0, seg, window):
            stop = min(seg, start + window)
            compare(session.feed(source.frames(offset + start, offset + stop, session.batch), chunk))
            for mark in marks:
                if done + start < mark <= done + stop:
                    rss[mark] = rss_bytes(session.pid)
            progress(done + stop, frames)
        if session.delay:
            compare(session.flush())
        tally.end_of_segment(*last, means)
        done += seg
    report = _report(bundle, tally, rss, frames, chunk, seed, utterance, time.perf_counter() - t0,
                     atol, rtol, spike_agreement, prediction_agreement)
    if net is not None and report["spikes"] and hasattr(net, "spike_fanout"):
        report["macs"] = skippable_macs(net, report["spikes"])
    return _finish(bundle, report, session, golden=net is None)


def _finish(bundle: Bundle, report: dict, session, golden: bool) -> dict:
    """Where it ran and against what, then saved beside the bundle as validation.json."""
    report["execution"] = session.execution
    if golden:
        report["reference"] += ", read from the bundle's golden record (computed at compile time)"
    if hasattr(session, "startup_seconds"):
        report["runtime_startup_seconds"] = round(session.startup_seconds, 2)
    bundle.record("validation.json", report)
    return report


def _report(bundle: Bundle, tally: Tally, rss: dict[int, int], frames: int, chunk: int, seed: int,
            utterance: int | None, seconds: float, atol: float, rtol: float, spike_agreement: float,
            prediction_agreement: float) -> dict:
    spiking = bool(tally.spikes)
    outputs = _errors(tally)
    spikes = {o.removeprefix("spikes."): {"agreement": int(a) / int(n), "sparsity_artifact": int(za) / int(n),
                                          "sparsity_reference": int(zr) / int(n)}
              for o, (a, n, za, zr) in tally.spikes.items()}
    predictions = {o: {"agreement_per_frame": int(a) / int(n),
                       "agreement_per_utterance" if utterance else "agreement_at_end": int(ae) / int(ne)}
                   for o, (a, n, ae, ne) in tally.predictions.items()}
    memory = _memory(rss, frames)
    checks = {
        **({} if spiking else _error_checks(outputs, atol, rtol)),
        **{f"spikes.{o}_agreement": s["agreement"] >= spike_agreement for o, s in spikes.items()},
        **({f"{o}_prediction": p["agreement_per_frame"] >= prediction_agreement for o, p in predictions.items()}
           if spiking else {}),
        **memory["checks"],
    }
    report = {
        "bundle": str(bundle.path), "target": bundle.target["name"], "frames": frames, "chunk": chunk,
        "seed": seed, "utterance": utterance,
        "input": "standard normal frames, numpy default_rng([seed, block]) per 4096-frame block",
        "reference": "PyTorch in float64: the parallel forward (windowed over the model's horizon where it has one; "
                     "for a causal model without a horizon, its parallel chunk form carrying the state)",
        "criteria": {"atol": atol, "rtol": rtol, "real_valued_outputs_judged": not spiking,
                     "spike_agreement_min": spike_agreement, "prediction_agreement_min": prediction_agreement,
                     "rss_change_max_bytes": RSS_CHANGE_MAX},
        "outputs": outputs, "spikes": spikes, "predictions": predictions,
        "state_bytes": bundle.manifest["state_bytes"],
        "rss_bytes": memory["rss_bytes"],
        "seconds": round(seconds, 2),
        "checks": checks,
        "passed": all(checks.values()),
    }
    return report


def _errors(tally: Tally) -> dict:
    return {o: {"max_abs_error": float(e.max()), "reference_max_abs": tally.peak[o],
                "max_rel_error": float(e.max() / max(tally.peak[o], 1e-30)),
                "error_by_decile": [float(v) if v >= 0 else None for v in e]} for o, e in tally.error.items()}


def _error_checks(outputs: dict, atol: float, rtol: float) -> dict[str, bool]:
    return {f"{o}_error": r["max_abs_error"] <= atol or r["max_rel_error"] <= rtol for o, r in outputs.items()}


def _memory(rss: dict[int, int], total: int) -> dict:
    """The artifact process's RSS at T/10 and T (T in frames or segments) and, where those are two different
    points of the stream (T >= 2), the check that it stayed flat; a shorter stream gets no memory check."""
    first = max(1, total // 10)
    start, end = rss.get(first), rss.get(total)
    measured = first < total and start is not None and end is not None
    growth = end - start if measured else None
    return {"checks": {"constant_memory": abs(growth) <= RSS_CHANGE_MAX} if measured else {},
            "rss_bytes": {"at_T/10": start, "at_T": end, "growth": growth,
                          "peak_validating_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}


# ---- segment-level LMs (HMT): text in segments of L bytes, and byte by byte as generation runs -----------------

SEGMENT_BLOCK = 16  # segments per scoring call


class SegmentReference:
    """The float64 eager HMT reference (the algorithm as written, growing-then-truncated cache) continuing one
    stream, in the two ways a segment bundle runs it: `score` whole segments, or `feed` one segment byte by byte,
    where each byte's next-byte distribution may depend only on the bytes so far (while a segment holds fewer than
    j bytes its summary, hence its recalled memory, is over those bytes alone)."""

    def __init__(self, net):
        self.net, self.carry = net, None

    def _run(self, tokens: np.ndarray):
        import torch

        with torch.no_grad():
            return self.net.reference_carry(torch.from_numpy(tokens).view(1, -1), carry=self.carry)

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        logits, memories, self.carry = self._run(tokens)
        return {"logits": logits.view(1, -1, self.net.L, logits.shape[-1]).numpy(),
                "memory_embedding": memories.numpy()}

    def feed(self, segment: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        prefixes = [self._run(segment[:n])[0][0, n - 1] for n in range(1, self.net.j)]
        logits, _, self.carry = self._run(segment)
        return {"logits": torch.stack([*prefixes, *logits[0, self.net.j - 1:]])[None].numpy()}


class GoldenSegmentReference:
    """SegmentReference's outputs read from the bundle's golden record (no torch needed)."""

    def __init__(self, bundle: Bundle):
        with np.load(bundle.path / bundle.manifest["golden"]["file"]) as f:
            self.record = {k: f[k] for k in f.files}
        self.done = 0

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        n = tokens.size // self.record["logits"].shape[2]
        out = {k: self.record[k][:, self.done:self.done + n] for k in ("logits", "memory_embedding")}
        self.done += n
        return out

    def feed(self, segment: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": self.record["fed_logits"]}


def _write_segment_golden(net, path: Path) -> dict:
    """N + 4 segments of the seed-0 byte stream (the memory cache wraps), the last one fed byte by byte."""
    segments, L = net.N + 4, net.L
    tokens = TokenSource(0).tokens(0, segments * L)
    ref = SegmentReference(net.double())
    scored = ref.score(tokens[:-L])
    np.savez(path, **scored, fed_logits=ref.feed(tokens[-L:])["logits"])
    net.float()
    return {"file": GOLDEN, "segments": segments, "decode_segments": 1, "seed": 0}


def _validate_segments(bundle: Bundle, segments: int, decode_segments: int, seed: int, text: Path | None,
                       atol: float, rtol: float, progress: Callable[[int, int], None]) -> dict:
    """One stream of `segments` segments: all but the last `decode_segments` scored by the segment step, those
    fed byte by byte (the generation path: segment steps while the summary grows, then decode steps); logits and
    memory embeddings against the float64 reference, the artifact's RSS at T/10 and T, next-byte agreement."""
    if segments < 1 or not 0 <= decode_segments <= segments:
        raise EdgekitError(f"need --segments >= 1 and 0 <= --decode-segments <= --segments; got {segments}, "
                           f"{decode_segments}")
    source = TokenSource(seed, text)
    session = open_session(bundle, isolated=True)
    try:
        ref = SegmentReference(reference_model(bundle))
    except ImportError:
        golden = bundle.manifest["golden"]
        if seed != golden["seed"] or text is not None:
            raise EdgekitError("without PyTorch, validation compares with the bundle's golden record: "
                               f"{golden['segments']} segments of seed {golden['seed']}",
                               "drop --seed/--text, or install edgekit[compile] for any stream") from None
        segments, decode_segments, ref = golden["segments"], golden["decode_segments"], GoldenSegmentReference(bundle)
    L, scored = bundle.manifest["segment"], segments - decode_segments
    pieces = [(s, min(scored, s + SEGMENT_BLOCK), "score") for s in range(0, scored, SEGMENT_BLOCK)]
    pieces += [(s, s + 1, "feed") for s in range(scored, segments)]
    tally, rss, agree, t0 = Tally(segments), {}, np.zeros(2, np.int64), time.perf_counter()
    session.reset()
    for start, stop, how in pieces:
        tokens = source.tokens(start * L, stop * L)
        got, want = getattr(session, how)(tokens), getattr(ref, how)(tokens)
        if how == "feed":  # one segment's L byte-by-byte distributions, tallied as one segment
            got, want = ({"logits_byte_by_byte": d["logits"][:, None]} for d in (got, want))
        tally.add(got, want, start, [])
        name = next(iter(got))
        agree += [(got[name].argmax(-1) == want[name].argmax(-1)).sum(), got[name][..., 0].size]
        for mark in {max(1, segments // 10), segments}:
            if start < mark <= stop:
                rss[mark] = rss_bytes(session.pid)
        progress(stop, segments)
    memory = _memory(rss, segments)
    outputs = _errors(tally)
    checks = {**_error_checks(outputs, atol, rtol), **memory["checks"]}
    report = {
        "bundle": str(bundle.path), "target": bundle.target["name"], "segments": segments,
        "decode_segments": decode_segments, "segment_length": L, "tokens": segments * L, "seed": seed,
        "input": f"the bytes of {text}, repeated" if text is not None else
                 "uniform random bytes, numpy default_rng([seed, block]) per 4096-byte block",
        "reference": "PyTorch in float64: HMT's algorithm as written (growing-then-truncated memory cache), one "
                     "stream; byte by byte, each byte's distribution given only the bytes before it",
        "criteria": {"atol": atol, "rtol": rtol, "rss_change_max_bytes": RSS_CHANGE_MAX},
        "outputs": outputs, "next_byte_agreement": int(agree[0]) / int(agree[1]),
        "state_bytes": bundle.manifest["state_bytes"], "rss_bytes": memory["rss_bytes"],
        "seconds": round(time.perf_counter() - t0, 2), "checks": checks, "passed": all(checks.values()),
    }
    return _finish(bundle, report, session, golden=isinstance(ref, GoldenSegmentReference))
