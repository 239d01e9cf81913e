"""Running a bundle: a streaming session over the compiled library that keeps the state on the device between
calls. Needs numpy and the TVM runtime only (no torch, no compiler), so it is what a board runs.

`open_session` picks where: in this process when the bundle is for this machine, or in an aarch64 Python under
qemu-aarch64 (the same bits a board runs, for correctness only) when an ARM bundle is opened on x86_64.
"""
from __future__ import annotations

import io
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgekit.artifact import Bundle, check_runs_here, load
from edgekit.errors import BundleError, EdgekitError, InputShapeError
from edgekit.tvm_runtime import load_vm


def require_frames(bundle: Bundle) -> Bundle:
    """Frame-streaming stages (sessions, validate, bench) refuse bundles whose unit is a text segment."""
    m = bundle.manifest
    if m.get("unit", "frame") != "frame":
        raise BundleError(f"{bundle.path} is a {m['model']['family']} bundle with {m['unit']}-level entries, "
                          "not a frame-streaming model", "run it with `edgekit generate --bundle`")
    return bundle


class StreamSession:
    """What every session offers: step and flush (by the subclass), feed and run on top of them."""

    bundle: Bundle
    execution = "native"
    pid: int | None = None  # the process running the artifact, when it is not this one

    def __init__(self, bundle: Bundle):
        m = require_frames(bundle).manifest
        self.bundle, self.input_size, self.batch = bundle, m["input"]["shape"][-1], m["batch"]
        self.outputs, self.state_specs, self.delay = [o["name"] for o in m["outputs"]], m["state"], m["delay"]

    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != self.batch or x.shape[2] != self.input_size:
            raise InputShapeError(f"input of shape {x.shape} does not fit this bundle",
                                  f"pass frames as [batch={self.batch}, K, features={self.input_size}]")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputShapeError(f"input dtype {x.dtype} is not floating point", "pass float32 frames")
        self.bundle.entry_for(x.shape[1])
        return x.astype(np.float32, copy=False)

    def reset(self) -> None:
        raise NotImplementedError

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x [batch, K, features] with K a built chunk size; outputs [batch, K, ...] for frames t-K-delay+1..t-delay."""
        raise NotImplementedError

    def flush(self) -> dict[str, np.ndarray]:
        """The last `delay` outputs of the stream, as if it were zero-padded offline."""
        raise NotImplementedError

    def feed(self, x: np.ndarray, chunk: int = 1) -> dict[str, np.ndarray]:
        """Frames [batch, T, features] through whole chunks, the remainder frame by frame; outputs concatenated."""
        whole = (x.shape[1] // chunk) * chunk
        starts = [(t, chunk) for t in range(0, whole, chunk)] + [(t, 1) for t in range(whole, x.shape[1])]
        return _concat([self.step(x[:, t:t + k]) for t, k in starts])

    def run(self, x: np.ndarray, chunk: int = 1) -> dict[str, np.ndarray]:
        """A whole stream [batch, T, features] from a fresh state, flushed, aligned to the frames (like `forward`)."""
        self.reset()
        return {k: v[:, self.delay:] for k, v in _concat([self.feed(x, chunk), self.flush()]).items()}


class Session(StreamSession):
    """The bundle's library in this process. State never leaves the device between calls."""

    OPS = ("reset", "step", "flush")  # what a Worker may run

    def __init__(self, bundle: Bundle | Path):
        super().__init__(bundle if isinstance(bundle, Bundle) else load(bundle))
        check_runs_here(self.bundle)
        self.vm = load_vm(self.bundle.library, self.bundle.device)
        self.funcs = {name: self.vm.raw(name) for name in self.bundle.manifest["entries"]}
        self.reset()

    def reset(self) -> None:
        self.state = [self.vm.tensor(np.zeros(s["shape"], dtype=s["dtype"])) for s in self.state_specs]

    def _call(self, entry: str, *args) -> dict[str, np.ndarray]:
        result = self.funcs[entry](*args, *self.state)
        n = len(self.outputs)
        self.state = result[n:]
        return {name: self.vm.numpy(result[i]) for i, name in enumerate(self.outputs)}

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = self.check_input(x)
        return self._call(self.bundle.entry_for(x.shape[1]), self.vm.tensor(x))

    def flush(self) -> dict[str, np.ndarray]:
        return self._call("flush") if self.delay else {n: np.zeros((self.batch, 0)) for n in self.outputs}


def _concat(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in pieces], axis=1) for k in pieces[0]}


class Worker:
    """A bundle's session served by another Python process over a pipe: an aarch64 Python under qemu-aarch64 for
    ARM bundles on x86_64 (the board's bits; not its timings), or this machine's Python so that the process's
    memory is the artifact's alone (validation measures it, with the reference elsewhere).

    The child imports this module (numpy + the TVM runtime library, no compiler) and runs `serve`."""

    def __init__(self, bundle: Bundle, python: list[str], execution: str):
        self.bundle, self.execution = bundle, execution
        package_parent = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {package_parent!r}); from edgekit.runtime import serve; serve()"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([*python, "-c", code, str(bundle.path.resolve())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self("hello")
        self.startup_seconds = time.perf_counter() - t0

    def __call__(self, op: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Run the session method `op` over there with these arguments; its outputs."""
        try:
            _send(self.proc.stdin, {"op": np.array(op), **arrays})
            reply = _receive(self.proc.stdout)
        except (BrokenPipeError, EOFError):
            err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
            raise BundleError(f"the runtime process for {self.bundle.path} stopped:\n{err}",
                              "check the bundle with `edgekit info`; for ARM bundles, `edgekit emulator setup`") from None
        if "error" in reply:
            raise EdgekitError(str(reply["error"]))
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.kill()


class ProcessSession(StreamSession):
    """A frame session whose library runs in a `Worker`."""

    def __init__(self, bundle: Bundle, worker: Worker):
        super().__init__(bundle)
        self.worker, self.execution, self.pid = worker, worker.execution, worker.pid
        self.startup_seconds = worker.startup_seconds

    def reset(self) -> None:
        self.worker("reset")

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.worker("step", x=self.check_input(x))

    def flush(self) -> dict[str, np.ndarray]:
        return self.worker("flush")


EMULATED = "qemu-aarch64 emulation (correctness check; timings are not board timings)"


def open_session(path: Path | Bundle, isolated: bool = False, progress=None):
    """A session wherever this machine can run the bundle: natively (in this process, or in a child process of
    its own when `isolated`), or emulated for aarch64 CPU bundles on x86_64. Frame bundles get a StreamSession;
    segment-level LMs (unit "segment") a `hmt_runtime.SegmentSession` or its remote twin."""
    bundle = path if isinstance(path, Bundle) else load(path, check_machine=False)
    local, remote = _session_classes(bundle)
    target, here = bundle.target, platform.machine()
    if target["arch"] == "aarch64" and here == "x86_64" and target["runs"] != "cuda":
        from edgekit import emulator

        return remote(bundle, Worker(bundle, emulator.python_command(emulator.prepare(progress=progress)), EMULATED))
    check_runs_here(bundle)
    return remote(bundle, Worker(bundle, [sys.executable], "native, own process")) if isolated else local(bundle)


def _session_classes(bundle: Bundle) -> tuple[type, type]:
    """(in-process, in-a-worker) session classes for the bundle's unit."""
    if bundle.manifest.get("unit", "frame") == "segment":
        from edgekit.hmt_runtime import RemoteSegmentSession, SegmentSession

        return SegmentSession, RemoteSegmentSession
    return Session, ProcessSession


def serve() -> None:
    """The worker side: one in-process session over the bundle named in argv (checksums verified by the parent
    already), running the methods it lists in `OPS` as requests arrive on stdin, replying on stdout."""
    bundle = load(Path(sys.argv[-1]), verify=False)
    session = _session_classes(bundle)[0](bundle)
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    while True:
        try:
            message = _receive(inp)
        except EOFError:
            return
        op = str(message.pop("op"))
        try:
            if op not in ("hello", *session.OPS):
                raise EdgekitError(f"the runtime process has no operation {op!r}")
            reply = (getattr(session, op)(**message) if op != "hello" else None) or {}
        except EdgekitError as e:
            reply = {"error": np.array(str(e))}
        _send(out, reply)


def _send(stream, message: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **message)
    data = buf.getvalue()
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream) -> dict[str, np.ndarray]:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    with np.load(io.BytesIO(stream.read(int.from_bytes(header, "little"))), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
