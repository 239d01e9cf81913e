"""A bundle's session served by another Python process over a pipe: an aarch64 Python under qemu-aarch64 for ARM
bundles on x86_64 (the board's bits; not its timings), or this machine's Python so that the process's memory is
the artifact's alone (validation measures it, with the reference elsewhere). Messages are npz archives, never
pickles. The child runs `edgekit.runtime.serve` (numpy and the TVM runtime library, no compiler)."""
from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from edgekit.artifact import Bundle
from edgekit.errors import BundleError, EdgekitError

EMULATED = "qemu-aarch64 emulation (correctness check; timings are not board timings)"


class ChildProcess:
    """A child process (`self.proc`) fed on its stdin: closing stdin ends it; one left running is killed."""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.kill()


class Worker(ChildProcess):
    """The child process and its pipe; `worker(op, **arrays)` runs the session method `op` over there."""

    def __init__(self, bundle: Bundle, python: list[str], execution: str, options: dict | None = None):
        self.bundle, self.execution = bundle, execution
        package_parent = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {package_parent!r}); from edgekit.runtime import serve; serve()"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([*python, "-c", code, json.dumps(options or {}), str(bundle.path.resolve())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self("hello")
        self.startup_seconds = time.perf_counter() - t0

    def __call__(self, op: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        try:
            send(self.proc.stdin, {"op": np.array(op), **arrays})
            reply = receive(self.proc.stdout)
        except (BrokenPipeError, EOFError):
            err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
            raise BundleError(f"the runtime process for {self.bundle.path} stopped:\n{err}",
                              "check the bundle with `edgekit info`; for ARM bundles, "
                              "`edgekit emulator setup`") from None
        if "error" in reply:
            raise EdgekitError(str(reply["error"]))
        return reply



class WorkerSession:
    """What every session run by a Worker shares: where it runs, its process, its start-up time."""

    def __init__(self, bundle: Bundle, worker: Worker):
        self.bundle, self.worker, self.execution, self.pid = bundle, worker, worker.execution, worker.pid
        self.startup_seconds = worker.startup_seconds

    def reset(self) -> None:
        self.worker("reset")

    def read_state(self) -> dict[str, np.ndarray]:
        """The state now, tensor by tensor (what a quantized bundle's kernel check restarts its reference from)."""
        return self.worker("read_state")


def send(stream, message: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **message)
    data = buf.getvalue()
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def receive(stream) -> dict[str, np.ndarray]:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    with np.load(io.BytesIO(stream.read(int.from_bytes(header, "little"))), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
