"""Running a bundle: a streaming session over the compiled library that keeps the state on the device between
calls. Needs numpy and the TVM runtime only (no torch, no compiler), so it is what a board runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.artifact import Bundle, load
from edgekit.errors import InputShapeError
from edgekit.tvm_runtime import load_vm


class Session:
    """Feed frames, get outputs of frame t - delay; `flush` ends the stream. State never leaves the device."""

    def __init__(self, bundle: Bundle | Path):
        self.bundle = bundle if isinstance(bundle, Bundle) else load(bundle)
        m = self.bundle.manifest
        self.vm = load_vm(self.bundle.library, "cuda" if m["target"]["runs"] == "cuda" else "cpu")
        self.funcs = {name: self.vm.raw(name) for name in m["entries"]}
        self.input_size = m["input"]["shape"][-1]
        self.batch = m["batch"]
        self.outputs = [o["name"] for o in m["outputs"]]
        self.state_specs = m["state"]
        self.delay = m["delay"]
        self.reset()

    def reset(self) -> None:
        self.state = [self.vm.tensor(np.zeros(s["shape"], dtype=s["dtype"])) for s in self.state_specs]

    def _call(self, entry: str, *args) -> dict[str, np.ndarray]:
        result = self.funcs[entry](*args, *self.state)
        n = len(self.outputs)
        self.state = result[n:]
        return {name: self.vm.numpy(result[i]) for i, name in enumerate(self.outputs)}

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x [batch, K, features] with K a built chunk size; outputs [batch, K, ...] for frames t-K-delay+1..t-delay."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != self.batch or x.shape[2] != self.input_size:
            raise InputShapeError(f"input of shape {x.shape} does not fit this bundle",
                                  f"pass frames as [batch={self.batch}, K, features={self.input_size}]")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputShapeError(f"input dtype {x.dtype} is not floating point", "pass float32 frames")
        return self._call(self.bundle.entry_for(x.shape[1]), self.vm.tensor(x.astype(np.float32, copy=False)))

    def flush(self) -> dict[str, np.ndarray]:
        """The last `delay` outputs of the stream, as if it were zero-padded offline."""
        return self._call("flush") if self.delay else {n: np.zeros((self.batch, 0)) for n in self.outputs}

    def feed(self, x: np.ndarray, chunk: int = 1) -> dict[str, np.ndarray]:
        """Frames [batch, T, features] through whole chunks, the remainder frame by frame; outputs concatenated."""
        whole = (x.shape[1] // chunk) * chunk
        starts = [(t, chunk) for t in range(0, whole, chunk)] + [(t, 1) for t in range(whole, x.shape[1])]
        return _concat([self.step(x[:, t:t + k]) for t, k in starts])

    def run(self, x: np.ndarray, chunk: int = 1) -> dict[str, np.ndarray]:
        """A whole stream [batch, T, features] from a fresh state, flushed, aligned to the frames (like `forward`)."""
        self.reset()
        return {k: v[:, self.delay:] for k, v in _concat([self.feed(x, chunk), self.flush()]).items()}


def _concat(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in pieces], axis=1) for k in pieces[0]}
