"""The segment unit: a language model that streams text in segments of L tokens with a state carried between
segments, plus decoding inside a segment. Models implement `edgekit.streaming.SegmentModel`. A bundle has two
entries:
  segment(tokens [B, L], length [B], *state) -> (*outputs (logits first), *decode cache, *state after it)
  decode(token [B], *decode cache) -> (logits [B, V], *decode cache)

The next-token distribution after every token is exactly the model's reference on the stream so far
(`Generator`): while the current segment holds at most `summary` tokens, the context the segment step builds
for it changes with every token, so the segment step is rerun over the partial segment (length n, padded); from
then on the decode step extends the segment step's KV cache one token at a time; at L tokens the segment step
runs once more over the whole segment and its state is kept. Memory: the state, one segment of token ids and
one segment's decode cache, whatever the length of the stream.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit import measure, render
from edgekit.artifact import Bundle, check_runs_here, load_library
from edgekit.engines import ort_session
from edgekit.errors import EdgekitError, InputShapeError
from edgekit.artifact import TensorSpec
from edgekit.measure import Tally, TokenSource
from edgekit.quantize import QuantizedModel, scheme_of
from edgekit.units import BenchOptions, Unit
from edgekit.worker import WorkerSession

GOLDEN = "reference.npz"
SCORE_BLOCK = 16  # segments per scoring call in validation
KERNEL_CHECK_SEGMENTS = 64  # at most this many segments of a quantized bundle's segment-by-segment kernel check


@dataclass(frozen=True)
class ExportOptions:
    batch: int = 1


@dataclass(frozen=True)
class Criteria:
    """How a byte LM's stream is judged: every output within atol or within rtol of the reference's magnitude; a
    quantized bundle against the quantized reference in int8 steps instead (as for frame models), next bytes
    agreeing `prediction_agreement` of the time."""

    seed: int = 0
    text: Path | None = None  # stream this file's bytes (repeated) instead of random bytes
    atol: float = 1e-4
    rtol: float = 1e-3
    max_steps: float = 2.0  # a quantized bundle: outputs within this many int8 steps of the quantized reference,
    max_codes_differing: float = 0.001  # at most this fraction of output codes differing,
    prediction_agreement: float = 0.999  # and next bytes agreeing this often

    def __post_init__(self):
        if not (self.atol >= 0 and self.rtol >= 0):
            raise EdgekitError("--atol and --rtol must be >= 0")


@dataclass(frozen=True)
class ValidateOptions(Criteria):
    """All segments but the last `decode_segments` are scored by the segment step, those fed byte by byte (the
    generation path); `Criteria` judge them, and resident memory at T must stay within 5 MiB of T/10."""

    segments: int = 256
    decode_segments: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.segments < 1 or not 0 <= self.decode_segments <= self.segments:
            raise EdgekitError(f"need --segments >= 1 and 0 <= --decode-segments <= --segments; got {self.segments}, "
                               f"{self.decode_segments}")


# ---- engines: the numpy interface `Generator` drives (TVM here; ONNX Runtime; eager PyTorch in streaming.py) -------

class Layout:
    """Where the outputs, the decode cache and the state sit in an entry's flat outputs (from the manifest)."""

    def __init__(self, manifest: dict):
        self.outputs = [o["name"] for o in manifest["outputs"]]
        self.cache = [c["name"] for c in manifest["decode_cache"]]
        self.state_specs = manifest["state"]
        self.segment_length, self.summary_length = manifest["segment"], manifest["summary"]
        self.vocab = manifest["outputs"][0]["shape"][-1]

    def split(self, out: list) -> tuple[list, list, list]:
        n, c = len(self.outputs), len(self.cache)
        return out[:n], out[n:n + c], out[n + c:]


class TVMEngine(Layout):
    """The `segment` and `decode` entries of a built library; state and decode cache stay on the device, and so
    do the per-document inputs (`fetched`) of models that take them."""

    def __init__(self, bundle: Bundle):
        self.vm = load_library(bundle)  # first: it proves the manifest's interface fields before they are used
        super().__init__(bundle.manifest)
        self.bundle, self.fetched = bundle, []
        self.seg_fn, self.dec_fn = self.vm.raw("segment"), self.vm.raw("decode")

    def init_state(self) -> list:
        return [self.vm.tensor(s) for s in self.bundle.zero_state()]

    def begin(self, document: np.ndarray) -> None:
        """A new document starts with these bytes (a prompt): nothing to prepare here; engines that fetch a memory
        block per document fetch it now."""

    def _inputs(self, tokens: np.ndarray, length: int) -> list:
        tokens = np.asarray(tokens).reshape(1, -1)
        if tokens.shape[1] != self.segment_length or not 0 <= length <= self.segment_length:
            raise InputShapeError(f"a segment is {self.segment_length} token ids with 0 <= length <= "
                                  f"{self.segment_length}; got {tokens.shape[1]} ids, length {length}",
                                  "pad the segment to L ids and pass the real count as length")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise InputShapeError(f"token ids must lie in [0, {self.vocab})", "pass bytes")
        return [self.vm.tensor(tokens.astype(np.int64)), self.vm.tensor(np.array([length], dtype=np.int64))]

    def segment(self, tokens: np.ndarray, length: int, state: list) -> tuple[dict[str, np.ndarray], list, list]:
        """({output: value of the one batch row}, decode cache, next state) of one padded segment."""
        outs, cache, new = self.split(self.seg_fn(*self._inputs(tokens, length), *state, *self.fetched))
        return {n: self.vm.numpy(o)[0] for n, o in zip(self.outputs, outs)}, cache, new

    def decode(self, token: int, cache: list) -> tuple[np.ndarray, list]:
        if not 0 <= token < self.vocab:
            raise InputShapeError(f"token id {token} is not in [0, {self.vocab})", "pass bytes")
        out = self.dec_fn(self.vm.tensor(np.array([token], dtype=np.int64)), *cache, *self.fetched)
        return self.vm.numpy(out[0])[0], list(out[1:])


class ORTEngine(Layout):
    """The bundle's ONNX entries in ONNX Runtime (what bench compares TVM with); numpy state and cache; `fetched`
    holds the per-document inputs by name."""

    def __init__(self, bundle: Bundle, threads: int | None):
        super().__init__(bundle.manifest)
        self.bundle, self.fetched = bundle, {}
        self.seg_run, self.dec_run = (ort_session(bundle, "segment", threads).run,
                                      ort_session(bundle, "decode", threads).run)

    def init_state(self) -> list[np.ndarray]:
        return self.bundle.zero_state()

    def segment(self, tokens: np.ndarray, length: int, state: list) -> tuple[dict[str, np.ndarray], list, list]:
        feeds = {"tokens": np.asarray(tokens, np.int64).reshape(1, -1), "length": np.array([length], np.int64),
                 **{s["name"]: v for s, v in zip(self.state_specs, state)}, **self.fetched}
        outs, cache, new = self.split(self.seg_run(None, feeds))
        return {n: o[0] for n, o in zip(self.outputs, outs)}, cache, new

    def decode(self, token: int, cache: list) -> tuple[np.ndarray, list]:
        out = self.dec_run(None, {"token": np.array([token], np.int64), **dict(zip(self.cache, cache)), **self.fetched})
        return out[0][0], out[1:]


@dataclass
class Generator:
    """Feed tokens one at a time (or a prompt at once) through an engine; get the logits of the next token."""

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

    def begin(self, document: list[int] | bytes) -> None:
        """Start a new stream for a document given by its bytes (or its prompt), which the engine may use (to
        fetch a memory block); then `prefill` it."""
        self.engine.begin(np.frombuffer(bytes(document), np.uint8).astype(np.int64))
        self.reset()

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
        """Append one token; the logits [V] of the token after it. A token outside the vocabulary is refused
        before it enters the segment, so the stream goes on as if it had never been offered."""
        self._check(token)
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
            raise EdgekitError("the prompt must hold at least one token")
        for t in tokens:
            self._check(t)
        for t in tokens:
            self.segment.append(int(t))
            if len(self.segment) == self.L:
                self.last = self._segment()
        if self.segment:
            self.last = self._segment()
        return self.last

    def _check(self, token: int) -> None:
        if not 0 <= int(token) < self.engine.vocab:
            raise InputShapeError(f"token id {int(token)} is not in [0, {self.engine.vocab})", "pass bytes")

    def sample(self, temperature: float, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(self.last))
        z = self.last.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))


# ---- sessions: numpy and the TVM runtime only ------------------------------------------------------------------

class LocalSession:
    """One text stream through a segment bundle in this process, the state kept between calls: `score` whole
    segments with the segment step alone, or `feed` tokens one at a time as generation does (the logits of the
    next token after each); both continue the same stream. What validation drives, here or in a Worker."""

    OPS = ("reset", "score", "feed", "read_state")  # what a Worker may run
    execution, pid = "native", None
    Engine = TVMEngine

    def __init__(self, bundle: Bundle):
        check_runs_here(bundle)
        self.bundle = bundle
        self.engine = self.Engine(bundle)
        self.gen = Generator(self.engine)

    def reset(self) -> None:
        self.gen.reset()

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Whole segments of token ids: {output: [1, segments, ...]} (logits [1, segments, L, V])."""
        tokens, L = np.asarray(tokens, np.int64).reshape(-1), self.engine.segment_length
        if self.gen.segment or tokens.size % L or not tokens.size:
            raise InputShapeError(f"score takes whole segments of {L} tokens at a segment boundary; got {tokens.size} "
                                  f"tokens with {len(self.gen.segment)} fed since the last boundary",
                                  "feed the rest token by token")
        outs = []
        for s in range(0, tokens.size, L):
            out, _, self.gen.state = self.engine.segment(tokens[s:s + L], L, self.gen.state)
            outs.append(out)
        return {k: np.stack([o[k] for o in outs])[None] for k in outs[0]}

    def feed(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Token ids one by one: {logits [1, n, V]}, row i the distribution of the token after tokens[i]."""
        return {"logits": np.stack([self.gen.feed(int(t)) for t in np.asarray(tokens).reshape(-1)])[None]}

    def read_state(self) -> dict[str, np.ndarray]:
        """The state carried between segments now, tensor by tensor (a copy)."""
        return {s["name"]: self.engine.vm.numpy(t).copy() for s, t in zip(self.engine.state_specs, self.gen.state)}


class RemoteSession(WorkerSession):
    """A segment session run by a Worker."""

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return self.worker("score", tokens=np.asarray(tokens, np.int64))

    def feed(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return self.worker("feed", tokens=np.asarray(tokens, np.int64))


# ---- references ------------------------------------------------------------------------------------------------

class Reference:
    """The model's float64 eager reference (its algorithm as written) continuing one stream, in the two ways a
    segment bundle runs it: `score` whole segments, or `feed` one segment token by token, where each token's
    next-token distribution may depend only on the tokens so far (while a segment holds fewer than `summary`
    tokens, its context is built from those tokens alone)."""

    def __init__(self, net):
        self.net, self.carry = net, None

    def _run(self, tokens: np.ndarray) -> dict:
        import torch

        with torch.no_grad():
            out, carry = self.net.reference_outputs(torch.from_numpy(tokens).view(1, -1), self.carry)
        return out, carry

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        out, self.carry = self._run(tokens)
        L = self.net.segment_length
        return {k: (v.view(1, -1, L, v.shape[-1]) if k == "logits" else v).numpy() for k, v in out.items()}

    def feed(self, segment: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        j = self.net.summary_length
        prefixes = [self._run(segment[:n])[0]["logits"][0, n - 1] for n in range(1, j)]
        out, self.carry = self._run(segment)
        return {"logits": torch.stack([*prefixes, *out["logits"][0, j - 1:]])[None].numpy()}


class GoldenReference:
    """Reference outputs read from the bundle's golden record (no torch needed)."""

    def __init__(self, bundle: Bundle):
        with np.load(bundle.path / bundle.manifest["golden"]["file"]) as f:
            self.record = {k: f[k] for k in f.files}
        self.outputs, self.done = [o["name"] for o in bundle.manifest["outputs"]], 0

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        n = tokens.size // self.record["logits"].shape[2]
        out = {k: self.record[k][:, self.done:self.done + n] for k in self.outputs}
        self.done += n
        return out

    def feed(self, segment: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": self.record["fed_logits"]}


def kernel_check(session, reference: QuantizedModel, documents: list[tuple[np.ndarray, tuple]], L: int, start
                 ) -> tuple[Tally, int]:
    """A quantized bundle's kernels segment by segment: before every segment the quantized reference's segment
    step starts from the artifact's own state, so a code that flips on a rounding boundary counts in the segment
    where it flips, not again in every later segment the carried memory reaches. `documents`: (whole segments of
    tokens, the segment step's per-document inputs) in stream order, each begun by `start(tokens)`; at most
    KERNEL_CHECK_SEGMENTS segments. The tally and the segments checked."""
    import torch

    segments = min(KERNEL_CHECK_SEGMENTS, sum(t.size // L for t, _ in documents))
    tally, done = Tally(segments, quantized=True), 0
    for tokens, fetched in documents:
        start(tokens)
        for s in range(0, min(tokens.size, (segments - done) * L), L):
            state = {k: torch.from_numpy(v) for k, v in session.read_state().items()}
            segment = tokens[s:s + L]
            got = session.score(segment)
            want, _ = reference.segment_step(torch.from_numpy(segment).view(1, -1), torch.tensor([L]), state, *fetched)
            tally.add(got, {k: want[k][:, None].numpy() for k in got}, done, ["logits"])
            done += 1
    return tally, segments


class Comparison:
    """A byte LM's stream compared piece by piece: the artifact against its reference (a quantized bundle's: the
    quantized model, in int8 steps) and next-byte agreement; for a quantized bundle with the float64 model at hand
    (`ref64`) also that reference against it (the quantization's own effect, bits per byte of scored segments)."""

    def __init__(self, segments: int, quantized: bool, ref64):
        self.quantized, self.ref64 = quantized, ref64
        self.tally, self.effect = Tally(segments, quantized=quantized), Tally(segments)
        self.bits = {"artifact": [], "fp32": []}

    def add(self, how: str, tokens: np.ndarray, got: dict, want: dict, first: int) -> None:
        """`how` ("score" or "feed") ran over `tokens` from segment `first` on; got: the artifact's outputs."""
        want64 = getattr(self.ref64, how)(tokens) if self.ref64 is not None else None
        if want64 is not None and how == "score":
            self.bits["artifact"].append(_bits(got["logits"], tokens))
            self.bits["fp32"].append(_bits(want64["logits"], tokens))
        if how == "feed":  # one segment's L token-by-token distributions, tallied as one segment
            got, want, want64 = ({"logits_byte_by_byte": d["logits"][:, None]} if d is not None else None
                                 for d in (got, want, want64))
        self.tally.add(got, want, first, [next(iter(got))])  # the logits' next-byte agreement too
        if want64 is not None:
            self.effect.add(want, want64, first, [])

    def report(self, options: Criteria, kernel: tuple[Tally, int] | None) -> tuple[dict, dict]:
        """(checks, report fields): a quantized bundle's step criteria judge its kernel check where there is one."""
        o, outputs = options, self.tally.errors()
        judged = kernel[0].errors() if kernel else outputs
        checks = measure.step_checks(judged, o.max_steps, o.max_codes_differing) if self.quantized else \
            measure.error_checks(outputs, o.atol, o.rtol)
        stream = sum(p[:2] for p in self.tally.predictions.values())  # scored and fed bytes alike
        agree = kernel[0].predictions["logits"][:2] if kernel else stream
        if self.quantized:
            checks["next_byte_agreement"] = int(agree[0]) >= o.prediction_agreement * int(agree[1])
        fields = {"criteria": {"max_steps": o.max_steps, "max_codes_differing": o.max_codes_differing,
                               "next_byte_agreement_min": o.prediction_agreement} if self.quantized else
                  {"atol": o.atol, "rtol": o.rtol},
                  "outputs": outputs, "next_byte_agreement": int(stream[0]) / int(stream[1])}
        if self.ref64 is not None:
            fields["quantization_effect"] = {
                "against": "the float64 PyTorch model without quantization", "outputs": self.effect.errors(),
                **({"bits_per_byte": {k: float(np.mean(v)) for k, v in self.bits.items()}} if self.bits["fp32"]
                   else {})}
        if kernel:
            fields["kernel_check"] = {"items": kernel[1], "unit": "segments", "outputs": judged,
                                      "next_byte_agreement": int(agree[0]) / int(agree[1]),
                                      "how": "segment by segment from the start of each stream, the quantized "
                                             "reference's segment step started from the artifact's state each time"}
        return checks, fields


def next_byte_line(report: dict) -> str:
    """Next-byte arg-max agreement, and for a quantized bundle with a kernel check the one judged there."""
    line = f"next-byte arg-max agreement {report['next_byte_agreement']:.4%}"
    if kernel := report.get("kernel_check"):
        line += f" free-running, {kernel['next_byte_agreement']:.4%} in the kernel check (judged)"
    return line


def reference_name(manifest: dict, what: str) -> str:
    """The report's account of the reference: the float64 model, or for a quantized bundle the fp32 one with its
    products quantized; `what` says what of the model it runs."""
    scheme = scheme_of(manifest)
    return ("PyTorch in float64" if scheme == "none" else f"PyTorch in fp32 with the bundle's {scheme} products and "
            "fp32 forms as the artifact computes them (edgekit.quantize)") + ": " + what


# ---- the unit ---------------------------------------------------------------------------------------------------

class Segment(Unit):
    name = "segment"
    export_atol = 1e-4  # logits over a byte vocabulary after a dozen layers: float32 rounding differs by ~1e-5
    ExportOptions, ValidateOptions = ExportOptions, ValidateOptions
    quantizations = ("none", "int8")

    def export_entries(self, net, options: ExportOptions) -> list[tuple]:
        return net.entries(options.batch)

    def manifest_fields(self, net, options: ExportOptions) -> dict:
        b = options.batch
        cache = net.kv_spec(b)
        return {
            "unit": self.name, "delay": 0, "horizon": None,
            "segment": net.segment_length, "summary": net.summary_length,
            "input": TensorSpec("tokens", (b, net.segment_length), "int64").to_json(),
            "outputs": [s.to_json() for s in net.output_spec(b)],
            "running_means": {},
            "state": [s.to_json() for s in net.state_spec(b)], "state_bytes": _bytes(net.state_spec(b)),
            "decode_cache": [s.to_json() for s in cache], "decode_cache_bytes": _bytes(cache),
            "entries": {"segment": {"frames": 0, "tokens": net.segment_length, "onnx": "onnx/segment.onnx"},
                        "decode": {"frames": 0, "tokens": 1, "onnx": "onnx/decode.onnx"}},
        }

    def write_golden(self, net, path: Path) -> dict:
        """warm + 4 segments of the seed-0 byte stream (the state has wrapped), the last one fed token by token."""
        segments, L = net.warm_segments + 4, net.segment_length
        tokens = TokenSource(0).tokens(0, segments * L)
        ref = Reference(net.double())
        scored = ref.score(tokens[:-L])
        np.savez(path, **scored, fed_logits=ref.feed(tokens[-L:])["logits"])
        net.float()
        return {"file": GOLDEN, "segments": segments, "decode_segments": 1, "seed": 0}

    def session(self, bundle: Bundle, **options) -> LocalSession:
        _no_options(options)
        return LocalSession(bundle)

    def remote_session(self, bundle: Bundle, worker, **options) -> RemoteSession:
        _no_options(options)
        return RemoteSession(bundle, worker)

    def describe(self, manifest: dict) -> str:
        return f"{manifest['segment']}-token segments"

    def reference(self, net, scheme: str):
        return net if scheme == "none" else QuantizedModel(net, scheme)

    def validate(self, bundle: Bundle, session, net, options: ValidateOptions, progress) -> dict:
        """One stream: all but the last `decode_segments` segments scored by the segment step, those fed token
        by token (the generation path); every output against the float64 reference, the artifact's RSS at T/10
        and T, next-token agreement."""
        o = options
        segments, decode_segments = o.segments, o.decode_segments
        if net is None:
            golden = bundle.manifest["golden"]
            if o.seed != golden["seed"] or o.text is not None:
                raise EdgekitError("without PyTorch, validation compares with the bundle's golden record: "
                                   f"{golden['segments']} segments of seed {golden['seed']}",
                                   "drop --seed/--text, or install edgekit[compile] for any stream")
            segments, decode_segments, ref = golden["segments"], golden["decode_segments"], GoldenReference(bundle)
        else:
            ref = Reference(self.reference(net, scheme_of(bundle.manifest)))
        quantized = scheme_of(bundle.manifest) != "none"
        ref64 = Reference(net) if quantized and net is not None else None  # the quantization's own effect
        source = TokenSource(o.seed, o.text)
        L, scored, marks = bundle.manifest["segment"], segments - decode_segments, measure.rss_marks(segments)
        ends = measure.pieces(scored, SCORE_BLOCK, list(marks))
        pieces = [(s, e, "score") for s, e in zip([0, *ends], ends)] if scored else []
        pieces += [(s, s + 1, "feed") for s in range(scored, segments)]
        compared, rss, t0 = Comparison(segments, quantized, ref64), {}, time.perf_counter()
        session.reset()
        for start, stop, how in pieces:
            tokens = source.tokens(start * L, stop * L)
            compared.add(how, tokens, getattr(session, how)(tokens), getattr(ref, how)(tokens), start)
            if stop in marks:
                rss[stop] = measure.rss_bytes(session.pid)
            progress(stop, segments)
        mem, seconds = measure.memory(rss, segments), time.perf_counter() - t0
        kernel = kernel_check(session, ref.net, [(source.tokens(0, scored * L), ())], L, lambda _: session.reset()) \
            if ref64 is not None and scored else None
        checks, fields = compared.report(o, kernel)
        checks.update(mem["checks"])
        return {
            "bundle": str(bundle.path), "target": bundle.target["name"], "segments": segments,
            "decode_segments": decode_segments, "segment_length": L, "tokens": segments * L, "seed": o.seed,
            "input": f"the bytes of {o.text}, repeated" if o.text is not None else
                     "uniform random bytes, numpy default_rng([seed, block]) per 4096-byte block",
            "reference": reference_name(bundle.manifest, "the model's algorithm as written, one stream; token by "
                                                         "token, each token's distribution given only the tokens "
                                                         "before it"),
            **fields, "criteria": {**fields["criteria"], "rss_change_max_bytes": measure.RSS_CHANGE_MAX},
            "state_bytes": bundle.manifest["state_bytes"], "rss_bytes": mem["rss_bytes"],
            "seconds": round(seconds, 2), "checks": checks, "passed": all(checks.values()),
        }

    def bench(self, bundle: Bundle, options: BenchOptions, torch_model, progress) -> dict:
        """Per engine: the segment step over whole segments (scoring), the decode step (generation inside a
        segment), and generation itself (their mix, as `Generator` runs them)."""
        m = bundle.manifest
        L, j = m["segment"], m["summary"]
        rng = np.random.default_rng(options.seed)
        warmup, segments, decodes, generated = options.warmup, max(10, options.calls // 10), options.calls, 2 * L
        text = rng.integers(0, m["outputs"][0]["shape"][-1], (segments + warmup) * L)
        engines = self.engines(bundle, options, torch_model)
        results = []
        for name in options.engines:
            engine = engines[name]()
            progress(f"{name}: {segments} segment steps")
            state = engine.init_state()

            def segment(tokens):
                nonlocal state
                _, _, state = engine.segment(tokens, L, state)

            results.append({"engine": name, "call": "segment", **measure.summarize(
                measure.time_calls(segment, text.reshape(-1, L), warmup), L, "byte")})
            progress(f"{name}: {decodes} decode steps")
            _, cache, _ = engine.segment(text[:L], j, engine.init_state())
            fresh, times = cache, []
            for i, token in enumerate(text[:warmup + decodes]):
                if i % (L - j) == 0:
                    cache = fresh  # a decode cache holds one segment: start again from j tokens
                t0 = time.perf_counter()
                _, cache = engine.decode(int(token), cache)
                times.append(time.perf_counter() - t0)
            results.append({"engine": name, "call": "decode", **measure.summarize(times[warmup:], 1, "byte")})
            progress(f"{name}: generating {generated} bytes")
            gen = Generator(engine)
            gen.prefill(text[:L].tolist())
            times = measure.time_calls(lambda token: gen.feed(int(token)), text[L:L + generated], 0)
            results.append({"engine": name, "call": "generate", **measure.summarize(times, 1, "byte"),
                            "steps": dict(gen.calls)})
        return {"unit": "segment", "segment": L, "summary": j, "results": results,
                "note": "latency per byte = call latency / bytes per call; generate feeds bytes one at a time from a "
                        "segment boundary (a segment step per byte for the first j bytes of a segment, decode steps "
                        "after, a segment step at its end), so bytes_per_second is the mean generation speed"}

    def engines(self, bundle: Bundle, options: BenchOptions, torch_model) -> dict:
        """How bench opens each engine, behind the numpy engine interface `Generator` drives."""
        return {"pytorch": lambda: torch_model().numpy_engine(),
                "onnxruntime": lambda: ORTEngine(bundle, options.threads), "tvm": lambda: TVMEngine(bundle)}

    def render_validation(self, report: dict) -> list:
        title = (f"validation of {report['bundle']} ({report['segments']} segments = {report['tokens']} bytes, the "
                 f"last {report['decode_segments']} byte by byte, {report['seconds']} s)")
        return [render.errors(title, report), next_byte_line(report), *render.quantized(report),
                *render.validation_footer(report)]

    def render_bench(self, report: dict) -> list:
        rows = [[r["engine"], r["call"], str(r["bytes_per_call"]),
                 *(f"{r[k]:.1f}" for k in ("p50_us", "p90_us", "p99_us", "max_us")), f"{r['bytes_per_second']:.0f}"]
                for r in report["results"]]
        return [render.table(f"{report['model']} on {report['target']}: latency per byte ({report['segment']}-byte "
                             "segments; generate = the mix generation runs)",
                             ["engine", "call", "bytes/call", "p50 us", "p90 us", "p99 us", "max us", "bytes/s"], rows,
                             left=2), *render.bench_footer(report)]


def _bits(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Bits per byte of scored segments [1, S, L, V]: each position predicting the next byte of `tokens`."""
    flat = logits.reshape(-1, logits.shape[-1])[:-1].astype(np.float64)
    flat = flat - flat.max(-1, keepdims=True)
    logp = flat - np.log(np.exp(flat).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(flat)), tokens[1:]].mean() / np.log(2))


def _no_options(options: dict) -> None:
    if options:
        raise EdgekitError(f"segment sessions take no {', '.join(options)} option", "open the session without it")


def _bytes(specs: list[TensorSpec]) -> int:
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs)


UNIT = Segment()
