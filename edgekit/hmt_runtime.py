"""Running a segment-level LM (HMT): token-by-token scoring and generation over two fixed-shape steps, in
bounded memory. Needs numpy, and the TVM runtime for a compiled library (no torch), so it runs on a board.

An engine provides `segment(tokens [L] int64, length, state) -> (logits [L, V], decode cache, next state)` and
`decode(token, cache) -> (logits [V], cache)`; `models.hmt.TorchEngine` runs them in eager PyTorch and
`TVMEngine` the library of a bundle made by `edgekit compile hmt` (`load_engine`; `host_bundle` compiles one on
first use and caches it).

The next-token distribution after every token is exactly the reference HMT run on the stream so far:
- while the current segment holds at most j tokens, its summary (hence P) changes with every token, so the
  segment step is rerun over the partial segment (length n, padded);
- from j tokens on, P is fixed, and the decode step extends the segment step's KV cache one token at a time;
- at L tokens the segment step runs once more over the whole segment and its state is kept: the memory
  embedding enters the cache, the last k tokens become the sensory memory, the KV cache is dropped.
Memory: the state (N memories, k tokens), one segment of token ids and one segment's KV cache, whatever the length.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Entry signatures (models/hmt.py export_entries):
#   segment(tokens, length, memory, memory_valid, write, sensory, sensory_len)
#     -> (logits, memory_embedding, kv, kv_mask, slot, *the 5 state tensors after the segment)
#   decode(token, kv, kv_mask, slot) -> (logits, kv, kv_mask, slot)
SEGMENT_OUTPUTS = ("logits", "memory_embedding", "kv", "kv_mask", "slot")


class TVMEngine:
    """The `segment` and `decode` entries of a built library; state and KV cache stay on the device."""

    def __init__(self, bundle):
        from edgekit.tvm_runtime import load_vm

        manifest = bundle.manifest
        self.vm = load_vm(bundle.library, bundle.device)
        self.seg_fn, self.dec_fn = self.vm.raw("segment"), self.vm.raw("decode")
        self.segment_length, self.summary_length = manifest["segment"], manifest["summary"]
        self.state_specs = manifest["state"]
        self.state_bytes = manifest["state_bytes"]
        self.vocab = manifest["model"]["config"]["vocab"]

    def init_state(self) -> list:
        return [self.vm.tensor(np.zeros(s["shape"], dtype=s["dtype"])) for s in self.state_specs]

    def _inputs(self, tokens: np.ndarray, length: int) -> list:
        """Checked here: the compiled gathers do not bounds-check (an id >= 256 or a length > L reads out of range)."""
        from edgekit.errors import InputShapeError

        tokens = np.asarray(tokens).reshape(1, -1)
        if tokens.shape[1] != self.segment_length or not 0 <= length <= self.segment_length:
            raise InputShapeError(f"a segment is {self.segment_length} token ids with 0 <= length <= "
                                  f"{self.segment_length}; got {tokens.shape[1]} ids, length {length}",
                                  "pad the segment to L ids and pass the real count as length")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise InputShapeError(f"token ids must lie in [0, {self.vocab})", "pass bytes")
        return [self.vm.tensor(tokens.astype(np.int64)), self.vm.tensor(np.array([length], dtype=np.int64))]

    def segment(self, tokens: np.ndarray, length: int, state: list) -> tuple[dict[str, np.ndarray], list, list]:
        """({logits [L, V], memory_embedding [d]}, decode cache, next state) of one padded segment."""
        out = self.seg_fn(*self._inputs(tokens, length), *state)
        return ({"logits": self.vm.numpy(out[0])[0], "memory_embedding": self.vm.numpy(out[1])[0]},
                [out[2], out[3], out[4]], list(out[len(SEGMENT_OUTPUTS):]))

    def decode(self, token: int, cache: list) -> tuple[np.ndarray, list]:
        if not 0 <= token < self.vocab:
            from edgekit.errors import InputShapeError

            raise InputShapeError(f"token id {token} is not in [0, {self.vocab})", "pass bytes")
        out = self.dec_fn(self.vm.tensor(np.array([token], dtype=np.int64)), *cache)
        return self.vm.numpy(out[0])[0], list(out[1:])


class ORTEngine:
    """The bundle's ONNX entries in ONNX Runtime (what bench compares TVM with); numpy state and cache."""

    def __init__(self, bundle, options=None):
        import onnxruntime as ort

        m = bundle.manifest
        run = lambda entry: ort.InferenceSession(str(bundle.path / m["entries"][entry]["onnx"]), options,  # noqa: E731
                                                 providers=["CPUExecutionProvider"]).run
        self.seg_run, self.dec_run = run("segment"), run("decode")
        self.segment_length, self.summary_length = m["segment"], m["summary"]
        self.state_specs = m["state"]

    def init_state(self) -> list[np.ndarray]:
        return [np.zeros(s["shape"], dtype=s["dtype"]) for s in self.state_specs]

    def segment(self, tokens: np.ndarray, length: int, state: list) -> tuple[dict[str, np.ndarray], list, list]:
        feeds = {"tokens": np.asarray(tokens, np.int64).reshape(1, -1), "length": np.array([length], np.int64),
                 **{s["name"]: v for s, v in zip(self.state_specs, state)}}
        out = self.seg_run(None, feeds)
        n = len(SEGMENT_OUTPUTS)
        return {"logits": out[0][0], "memory_embedding": out[1][0]}, out[2:n], out[n:]

    def decode(self, token: int, cache: list) -> tuple[np.ndarray, list]:
        out = self.dec_run(None, {"token": np.array([token], np.int64), "kv": cache[0], "kv_mask": cache[1],
                                  "slot": cache[2]})
        return out[0][0], out[1:]


class SegmentSession:
    """One text stream through a segment bundle in this process, the state kept between calls: `score` whole
    segments with the segment step alone, or `feed` bytes one at a time as generation does (the logits of the
    next byte after each); both continue the same stream. What validation drives, here or in a Worker."""

    OPS = ("reset", "score", "feed")  # what a Worker may run
    execution, pid = "native", None

    def __init__(self, bundle):
        from edgekit.artifact import check_runs_here

        check_runs_here(bundle)
        self.bundle = bundle
        self.engine = TVMEngine(bundle)
        self.gen = Generator(self.engine)

    def reset(self) -> None:
        self.gen.reset()

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Whole segments of byte ids: {logits [1, segments, L, V], memory_embedding [1, segments, d]}."""
        from edgekit.errors import InputShapeError

        tokens, L = np.asarray(tokens, np.int64).reshape(-1), self.engine.segment_length
        if self.gen.segment or tokens.size % L or not tokens.size:
            raise InputShapeError(f"score takes whole segments of {L} bytes at a segment boundary; got {tokens.size} "
                                  f"bytes with {len(self.gen.segment)} fed since the last boundary",
                                  "feed the rest byte by byte")
        outs = []
        for s in range(0, tokens.size, L):
            out, _, self.gen.state = self.engine.segment(tokens[s:s + L], L, self.gen.state)
            outs.append(out)
        return {k: np.stack([o[k] for o in outs])[None] for k in outs[0]}

    def feed(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Byte ids one by one: {logits [1, n, V]}, row i the distribution of the byte after tokens[i]."""
        return {"logits": np.stack([self.gen.feed(int(t)) for t in np.asarray(tokens).reshape(-1)])[None]}


class RemoteSegmentSession:
    """A SegmentSession run by a `runtime.Worker` (another process: emulated aarch64, or validation's own)."""

    def __init__(self, bundle, worker):
        self.bundle, self.worker, self.execution, self.pid = bundle, worker, worker.execution, worker.pid
        self.startup_seconds = worker.startup_seconds

    def reset(self) -> None:
        self.worker("reset")

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return self.worker("score", tokens=np.asarray(tokens, np.int64))

    def feed(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return self.worker("feed", tokens=np.asarray(tokens, np.int64))


def load_engine(bundle_dir: str | Path) -> TVMEngine:
    """The engine of a bundle made by `edgekit compile hmt ...` (checksums verified, target runnable here)."""
    from edgekit.artifact import load
    from edgekit.errors import BundleError

    bundle = load(bundle_dir)
    family = bundle.manifest.get("model", {}).get("family")
    if family != "hmt" or set(bundle.manifest.get("entries", {})) != {"segment", "decode"}:
        raise BundleError(f"{bundle.path} holds a {family!r} model, not an HMT byte LM (segment and decode entries)",
                          "pass a bundle made by `edgekit compile hmt ...`")
    return TVMEngine(bundle)


def host_bundle(checkpoint: Path | None = None, config: str | None = None, progress=lambda m: None) -> Path:
    """An HMT checkpoint (or named config, seeded weights) compiled for this host by `edgekit.compile.compile`,
    on first use, into $EDGEKIT_CACHE (default ~/.cache/edgekit)/bundles/hmt-<sha256[:16] or cfg-NAME>-host-<version>.
    Host side only: compiling needs torch and TVM's compiler."""
    from edgekit import __version__
    from edgekit.artifact import file_sha256
    from edgekit.errors import BundleError

    key = file_sha256(checkpoint)[:16] if checkpoint is not None else f"cfg-{config}"
    cache = Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")
    out = cache / "bundles" / f"hmt-{key}-host-{__version__}"
    if not out.is_dir():
        from edgekit.compile import compile

        progress(f"first use: compiling for this host into {out} (cached for next time)")
        try:
            compile("hmt", "host", out, config=None if checkpoint is not None else config, checkpoint=checkpoint,
                    progress=progress)
        except BundleError:
            if not out.is_dir():  # not a concurrent compile that got there first
                raise
    return out


@dataclass
class Generator:
    """Feed byte tokens one at a time (or a prompt at once); get the logits of the next byte."""

    engine: object
    state: object = None
    segment: list[int] = field(default_factory=list)
    cache: object = None
    last: np.ndarray | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"segment": 0, "decode": 0})

    def __post_init__(self):
        self.L, self.j = self.engine.segment_length, self.engine.summary_length
        self.reset()

    def reset(self) -> None:
        self.state, self.segment, self.cache, self.last = self.engine.init_state(), [], None, None

    def _segment(self) -> np.ndarray:
        n = len(self.segment)
        padded = np.zeros(self.L, dtype=np.int64)
        padded[:n] = self.segment
        out, cache, state = self.engine.segment(padded, n, self.state)
        self.calls["segment"] += 1
        if n == self.L:
            self.state, self.segment, self.cache = state, [], None
        else:
            self.cache = cache
        return out["logits"][n - 1]

    def feed(self, token: int) -> np.ndarray:
        """Append one token; the logits [V] of the token after it."""
        self.segment.append(int(token))
        n = len(self.segment)
        if n <= self.j or n == self.L:
            self.last = self._segment()
        else:
            self.last, self.cache = self.engine.decode(int(token), self.cache)
            self.calls["decode"] += 1
        return self.last

    def prefill(self, tokens: list[int] | bytes) -> np.ndarray:
        """A prompt at once: one segment step per whole segment, one over the remainder."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("the prompt must hold at least one byte")
        for t in tokens:
            self.segment.append(int(t))
            if len(self.segment) == self.L:
                self.last = self._segment()
        if self.segment:
            self.last = self._segment()
        return self.last

    def sample(self, temperature: float, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(self.last))
        z = self.last.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))

    def generate(self, prompt: bytes, tokens: int, temperature: float = 0.8, seed: int = 0, on_token=None
                 ) -> bytes:
        rng = np.random.default_rng(seed)
        self.prefill(prompt)
        out = bytearray()
        for _ in range(tokens):
            t = self.sample(temperature, rng)
            out.append(t)
            if on_token is not None:
                on_token(t)
            self.feed(t)
        return bytes(out)


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), falling back to the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    r = fn(*args)
    return r, time.perf_counter() - t0
