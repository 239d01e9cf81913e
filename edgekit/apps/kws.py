"""Keyword spotting on an endless audio stream with a compiled LMUFormer bundle.

The classifier was trained on 1 s clips from a zero state, and it classifies a clip by the mean of its per-frame
logits. Continuous detection keeps that exact setting: staggered sessions, one starting every `hop` frames, each
fed one clip-length window from a fresh state and flushed, so each window's `mean_logits` is exactly the offline
classification of that second of audio. Windows `hop` apart overlap, so every word lies whole inside some
window near the position it had in training; non-maximum suppression over neighbouring windows turns them into
one detection per utterance. Cost: clip_frames / hop sessions stepping every frame (7 for 98 frames, hop 14).
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from edgekit import audio
from edgekit.apps import cache
from edgekit.artifact import Bundle, file_sha256, load
from edgekit.errors import EdgekitError
from edgekit.measure import rss_bytes
from edgekit.runtime import Session

# Located without importing edgekit.models (which imports torch): a board only has the runtime.
DEMO_CHECKPOINT = Path(importlib.util.find_spec("edgekit.models").origin).parent / "checkpoints" / "kws_demo.pt"
# Class order of the public SCv2 LMUFormer checkpoints (see the public repo's data loader).
SCV2_LABELS = ["backward", "follow", "five", "bed", "zero", "on", "learn", "two", "house", "tree", "dog", "stop",
               "seven", "eight", "down", "six", "forward", "cat", "right", "visual", "four", "wow", "no", "nine",
               "off", "three", "left", "marvin", "yes", "up", "sheila", "happy", "bird", "go", "one"]
NON_KEYWORDS = {"_silence_", "_unknown_"}
SUPPRESS_FRAMES = 70  # detections closer than 0.7 s are one utterance (tuned on the validation stream)


@dataclass(frozen=True)
class ClipSpec:
    """How the classifier was trained: class names, frames per clip, and whether the public pipeline's
    padding of the filterbank to `pad_to` frames (normalised zeros) follows the audio."""

    labels: list[str]
    clip_frames: int = 98
    pad_to: int | None = None

    @classmethod
    def for_model(cls, num_classes: int, checkpoint: Path | None, labels: list[str] | None = None) -> "ClipSpec":
        """From the JSON record beside the checkpoint, else the public SCv2 pipeline for 35 classes."""
        record = checkpoint.with_suffix(".json") if checkpoint else None
        if record is not None and record.is_file():
            r = json.loads(record.read_text())
            spec = cls(labels or r["labels"], r["clip_frames"], r.get("pad_to"))
        elif num_classes == len(SCV2_LABELS):
            spec = cls(labels or SCV2_LABELS, 98, 128)
        elif labels:
            spec = cls(labels)
        else:
            raise EdgekitError(f"no class names known for this {num_classes}-class model",
                               "pass --labels name1,name2,... in the model's class order")
        if len(spec.labels) != num_classes:
            raise EdgekitError(f"{len(spec.labels)} labels given for a {num_classes}-class model",
                               "pass one name per class, in the model's class order")
        return spec


@dataclass
class Window:
    start: int  # first frame
    probs: np.ndarray  # softmax of mean_logits over the window

    def time(self, frames: int) -> float:
        """Centre of the window in seconds."""
        return (self.start + frames / 2) * audio.FRAME_SHIFT / audio.SAMPLE_RATE


@dataclass
class Detection:
    time: float  # seconds from the start of the stream: centre of the most confident window
    label: str
    confidence: float


class StaggeredClassifier:
    """Classifies every clip-length window starting at a multiple of `hop` frames, exactly as the offline
    model classifies one clip: `clip_frames / hop` sessions, each reset at its window's start and flushed at
    its end. Frames go in `hop` at a time, as chunks when the bundle has an entry that divides `hop`."""

    def __init__(self, bundle: Bundle, spec: ClipSpec, hop: int):
        if hop < 1 or spec.clip_frames % hop:
            raise EdgekitError(f"hop {hop} does not divide the clip length {spec.clip_frames} frames",
                               f"choose a divisor of {spec.clip_frames}, e.g. {_divisors(spec.clip_frames)}")
        self.spec, self.hop = spec, hop
        self.sessions = [Session(bundle) for _ in range(spec.clip_frames // hop)]
        self.starts: list[int | None] = [None] * len(self.sessions)
        sizes = [e["frames"] for e in bundle.manifest["entries"].values() if e["frames"]]
        self.chunk = max(k for k in sizes if hop % k == 0)
        self.pad = audio.normalise(np.zeros((1, spec.pad_to - spec.clip_frames, audio.NUM_MEL_BINS), np.float32)) \
            if spec.pad_to and spec.pad_to > spec.clip_frames else None
        self.frame = 0  # frames consumed so far

    def push(self, block: np.ndarray) -> list[Window]:
        """`hop` frames [hop, features]; returns the windows that ended with them."""
        free = self.starts.index(None)
        self.starts[free] = self.frame
        self.sessions[free].reset()
        self.frame += len(block)
        done = []
        for i, (session, start) in enumerate(zip(self.sessions, self.starts)):
            if start is None:
                continue
            y = session.feed(block[None], self.chunk)
            if self.frame - start == self.spec.clip_frames:
                if self.pad is not None:
                    y = session.feed(self.pad, self.chunk)
                if session.delay:
                    y = session.flush()
                done.append(Window(start, _softmax(y["mean_logits"][0, -1])))
                self.starts[i] = None
        return done


class Merger:
    """Turns per-window decisions into detections by non-maximum suppression: windows whose top class is a
    keyword above `threshold` are taken most confident first, each suppressing the windows within `radius` of it.
    One detection per utterance, also for the same keyword said twice in a row (which a run of consecutive
    detecting windows would merge into one). `radius` spans SUPPRESS_FRAMES at the windows' `hop`. Suppression
    only acts within `radius`, so a group of detecting windows is final once `radius` windows without a keyword
    follow it: that bounds the latency."""

    def __init__(self, spec: ClipSpec, threshold: float, hop: int):
        self.spec, self.threshold, self.radius = spec, threshold, max(1, round(SUPPRESS_FRAMES / hop))
        self.group: list[tuple[int, Window, float]] = []  # (window index, window, score) since the last gap
        self.index, self.gap = 0, 0

    def push(self, w: Window) -> list[Detection]:
        top = int(w.probs.argmax())
        score = float(w.probs[top]) if self.spec.labels[top] not in NON_KEYWORDS else 0.0
        self.index += 1
        if score >= self.threshold:
            self.group.append((self.index, w, score))
            self.gap = 0
            return []
        self.gap += 1
        return self.close() if self.gap > self.radius else []

    def close(self) -> list[Detection]:
        """Decide the pending group (at a long enough gap, or at the end of the stream)."""
        kept: list[tuple[int, Window, float]] = []
        for i, w, score in sorted(self.group, key=lambda g: -g[2]):
            if all(abs(i - j) > self.radius for j, _, _ in kept):
                kept.append((i, w, score))
        self.group = []
        return [Detection(round(w.time(self.spec.clip_frames), 3), self.spec.labels[int(w.probs.argmax())], score)
                for _, w, score in sorted(kept, key=lambda g: g[0])]


@dataclass
class StreamReport:
    detections: int = 0  # counted, not kept: the stream may be endless (`on_detection` sees each one)
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time: the cost on a machine shared with other jobs
    rss: list[tuple[float, int]] = field(default_factory=list)  # (audio seconds, bytes), one per `rss_every`

    @property
    def rtf(self) -> float:
        return self.compute_seconds / max(self.audio_seconds, 1e-9)

    @property
    def cpu_rtf(self) -> float:
        return self.cpu_seconds / max(self.audio_seconds, 1e-9)


def detect(bundle: Bundle, spec: ClipSpec, blocks: Iterable[np.ndarray], hop: int = 14, threshold: float = 0.5,
           on_detection: Callable[[Detection], None] = lambda d: None, rss_every: float = 60.0,
           windows: list[Window] | None = None) -> StreamReport:
    """Run a stream of float32 sample blocks (16 kHz, [-1, 1]) through the front end and the staggered
    classifier; detections are passed to `on_detection` as soon as they are final. One clip of digital silence
    after the end completes the windows still open. `windows`, when given, collects every window's
    probabilities (for plots and threshold studies)."""
    front, clf, merge = audio.FrontEnd(), StaggeredClassifier(bundle, spec, hop), Merger(spec, threshold, hop)
    report, pending = StreamReport(), np.zeros((0, audio.NUM_MEL_BINS), np.float32)
    tail = np.zeros(spec.clip_frames * audio.FRAME_SHIFT + audio.FRAME_LENGTH, np.float32)
    next_rss = 0.0
    for samples, real in itertools.chain(((b, True) for b in blocks), [(tail, False)]):
        t0, c0 = time.perf_counter(), time.process_time()
        pending = np.concatenate([pending, front.push(samples)])
        found = []
        while len(pending) >= hop:
            for w in clf.push(pending[:hop]):
                found += merge.push(w)
                if windows is not None:
                    windows.append(w)
            pending = pending[hop:]
        report.compute_seconds += time.perf_counter() - t0
        report.cpu_seconds += time.process_time() - c0
        report.audio_seconds += real * len(samples) / audio.SAMPLE_RATE
        for d in found:
            report.detections += 1
            on_detection(d)
        if report.audio_seconds >= next_rss:
            report.rss.append((round(report.audio_seconds, 1), rss_bytes()))
            next_rss += rss_every
    for d in merge.close():
        report.detections += 1
        on_detection(d)
    report.rss.append((round(report.audio_seconds, 1), rss_bytes()))
    return report


def host_bundle(checkpoint: Path, progress: Callable[[str], None] = lambda m: None) -> Bundle:
    """An LMUFormer checkpoint compiled for this host on first use and cached, with chunk entries of 7 frames
    (the default hop, 14, in two calls)."""
    return cache.host_bundle("lmuformer", checkpoint=checkpoint, progress=progress, chunks=(1, 7))


def open_model(bundle_path: Path | None, checkpoint: Path | None, labels: list[str] | None,
               progress: Callable[[str], None] = lambda m: None) -> tuple[Bundle, ClipSpec]:
    """A bundle and its clip spec: a given bundle, a checkpoint compiled on first use, or the shipped demo."""
    if bundle_path is not None and checkpoint is not None:
        raise EdgekitError("pass --bundle or --checkpoint, not both", "a bundle already holds its weights")
    if bundle_path is not None:
        bundle = load(bundle_path, check_machine=False)  # an aarch64 bundle runs emulated on x86_64
        ck = bundle.manifest["model"]["checkpoint"]
        source = Path(ck["path"]) if ck else None
        if ck and ck["sha256"] == file_sha256(DEMO_CHECKPOINT):
            source = DEMO_CHECKPOINT
    else:
        source = Path(checkpoint) if checkpoint is not None else DEMO_CHECKPOINT
        if not source.is_file():
            raise EdgekitError(f"checkpoint {source} does not exist", "pass the path of a .pt/.pth file")
        bundle = host_bundle(source, progress)
    m = bundle.manifest["model"]
    if m["family"] != "lmuformer" or m["config"]["input_size"] != audio.NUM_MEL_BINS:
        raise EdgekitError(f"{bundle.path} is a {m['family']} with {m['config'].get('input_size')} input features",
                           f"streaming audio needs an LMUFormer with {audio.NUM_MEL_BINS} mel bins")
    return bundle, ClipSpec.for_model(m["config"]["num_classes"], source, labels)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def wav_blocks(path: Path, repeat: int = 1) -> Iterator[np.ndarray]:
    """A WAV file's samples in 100 ms blocks, `repeat` times over (an endless stream from a short file)."""
    for _ in range(repeat):
        with audio.WavReader(path) as r:
            yield from r.blocks()


def mic_blocks() -> Iterator[np.ndarray]:
    """The default input device in 100 ms blocks, until interrupted."""
    try:
        import sounddevice
    except ImportError:
        raise EdgekitError("--mic needs the sounddevice package", "pip install sounddevice") from None
    with sounddevice.InputStream(samplerate=audio.SAMPLE_RATE, channels=1, dtype="float32",
                                 blocksize=audio.SAMPLE_RATE // 10) as mic:
        while True:
            yield mic.read(audio.SAMPLE_RATE // 10)[0][:, 0]
