"""The frame unit: audio-like frames streamed through `step` (1 frame), `chunk<K>` (K frames) and `flush` (the
last `delay` frames of a finished stream). Models implement `edgekit.streaming.StreamingModel`.

Validation streams T frames against the float64 PyTorch reference, computed piece by piece so memory stays
flat however long the stream is. Real-valued outputs are judged by their error; spike outputs (`spikes.<layer>`)
by the fraction of spikes that agree, since a compiled artifact may flip a spike whose membrane sits within
rounding of the threshold; and the running-mean outputs by whether their arg-max (the prediction) agrees.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit import measure, render
from edgekit.artifact import Bundle, check_runs_here, load_library
from edgekit.engines import ort_session
from edgekit.errors import BundleError, EdgekitError, InputShapeError
from edgekit.measure import WINDOW, FrameSource, Tally
from edgekit.quantize import QuantizedModel, scheme_of
from edgekit.units import BenchOptions, Unit
from edgekit.worker import WorkerSession

GOLDEN, GOLDEN_FRAMES = "reference.npz", 512  # reference outputs shipped in the bundle, for boards without torch
WHOLE_SEQUENCE_LIMIT = WINDOW * 16  # a reference without a finite horizon and with a delay is computed in one piece
HOP_SECONDS = 0.010  # one frame of the published audio front end: 10 ms shift
MAX_CHUNK = 1024  # frames per call an entry may take
STATE_PACKING = ("entries take (x, state) and return (outputs, state): state is one float32 vector, the state "
                 "tensors flattened in manifest order; outputs likewise, each [batch, frames, ...]")
FLOAT32 = np.dtype(np.float32)
# The sessions' input probe (frames . zeros) is NaN exactly when a frame holds NaN or Inf; Inf * 0 also raises the
# invalid flag, which numpy would print as a warning on top of the refusal.
warnings.filterwarnings("ignore", "invalid value encountered in dot", RuntimeWarning, __name__)
KERNEL_CHECK_CALLS, KERNEL_CHECK_WINDOWS = 1024, 8  # a quantized bundle's call-by-call kernel check: calls, windows
SILENCE_CALLS = 25  # bench streams this many calls of random frames, then as many of silence, and so on


def entry_names(chunks: tuple[int, ...], delay: int) -> list[str]:
    """Entry points of a bundle: `step` (1 frame), `chunk<K>` per extra chunk size, `flush` if delayed."""
    return [("step" if k == 1 else f"chunk{k}") for k in chunks] + (["flush"] if delay else [])


def entry_frames(entry: str) -> int:
    return 1 if entry == "step" else int(entry.removeprefix("chunk")) if entry.startswith("chunk") else 0


def entry_for(bundle: Bundle, frames: int) -> str:
    """The bundle's entry that takes `frames` frames per call."""
    if frames < 1:
        raise InputShapeError(f"a call takes at least one frame, got {frames}",
                              f"chunk sizes built: {chunk_sizes(bundle)}")
    for name, entry in bundle.manifest["entries"].items():
        if entry["frames"] == frames:
            return name
    raise BundleError(f"bundle has no entry for chunks of {frames} frames", f"chunk sizes built: {chunk_sizes(bundle)}")


def chunk_sizes(bundle: Bundle) -> list[int]:
    return sorted(e["frames"] for e in bundle.manifest["entries"].values() if e["frames"])


@dataclass(frozen=True)
class ExportOptions:
    chunks: tuple[int, ...] = (1, 16)  # frames per call to build entries for (1 always)
    batch: int = 1

    def __post_init__(self):
        if 1 not in self.chunks or any(k < 1 for k in self.chunks) or self.batch < 1:
            raise EdgekitError(f"chunk sizes must be positive and include 1 (got {tuple(self.chunks)}), batch >= 1",
                               "e.g. --chunk 1 --chunk 16")
        if max(self.chunks) > MAX_CHUNK:
            raise EdgekitError(f"chunk {max(self.chunks)} is over {MAX_CHUNK} frames: export and compile time and "
                               "memory grow with the chunk", f"build chunks of at most {MAX_CHUNK} frames; a longer "
                               "input streams as several calls")
        object.__setattr__(self, "chunks", tuple(sorted(set(self.chunks))))


@dataclass(frozen=True)
class ValidateOptions:
    """utterance=N splits the stream into independent utterances of N frames, each from a fresh state and
    flushed (as a classifier of short clips sees them). Pass criteria: real-valued outputs within atol or within rtol
    of the reference's magnitude (for spiking models, where one flipped spike moves the logits, the prediction criterion
    replaces this); each spike layer's agreement >= spike_agreement; the running-mean predictions' agreement >=
    prediction_agreement; resident memory at T within 5 MiB of T/10. A quantized bundle is judged against the
    quantized reference in its own steps instead of atol/rtol: outputs within max_steps quantization steps, at most
    max_codes_differing of their codes differing, predictions agreeing >= prediction_agreement."""

    frames: int = 10_000
    chunk: int = 1
    seed: int = 0
    atol: float = 1e-4
    rtol: float = 1e-3
    utterance: int | None = None
    spike_agreement: float = 0.999
    prediction_agreement: float = 0.999
    max_steps: float = 2.0
    max_codes_differing: float = 0.001

    def __post_init__(self):
        if self.frames < 1 or (self.utterance is not None and self.utterance < 1) or self.chunk < 1:
            raise EdgekitError("--frames, --chunk and --utterance must be positive")
        if min(self.frames, self.utterance or self.frames) < self.chunk:
            raise EdgekitError(f"a stream of {min(self.frames, self.utterance or self.frames)} frames never calls "
                               f"the chunk-{self.chunk} entry", "stream at least --chunk frames")
        if not (self.atol >= 0 and self.rtol >= 0 and self.max_steps >= 0 and 0 <= self.spike_agreement <= 1
                and 0 <= self.prediction_agreement <= 1 and 0 <= self.max_codes_differing <= 1):
            raise EdgekitError("--atol and --rtol must be >= 0 (and max_steps), the agreements and "
                               "max_codes_differing within [0, 1]")


# ---- sessions: numpy and the TVM runtime only ------------------------------------------------------------------

class FrameSession:
    """What every frame session offers: step and flush (by the subclass), feed and run on top of them."""

    execution, pid = "native", None  # pid: the process running the artifact, when it is not this one

    def __init__(self, bundle: Bundle, allow_nonfinite: bool = False):
        m = bundle.manifest
        if m.get("state_packing") != STATE_PACKING:
            raise BundleError(f"{bundle.path} was built by an earlier edgekit (one tensor per state)",
                              "recompile the bundle with this edgekit")
        self.bundle, self.input_size, self.batch = bundle, m["input"]["shape"][-1], m["batch"]
        self.outputs, self.state_specs, self.delay = [o["name"] for o in m["outputs"]], m["state"], m["delay"]
        self.output_shapes = {o["name"]: o["shape"][2:] for o in m["outputs"]}
        self.entries = {e["frames"]: name for name, e in m["entries"].items() if e["frames"]}
        self.allow_nonfinite = allow_nonfinite

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """x as float32 frames of a built chunk size, or a clear error (the common case costs ~2 us)."""
        fits = type(x) is np.ndarray and x.dtype is FLOAT32 and x.ndim == 3 and x.shape[0] == self.batch \
            and x.shape[2] == self.input_size and x.shape[1] in self.entries
        if not fits:
            x = self._convert(x)
        if not self.allow_nonfinite and not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x))[0][1])
            raise InputShapeError(f"frame {bad} of this call holds NaN or Inf; the call was refused and the state is "
                                  "as before it", "clean the input, or open the session with allow_nonfinite=True "
                                  "(outputs are then non-finite from that frame on, as in PyTorch)")
        return x

    def _convert(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != self.batch or x.shape[2] != self.input_size:
            raise InputShapeError(f"input of shape {x.shape} does not fit this bundle",
                                  f"pass frames as [batch={self.batch}, K, features={self.input_size}]")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputShapeError(f"input dtype {x.dtype} is not floating point", "pass float32 frames")
        entry_for(self.bundle, x.shape[1])
        return x.astype(np.float32, copy=False)

    def reset(self) -> None:
        raise NotImplementedError

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x [batch, K, features] with K a built chunk size; outputs [batch, K, ...] for frames t-K-delay+1..t-delay."""
        raise NotImplementedError

    def flush(self) -> dict[str, np.ndarray]:
        """The last `delay` outputs of the stream, as if it were zero-padded offline."""
        raise NotImplementedError

    def read_state(self) -> dict[str, np.ndarray]:
        """The state now, tensor by tensor (a copy)."""
        raise NotImplementedError

    def feed(self, x: np.ndarray, chunk: int = 1) -> dict[str, np.ndarray]:
        """Frames [batch, T, features] through whole chunks, the remainder frame by frame; outputs concatenated
        (T = 0: empty outputs)."""
        if chunk < 1:
            raise InputShapeError(f"chunk must be at least 1 frame, got {chunk}")
        if np.shape(x)[1] == 0:
            return {n: np.zeros((self.batch, 0, *s), np.float32) for n, s in self.output_shapes.items()}
        whole = (x.shape[1] // chunk) * chunk
        starts = [(t, chunk) for t in range(0, whole, chunk)] + [(t, 1) for t in range(whole, x.shape[1])]
        return _concat([self.step(x[:, t:t + k]) for t, k in starts])

    def run(self, x: np.ndarray, chunk: int = 1) -> dict[str, np.ndarray]:
        """A whole stream [batch, T, features] from a fresh state, flushed, aligned to the frames (like `forward`)."""
        self.reset()
        return {k: v[:, self.delay:] for k, v in _concat([self.feed(x, chunk), self.flush()]).items()}


class Call:
    """What a call of one input shape needs, made on its first call: the entry, a 64-byte aligned input buffer
    and the same memory as a device tensor (on a CPU), zeros to probe the input with, and where each output lies
    in the entry's one flat output vector."""

    __slots__ = ("function", "buffer", "flat", "zeros", "tensor", "outputs")

    def __init__(self, session: LocalSession, shape: tuple[int, ...]):
        self.function = session.funcs[session.entries[shape[1]]]
        if session.bundle.device == "cpu":
            self.buffer, self.tensor = session.vm.aligned(shape, np.float32)
        else:
            self.buffer, self.tensor = np.zeros(shape, np.float32), None  # copied to the device per call
        self.flat, self.zeros = self.buffer.reshape(-1), np.zeros(self.buffer.size, np.float32)
        self.outputs = layout(session.output_shapes, session.batch, shape[1])


def cpu_step(session: LocalSession, call: Call) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A CPU session's step for float32 frames of one shape, as a closure over all it touches. After the entry
    has streamed its weights through the caches, each object and line of interpreter code a call touches is a
    cache miss: that, not the work, is most of a call's overhead, so this path touches as little as it can."""
    buffer, flat, zeros, function, tensor, outputs = call.buffer, call.flat, call.zeros, call.function, \
        call.tensor, call.outputs
    check, isfinite, view = not session.allow_nonfinite, math.isfinite, np.from_dlpack

    def step(x: np.ndarray) -> dict[str, np.ndarray]:
        if x is not buffer:
            buffer[...] = x
        if check and not isfinite(flat.dot(zeros)):
            session.check_input(x)  # refuses the call, naming the frame
        packed, session.state = function(tensor, session.state)
        packed, result = view(packed), {}
        for name, where, shape in outputs:
            result[name] = packed[where].reshape(shape)
        return result
    return step


class LocalSession(FrameSession):
    """The bundle's library in this process. The state is one flat vector that stays on the device between
    calls; on a CPU the input goes in through a preallocated aligned buffer (`input_buffer`: fill it and step it,
    and nothing is copied) and the outputs come back as views of the entry's one flat output vector. Per call
    Python adds ~3 us with warm caches: the input check (a dot product with zeros is NaN exactly when a frame holds
    NaN or Inf), one copy of the frames, the call, and the output views (`cpu_step`)."""

    OPS = ("reset", "step", "flush", "read_state")  # what a Worker may run

    def __init__(self, bundle: Bundle, allow_nonfinite: bool = False):
        check_runs_here(bundle)
        self.vm = load_library(bundle)  # first: it proves the manifest's interface fields before they are used
        super().__init__(bundle, allow_nonfinite)
        self.funcs = {name: self.vm.raw_function(name) for name in bundle.manifest["entries"]}
        self.calls: dict[tuple[int, ...], Call] = {}
        self.fast: dict[tuple[int, ...], Callable[[np.ndarray], dict[str, np.ndarray]]] = {}  # `cpu_step` per shape
        self.reset()

    def reset(self) -> None:
        self.state, self.flushed = self.vm.tensor(pack(self.bundle.zero_state())), False

    def _ended(self, ending: bool) -> None:
        """A flushed stream has ended: stepping or flushing it again would compute nothing meaningful."""
        if self.flushed:
            raise EdgekitError("this stream was flushed: it has ended", "call reset() to start a new stream")
        self.flushed = ending

    def input_buffer(self, frames: int = 1) -> np.ndarray:
        """The session's own input buffer [batch, frames, features] for calls of `frames` frames: frames written
        into it and passed to `step` go to the compiled entry without a copy (valid until the session closes)."""
        entry_for(self.bundle, frames)
        return self._call((self.batch, frames, self.input_size)).buffer

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        fast = self.fast.get(x.shape) if type(x) is np.ndarray and x.dtype is FLOAT32 and not self.flushed else None
        return fast(x) if fast is not None else self._step(x)

    def _step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """A first call of its shape, a call after flush (refused), other dtypes, and GPU bundles."""
        x = self.check_input(x)
        self._ended(False)
        call = self._call(x.shape)
        call.buffer[...] = x
        if call.tensor is not None:
            return self.fast[x.shape](call.buffer)
        outputs, self.state = call.function(self.vm.tensor(call.buffer), self.state)
        flat = self.vm.numpy(outputs)
        return {name: flat[where].reshape(shape) for name, where, shape in call.outputs}

    def _call(self, shape: tuple[int, ...]) -> Call:
        if shape not in self.calls:
            self.calls[shape] = call = Call(self, shape)
            if call.tensor is not None:
                self.fast[shape] = cpu_step(self, call)
        return self.calls[shape]

    def flush(self) -> dict[str, np.ndarray]:
        self._ended(True)
        if not self.delay:  # nothing to compute without a delay, but the stream ends all the same
            return {n: np.zeros((self.batch, 0, *s), np.float32) for n, s in self.output_shapes.items()}
        outputs, self.state = self.funcs["flush"](self.state)
        return unpack(self.vm.numpy(outputs), self.output_shapes, self.batch, self.delay)

    def read_state(self) -> dict[str, np.ndarray]:
        shapes = {s["name"]: s["shape"] for s in self.state_specs}
        return {k: v.copy() for k, v in unpack(self.vm.numpy(self.state), shapes).items()}

    def write_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue the stream from this state (as `read_state` returns it)."""
        self.state = self.vm.tensor(pack([state[s["name"]] for s in self.state_specs]))


class RemoteSession(WorkerSession, FrameSession):
    """A frame session whose library runs in a Worker."""

    def __init__(self, bundle: Bundle, worker, allow_nonfinite: bool = False):
        FrameSession.__init__(self, bundle, allow_nonfinite)  # checked here: the worker serves only this session
        WorkerSession.__init__(self, bundle, worker)

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.worker("step", x=self.check_input(x))

    def flush(self) -> dict[str, np.ndarray]:
        return self.worker("flush")


def layout(shapes: dict[str, list[int]], *lead: int) -> list[tuple[str, slice, tuple[int, ...]]]:
    """Where each named array of shape `lead + shape` lies in a packed vector, in order (the entries' packing)."""
    out, at = [], 0
    for name, shape in shapes.items():
        size = math.prod(lead) * math.prod(shape)
        out.append((name, slice(at, at + size), (*lead, *shape)))
        at += size
    return out


def unpack(flat: np.ndarray, shapes: dict[str, list[int]], *lead: int) -> dict[str, np.ndarray]:
    """Views of a packed vector as named arrays of shapes `lead + shape`, in order (the entries' packing)."""
    return {name: flat[where].reshape(shape) for name, where, shape in layout(shapes, *lead)}


def pack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])


def _concat(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in pieces], axis=1) for k in pieces[0]}


# ---- references ------------------------------------------------------------------------------------------------

class Reference:
    """Per-frame float64 reference outputs of one utterance [offset, offset + length) of the stream, in order.

    A short one is computed by `forward` in one piece. A longer one, for a model with a finite horizon, by
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
        """Reference outputs for frames [start, stop) of the utterance; calls come in order, without gaps."""
        if self.whole is not None:
            y = {k: v[:, start:stop] for k, v in self.whole.items()}
        elif self.state is not None:
            import torch

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


class QuantizedFrames(QuantizedModel):
    """A frame model with quantized products as the reference: streamed through its own step, which is what the
    artifact computes (the parallel forward computes its products in another shape), its outputs in float64 so
    that they compare like the float64 reference's."""

    horizon = None  # computed by carrying the state, never by windows of the parallel form
    chunk = 16

    def step_chunk(self, x, state):
        y, state = self.__getattr__("step_chunk")(x, state)
        return {k: v.double() for k, v in y.items() if k not in self.net.running_means}, state

    def forward_frames(self, x):
        y = self.__getattr__("stream")(x, self.chunk)
        return {k: v.double() for k, v in y.items() if k not in self.net.running_means}


class GoldenReference(Reference):
    """Reference outputs read from the bundle's golden record instead of computed (no torch needed)."""

    def __init__(self, bundle: Bundle, offset: int, length: int):
        with np.load(bundle.path / bundle.manifest["golden"]["file"]) as f:
            self.whole = {k: f[k][:, offset:offset + length] for k in f.files}
        self.running_means, self.sums, self.count, self.state = bundle.manifest["running_means"], {}, 0, None


def _kernel_check(session: FrameSession, reference: QuantizedFrames, source: FrameSource, o: ValidateOptions
                  ) -> tuple[Tally, int]:
    """A quantized bundle's kernels call by call: in `KERNEL_CHECK_WINDOWS` windows spread over the stream (the
    artifact streams on alone between them), the quantized reference restarts from the artifact's own state
    before every call, so a code that flips on a rounding boundary counts in the call where it flips, and not
    again in every later frame the carried state reaches (the free-running stream counts those). The tally and
    the frames checked."""
    import torch

    session.reset()
    calls, dtypes = o.frames // o.chunk, {s["name"]: s["dtype"] for s in session.state_specs}
    per_window = max(1, min(calls, KERNEL_CHECK_CALLS) // KERNEL_CHECK_WINDOWS)
    tally, t, checked, threads = Tally(o.frames, quantized=True), 0, 0, torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's ops are tiny: threads only wait on each other
    try:
        for start in np.linspace(0, calls - per_window, KERNEL_CHECK_WINDOWS).astype(int) * o.chunk:
            while t < start:  # the artifact alone up to the window
                stop = min(start, t + WINDOW)
                session.feed(source.frames(t, stop, session.batch), o.chunk)
                t = stop
            for _ in range(per_window):
                state = {k: torch.from_numpy(v.astype(dtypes[k])) for k, v in session.read_state().items()}
                x = source.frames(t, t + o.chunk, session.batch)
                got = session.step(x)
                want, _ = reference.step_chunk(torch.from_numpy(x), state)
                tally.add({k: got[k] for k in want}, {k: v.numpy() for k, v in want.items()}, t, [])
                t, checked = t + o.chunk, checked + o.chunk
    finally:
        torch.set_num_threads(threads)
    return tally, checked


def _refuses_nonfinite(session: FrameSession) -> bool:
    """A NaN frame is refused by a default session (with the state kept), never turned into finite outputs."""
    session.reset()
    try:
        session.step(np.full((session.batch, 1, session.input_size), np.nan, np.float32))
    except InputShapeError:
        return True
    return False


def skippable_macs(net, spikes: dict[str, dict]) -> dict:
    """Multiply-adds per frame, and how many of them multiply a zero spike at the measured sparsity."""
    fanout, total = net.spike_fanout(), net.macs_per_frame()
    skip = {layer: fanout[layer] * s["sparsity_artifact"] for layer, s in spikes.items()}
    return {"per_frame": total, "fed_by_spikes": sum(fanout.values()), "skippable": round(sum(skip.values())),
            "skippable_fraction": sum(skip.values()) / total,
            "skippable_by_layer": {k: round(v) for k, v in skip.items()}}


# ---- bench engines: each a callable on one chunk of frames, state carried ---------------------------------------

def _torch_engine(bundle: Bundle, torch_model, frames: int, threads: int | None):
    import torch

    net = torch_model()
    state = net.init_state(bundle.manifest["batch"])

    @torch.no_grad()
    def call(x: np.ndarray):
        nonlocal state
        y, state = net.step_chunk(torch.from_numpy(x), state)
        return y

    return call


def _onnxruntime_engine(bundle: Bundle, torch_model, frames: int, threads: int | None):
    return OrtFrames(bundle, threads, (frames,))


class OrtFrames:
    """The bundle's frame entries in ONNX Runtime, the packed state carried between calls in numpy: x [B, K, F]
    with K one of `chunks` -> the outputs, in manifest order."""

    def __init__(self, bundle: Bundle, threads: int | None, chunks: tuple[int, ...]):
        m = bundle.manifest
        self.bundle, self.sessions = bundle, {k: ort_session(bundle, entry_for(bundle, k), threads) for k in chunks}
        self.shapes, self.batch = {o["name"]: o["shape"][2:] for o in m["outputs"]}, m["batch"]
        self.reset()

    def reset(self) -> None:
        self.state = pack(self.bundle.zero_state())

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        outputs, self.state = self.sessions[x.shape[1]].run(None, {"x": x, "state": self.state})
        return list(unpack(outputs, self.shapes, self.batch, x.shape[1]).values())


def bench_frames(bundle: Bundle, frames: int, calls: int, rng: np.random.Generator) -> np.ndarray:
    """Inputs of `calls` calls of `frames` frames [calls, batch, frames, features]: random frames and silence in
    alternating stretches of `SILENCE_CALLS` calls, so that a decaying state reaches denormals as in real use."""
    m = bundle.manifest
    xs = rng.standard_normal((calls, m["batch"], frames, m["input"]["shape"][-1]), dtype=np.float32)
    xs[(np.arange(calls) // SILENCE_CALLS) % 2 == 1] = 0
    return xs


def _tvm_paired(bundle: Bundle, xs: np.ndarray, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per call of the session's `step` and of its compiled entry alone (called through tvm-ffi on the
    session's own input buffer, already filled), both on every input in turn, first one then the other, over one
    carried state: their paired difference is what the session adds to a call, whatever else the machine does."""
    session = LocalSession(bundle)
    buffer = session.input_buffer(xs.shape[2])
    call, to_device, sync = session.calls[buffer.shape], session.vm.tensor, session.vm.sync
    steps, computes = [], []
    for i, x in enumerate(xs):
        for alone in ((False, True) if i % 2 else (True, False)):
            if alone:
                buffer[...] = x
                t0 = time.perf_counter()
                _, session.state = call.function(call.tensor if call.tensor is not None else to_device(buffer),
                                                 session.state)
                sync()
                (computes if i >= warmup else []).append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                session.step(x)
                (steps if i >= warmup else []).append(time.perf_counter() - t0)
    return steps, computes


ENGINES = {"pytorch": _torch_engine, "onnxruntime": _onnxruntime_engine}  # tvm: `_tvm_paired`


# ---- the unit ---------------------------------------------------------------------------------------------------

class Frame(Unit):
    name = "frame"
    ExportOptions, ValidateOptions = ExportOptions, ValidateOptions
    quantizations = ("none", "int8")

    def reference(self, net, scheme: str):
        return net if scheme == "none" else QuantizedFrames(net, scheme)

    def export_entries(self, net, options: ExportOptions) -> list[tuple]:
        """Every entry with its state packed into one flat vector: (x?, state [S]) -> (outputs [O], state [S]),
        so that a call passes two tensors whatever the number of state tensors (`STATE_PACKING`)."""
        return [(e, *net.entry(entry_frames(e), options.batch, packed=True))
                for e in entry_names(options.chunks, net.delay)]

    def manifest_fields(self, net, options: ExportOptions) -> dict:
        b = options.batch
        return {
            "unit": self.name,
            "delay": net.delay,
            "horizon": net.horizon,
            "input": net.input_spec(b).to_json(),
            "outputs": [s.to_json() for s in net.output_spec(b)],
            "running_means": net.running_means,
            "state": [s.to_json() for s in net.state_spec(b)],
            "state_bytes": sum(4 * math.prod(s.shape) for s in net.state_spec(b)),
            "entries": {e: {"frames": entry_frames(e), "onnx": f"onnx/{e}.onnx"}
                        for e in entry_names(options.chunks, net.delay)},
            "state_packing": STATE_PACKING,
        }

    def write_golden(self, net, path: Path) -> dict:
        import torch

        x = torch.from_numpy(FrameSource(net.input_size, 0).frames(0, GOLDEN_FRAMES)).double()
        with torch.no_grad():
            y = net.double().forward_frames(x)
        net.float()
        np.savez(path, **{k: v.numpy() for k, v in y.items()})
        return {"file": GOLDEN, "frames": GOLDEN_FRAMES, "seed": 0}

    def session(self, bundle: Bundle, allow_nonfinite: bool = False) -> LocalSession:
        return LocalSession(bundle, allow_nonfinite)

    def remote_session(self, bundle: Bundle, worker, allow_nonfinite: bool = False) -> RemoteSession:
        return RemoteSession(bundle, worker, allow_nonfinite)

    def describe(self, manifest: dict) -> str:
        return f"delay {manifest['delay']} frames"

    def validate(self, bundle: Bundle, session, net, options: ValidateOptions, progress) -> dict:
        frames, utterance = options.frames, options.utterance
        if net is None:  # a board with only the runtime: compare with the golden record compiled into the bundle
            golden = bundle.manifest["golden"]
            if options.seed != golden["seed"] or utterance:
                raise EdgekitError("without PyTorch, validation compares with the bundle's golden record: "
                                   f"{golden['frames']} frames of seed {golden['seed']}, one stream",
                                   "drop --seed/--utterance, or install edgekit[compile] for any stream")
            frames = golden["frames"]  # the record is one finished stream of exactly this length
        chunk = options.chunk
        entry_for(bundle, chunk)
        source = FrameSource(session.input_size, options.seed)
        means = list(bundle.manifest["running_means"])
        scheme = scheme_of(bundle.manifest)
        fp32, net = net, (self.reference(net, scheme) if net is not None else None)
        tally, rss, t0 = Tally(frames, quantized=scheme != "none"), {}, time.perf_counter()
        effect = Tally(frames) if scheme != "none" and fp32 is not None else None  # quantized model vs fp32
        length = utterance or frames
        marks, done = measure.rss_marks(frames), 0
        for offset in range(0, frames, length):
            seg = min(length, frames - offset)
            ref = Reference(net, source, offset, seg, bundle.manifest["running_means"]) if net is not None else \
                GoldenReference(bundle, offset, seg)
            ref64 = Reference(fp32, source, offset, seg, bundle.manifest["running_means"]) if effect else None
            session.reset()
            next_frame, last = -session.delay, ({}, {})

            def compare(got: dict[str, np.ndarray]) -> None:
                nonlocal next_frame, last
                n, keep = next(iter(got.values())).shape[1], max(0, -next_frame)  # the first `delay` calls emit nothing
                if n > keep:
                    got = {o: v[:, keep:] for o, v in got.items()}
                    want = ref.outputs(next_frame + keep, next_frame + n)
                    tally.add(got, want, offset + next_frame + keep, means)
                    if effect:
                        want64 = ref64.outputs(next_frame + keep, next_frame + n)
                        effect.add(want, want64, offset + next_frame + keep, means)
                    last = (got, want, *((want64,) if effect else ()))
                next_frame += n

            window = max(chunk, (WINDOW // chunk) * chunk)
            start = 0
            for stop in measure.pieces(seg, window, [m - done for m in marks]):
                compare(session.feed(source.frames(offset + start, offset + stop, session.batch), chunk))
                if done + stop in marks:
                    rss[done + stop] = measure.rss_bytes(session.pid)
                progress(done + stop, frames)
                start = stop
            if session.delay:
                compare(session.flush())
            tally.end_of_segment(*last[:2], means)
            if effect:
                effect.end_of_segment(last[1], last[2], means)
            done += seg
        seconds = time.perf_counter() - t0
        kernel = _kernel_check(session, net, source, options) if effect else None
        report = _report(bundle, tally, rss, frames, options, seconds, kernel)
        if effect:
            report["quantization_effect"] = {"against": "the float64 PyTorch model without quantization",
                                             "outputs": effect.errors(), "predictions": _predictions(effect, options),
                                             "spikes": _spikes(effect)}
        report["checks"]["nonfinite_input_refused"] = _refuses_nonfinite(session)
        report["passed"] = all(report["checks"].values())
        if net is not None and report["spikes"] and net.spike_fanout():
            report["macs"] = skippable_macs(net, report["spikes"])
        return report

    def bench(self, bundle: Bundle, options: BenchOptions, torch_model, progress) -> dict:
        m = bundle.manifest
        rng = np.random.default_rng(options.seed)
        results = []
        for frames in chunk_sizes(bundle):
            n = max(options.warmup + 10, options.calls // frames)
            xs = bench_frames(bundle, frames, n, rng)
            for engine in options.engines:
                progress(f"{engine}, chunk {frames}: {n} calls")
                if engine == "tvm":
                    steps, computes = _tvm_paired(bundle, xs, options.warmup)
                    overhead = float(np.median(np.subtract(steps, computes))) * 1e6
                    results += [{"engine": "tvm", **measure.summarize(steps, frames, hop=HOP_SECONDS),
                                 "session_overhead_us": overhead},
                                {"engine": "tvm-compute", **measure.summarize(computes, frames, hop=HOP_SECONDS)}]
                    continue
                call = ENGINES[engine](bundle, torch_model, frames, options.threads)
                results.append({"engine": engine, **measure.summarize(measure.time_calls(call, xs, options.warmup),
                                                                      frames, hop=HOP_SECONDS)})
        return {"hop_ms": HOP_SECONDS * 1e3, "batch": m["batch"], "results": results,
                "input": f"standard normal frames and silence (zeros), alternating every {SILENCE_CALLS} calls, the "
                         "state carried; tvm-compute: the compiled entry alone (through tvm-ffi on the session's "
                         "preallocated tensors), taking turns with the tvm session's step on every input, one state "
                         "carried through both; session_overhead_us: their paired difference per call (p50)",
                "note": "per-frame latency = call latency / frames per call; real-time factor = p50 per frame / hop"}

    def render_validation(self, report: dict) -> list:
        out = [render.errors(f"validation of {report['bundle']} ({report['frames']} frames, chunk {report['chunk']}, "
                             f"{report['seconds']} s)", report)]
        if report["spikes"]:
            out.append(render.table("spikes per layer", ["layer", "agreement", "sparsity (artifact)",
                                                         "sparsity (reference)"],
                                    [[n, f"{s['agreement']:.6f}", f"{s['sparsity_artifact']:.4f}",
                                      f"{s['sparsity_reference']:.4f}"] for n, s in report["spikes"].items()]))
        if "macs" in report:
            m = report["macs"]
            out.append(f"multiply-adds per frame {m['per_frame']:,}; fed by spikes {m['fed_by_spikes']:,}; "
                       f"skippable at this sparsity {m['skippable']:,} ({m['skippable_fraction']:.1%})")
        out += [f"prediction agreement ({name} arg-max): " + ", ".join(f"{k} {v:.4%}" for k, v in p.items())
                for name, p in report["predictions"].items()]
        out += render.quantized(report)
        if effect := report.get("quantization_effect"):
            out += [f"quantized vs fp32 prediction agreement ({name} arg-max): " +
                    ", ".join(f"{k} {v:.4%}" for k, v in p.items()) for name, p in effect["predictions"].items()]
            if spikes := effect.get("spikes"):
                low = min(spikes, key=lambda n: spikes[n]["agreement"])
                out.append(f"quantized vs fp32 spike agreement: lowest {spikes[low]['agreement']:.4%} ({low}), mean "
                           f"{np.mean([v['agreement'] for v in spikes.values()]):.4%} over {len(spikes)} layers")
        return out + render.validation_footer(report)

    def render_bench(self, report: dict) -> list:
        rows = []
        for r in report["results"]:
            fmt = lambda k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
            engine = (r["engine"] if "bundles" not in report
                      else f"{r['engine']} {r['precision']} {Path(r['bundle']).name}")
            rows.append([engine, str(r["frames_per_call"]), fmt("p50_us"), fmt("p90_us"), fmt("p99_us"), fmt("max_us"),
                         f"{r['frames_per_second']:.0f}", f"{r['real_time_factor']:.4f}"])
        return [render.table(f"{report['model']} on {report['target']}: latency per frame "
                             f"(hop {report['hop_ms']:g} ms)",
                             ["engine", "chunk", "p50 us", "p90 us", "p99 us", "max us", "frames/s", "RTF"], rows),
                *[f"the Python session adds {r['session_overhead_us']:.1f} us per call at chunk {r['frames_per_call']} "
                  "(p50 of step minus the entry alone, call by call)"
                  f"{'' if 'bundles' not in report else ' in ' + Path(r['bundle']).name}"
                  for r in report["results"] if "session_overhead_us" in r],
                *render.bench_footer(report)]


def _spikes(tally: Tally) -> dict:
    """Per spiking layer: the fraction of spikes that agree, and each side's sparsity (the fraction of zeros)."""
    return {name.removeprefix("spikes."): {"agreement": int(a) / int(n), "sparsity_artifact": int(za) / int(n),
                                           "sparsity_reference": int(zr) / int(n)}
            for name, (a, n, za, zr) in tally.spikes.items()}


def _predictions(tally: Tally, o: ValidateOptions) -> dict:
    return {name: {"agreement_per_frame": int(a) / int(n),
                   "agreement_per_utterance" if o.utterance else "agreement_at_end": int(ae) / int(ne)}
            for name, (a, n, ae, ne) in tally.predictions.items()}


def _report(bundle: Bundle, tally: Tally, rss: dict[int, int], frames: int, o: ValidateOptions, seconds: float,
            kernel: tuple[Tally, int] | None = None) -> dict:
    """The validation report. A quantized bundle's step criteria judge its kernel check where one ran (the
    free-running stream's codes and steps are then reported as what the carried state makes of rounding flips,
    judged by its predictions), else the free-running stream."""
    spiking = bool(tally.spikes)
    outputs = tally.errors()
    judged = kernel[0].errors() if kernel else outputs
    spikes = _spikes(tally)
    predictions = _predictions(tally, o)
    mem = measure.memory(rss, frames)
    quantized = scheme_of(bundle.manifest) != "none"
    checks = {
        **(measure.step_checks(judged, o.max_steps, o.max_codes_differing) if quantized else
           {} if spiking else measure.error_checks(outputs, o.atol, o.rtol)),
        **{f"spikes.{name}_agreement": s["agreement"] >= o.spike_agreement for name, s in spikes.items()},
        **({f"{name}_prediction": p["agreement_per_frame"] >= o.prediction_agreement
            for name, p in predictions.items()} if spiking or quantized else {}),
        **mem["checks"],
    }
    return {
        "bundle": str(bundle.path), "target": bundle.target["name"], "frames": frames, "chunk": o.chunk,
        "seed": o.seed, "utterance": o.utterance,
        "input": "standard normal frames, numpy default_rng([seed, block]) per 4096-frame block",
        "reference": "PyTorch in float64: the parallel forward (windowed over the model's horizon where it has one; "
                     "for a causal model without a horizon, its parallel chunk form carrying the state)"
                     if not quantized
                     else f"PyTorch with the bundle's {scheme_of(bundle.manifest)} products (edgekit.quantize): "
                          "the model's step in fp32 carrying its state, products exact in int32",
        "criteria": {**({"max_steps": o.max_steps, "max_codes_differing": o.max_codes_differing} if quantized else
                        {"atol": o.atol, "rtol": o.rtol}), "real_valued_outputs_judged": not spiking or quantized,
                     "spike_agreement_min": o.spike_agreement, "prediction_agreement_min": o.prediction_agreement,
                     "rss_change_max_bytes": measure.RSS_CHANGE_MAX},
        "outputs": outputs, "spikes": spikes, "predictions": predictions,
        "state_bytes": bundle.manifest["state_bytes"], "rss_bytes": mem["rss_bytes"],
        "seconds": round(seconds, 2), "checks": checks, "passed": all(checks.values()),
        **({"kernel_check": {"items": kernel[1], "unit": "frames", "outputs": judged,
                             "how": f"call by call in {KERNEL_CHECK_WINDOWS} windows over the stream, the quantized "
                                    "reference restarted from the artifact's state before every call"}}
            if kernel else {}),
    }


UNIT = Frame()
