"""Keyword spotting on an endless audio stream with a compiled LMUFormer bundle.

The classifier was trained on 1 s clips from a zero state, and it classifies a clip by the mean of its per-frame
logits. Continuous detection keeps that exact setting: staggered sessions, one starting every `hop` frames, each
fed one clip-length window from a fresh state and flushed, so each window's `mean_logits` is exactly the offline
classification of that second of audio. Windows `hop` apart overlap, so every word lies whole inside some
window near the position it had in training; the detector smooths the windows' probabilities over neighbouring
windows and picks one peak per utterance, so what is detected does not depend on where the window grid falls.
Cost: clip_frames / hop sessions stepping every frame (7 for 98 frames, hop 14).
"""
from __future__ import annotations

import importlib.util
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

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


@dataclass
class Detection:
    label: str
    start: float  # seconds from the start of the stream: the span shared by the windows that heard the word
    end: float
    confidence: float  # the keyword's probability averaged over neighbouring windows, at its peak

    @property
    def time(self) -> float:
        return (self.start + self.end) / 2


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


class Position(NamedTuple):
    """One smoothed position of the window sequence."""

    index: int
    label: str  # its top class
    score: float  # the smoothed probability of that class if it is a keyword, else 0
    windows: list[Window]  # the windows averaged there


class Detector:
    """Turns per-window probabilities into detections that do not depend on where the windows fall.

    Smoothing: each window's probabilities are averaged with those of the `smooth - 1` windows before it, so a
    word heard whole by several overlapping windows scores high wherever the window grid lies, while a keyword
    heard in only one or two windows (the "yes" of "yesterday", in the windows that cut the rest of the word
    off) does not. Peak picking: smoothed positions whose top class is a keyword above `threshold` are taken
    most confident first, each suppressing the positions within `radius` (SUPPRESS_FRAMES at the windows' hop):
    one detection per utterance, also for a keyword said twice in a row. A detection's span is the stretch
    shared by the windows near the peak that chose its keyword (each held the word, so the word lies in all of
    them). A group of peaks is final once `radius` positions without a keyword follow it: that bounds latency."""

    def __init__(self, spec: ClipSpec, threshold: float, hop: int, smooth: int = 3):
        self.spec, self.threshold = spec, threshold
        self.radius = max(1, round(SUPPRESS_FRAMES / hop))
        self.recent: deque[Window] = deque(maxlen=smooth)
        self.before: deque[Position] = deque(maxlen=self.radius)  # the positions before a group opens
        self.group: list[Position] = []  # from `radius` positions before its first peak to its end
        self.index, self.gap = 0, 0

    def push(self, w: Window) -> list[Detection]:
        self.recent.append(w)
        mean = np.mean([r.probs for r in self.recent], axis=0)
        top = int(mean.argmax())
        label = self.spec.labels[top]
        score = float(mean[top]) if label not in NON_KEYWORDS else 0.0
        self.index += 1
        position = Position(self.index, label, score, list(self.recent))
        if score >= self.threshold:
            self.group = self.group or list(self.before)
            self.group.append(position)
            self.gap = 0
            return []
        if not self.group:
            self.before.append(position)
            return []
        self.group.append(position)
        self.gap += 1
        return self.close() if self.gap > self.radius else []

    def close(self) -> list[Detection]:
        """Decide the pending group (at a long enough gap, or at the end of the stream)."""
        peaks: list[Position] = []
        for p in sorted((p for p in self.group if p.score >= self.threshold), key=lambda p: -p.score):
            if all(abs(p.index - q.index) > self.radius for q in peaks):
                peaks.append(p)
        out = [self._detection(p) for p in sorted(peaks, key=lambda p: p.index)]
        self.before.extend(self.group[-self.radius:])
        self.group = []
        return out

    def _detection(self, peak: Position) -> Detection:
        """The word lies in every window that chose it: its span is the overlap of the run of such windows
        around the peak (of the peak's own windows where that run spans more than a window)."""
        k = self.spec.labels.index(peak.label)
        near = sorted({w.start: w for p in self.group if abs(p.index - peak.index) <= self.radius
                       for w in p.windows}.items())
        chose = [w.probs.argmax() == k for _, w in near]
        lo = hi = [s for s, _ in near].index(max(peak.windows, key=lambda w: w.probs[k]).start)
        while lo > 0 and chose[lo - 1]:
            lo -= 1
        while hi + 1 < len(near) and chose[hi + 1]:
            hi += 1
        for held in ([w for _, w in near[lo:hi + 1]], peak.windows):
            start, end = max(w.start for w in held), min(w.start for w in held) + self.spec.clip_frames
            if end > start:
                break
        second = audio.FRAME_SHIFT / audio.SAMPLE_RATE
        return Detection(peak.label, round(start * second, 3), round(end * second, 3), round(peak.score, 4))


@dataclass
class StreamReport:
    detections: int = 0  # counted, not kept: the stream may be endless (`on_detection` sees each one)
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time: the cost on a machine shared with other jobs
    rss: list[tuple[float, int]] = field(default_factory=list)  # (audio seconds, bytes), one per `rss_every`
    interrupted: bool = False  # stopped by Ctrl-C: the figures cover the audio streamed until then

    @property
    def rtf(self) -> float:
        return self.compute_seconds / max(self.audio_seconds, 1e-9)

    @property
    def cpu_rtf(self) -> float:
        return self.cpu_seconds / max(self.audio_seconds, 1e-9)


def detect(bundle: Bundle, spec: ClipSpec, blocks: Iterable[np.ndarray], hop: int = 14, threshold: float = 0.5,
           smooth: int = 3, on_detection: Callable[[Detection], None] = lambda d: None, rss_every: float = 60.0,
           windows: list[Window] | None = None) -> StreamReport:
    """Run a stream of float32 sample blocks (16 kHz, [-1, 1]) through the front end, the staggered classifier
    and the detector; detections are passed to `on_detection` as soon as they are final. One clip of digital
    silence after the end completes the windows still open. Ctrl-C ends the stream like its end (the report
    says so), so a live stream still gets its summary. `windows`, when given, collects every window's
    probabilities (for plots and threshold studies)."""
    front, clf = audio.FrontEnd(), StaggeredClassifier(bundle, spec, hop)
    detector = Detector(spec, threshold, hop, smooth)
    report, pending = StreamReport(), np.zeros((0, audio.NUM_MEL_BINS), np.float32)
    tail = np.zeros(spec.clip_frames * audio.FRAME_SHIFT + audio.FRAME_LENGTH, np.float32)
    next_rss = 0.0

    def emit(found: list[Detection]) -> None:
        for d in found:
            report.detections += 1
            on_detection(d)

    try:
        for samples in blocks:
            t0, c0 = time.perf_counter(), time.process_time()
            pending = np.concatenate([pending, front.push(samples)])
            found = []
            while len(pending) >= hop:
                for w in clf.push(pending[:hop]):
                    found += detector.push(w)
                    if windows is not None:
                        windows.append(w)
                pending = pending[hop:]
            report.compute_seconds += time.perf_counter() - t0
            report.cpu_seconds += time.process_time() - c0
            report.audio_seconds += len(samples) / audio.SAMPLE_RATE
            emit(found)
            if report.audio_seconds >= next_rss:
                report.rss.append((round(report.audio_seconds, 1), rss_bytes()))
                next_rss += rss_every
    except KeyboardInterrupt:
        report.interrupted = True
    pending = np.concatenate([pending, front.push(tail)])
    for t in range(0, len(pending) - hop + 1, hop):
        for w in clf.push(pending[t:t + hop]):
            emit(detector.push(w))
            if windows is not None:
                windows.append(w)
    emit(detector.close())
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


def open_wav(path: Path, repeat: int = 1) -> tuple[str, Iterator[np.ndarray]]:
    """What the file holds, and its samples as 16 kHz mono blocks, `repeat` times over (an endless stream from
    a short file). Opened now, so that a file that cannot be read fails before anything is printed."""
    with audio.WavReader(path) as r:
        about = f"{path} ({r.describe()})"

    def blocks() -> Iterator[np.ndarray]:
        for _ in range(repeat):
            with audio.WavReader(path) as r:
                yield from r.blocks()

    return about, blocks()


def open_mic(device: str | None = None) -> tuple[str, Iterator[np.ndarray]]:
    """An input device (`device`: a name, part of one, or an index; default: the system's) in 100 ms blocks,
    resampled to 16 kHz from the device's own rate, until interrupted. Each way it can fail is one clear error."""
    try:
        import sounddevice
    except ImportError:
        raise EdgekitError("--mic needs the sounddevice package", "pip install sounddevice") from None
    except OSError as e:  # sounddevice imports PortAudio at import time
        raise EdgekitError(f"--mic needs the PortAudio library ({e})",
                           "install it: apt install libportaudio2 (Debian/Ubuntu), brew install portaudio (macOS)") \
            from None
    which = int(device) if device is not None and device.isdigit() else device
    try:
        info = sounddevice.query_devices(which, "input")
        rate = int(info["default_samplerate"])
        mic = sounddevice.InputStream(device=which, samplerate=rate, channels=1, dtype="float32", blocksize=rate // 10)
    except (sounddevice.PortAudioError, ValueError) as e:
        raise EdgekitError(f"no usable input device{f' {device!r}' if device is not None else ''}: {e}",
                           "list the devices with `python -m sounddevice` and pick one with --device NAME|INDEX") \
            from None
    resample = audio.Resampler(rate)

    def blocks() -> Iterator[np.ndarray]:
        with mic:
            while True:
                yield resample(mic.read(rate // 10)[0][:, 0])

    resampled = f", resampled to {audio.SAMPLE_RATE} Hz" * (rate != audio.SAMPLE_RATE)
    return f"the microphone {info['name']!r} ({rate} Hz{resampled})", blocks()
