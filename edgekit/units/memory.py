"""The memory unit: a segment-level byte LM (the segment unit's steps, `Generator` and references) that also takes a
memory block fetched once per document from a hierarchical memory bank. The bank stays on disk (in flash on a
board); only the fetched block is in memory.

Why a unit of its own rather than options of the segment unit: retrieval (the document's embedding, the tree walk,
the gather from the bank) and the bank file are new, and everything else is the segment unit's, reused by
subclassing; the steps take the block as the segment contract's per-document input (`fetched_examples`).

Models implement `SegmentModel` whose steps take one fetched input, `memory_block` [depth, ...] (one node per
level, each contiguous), plus `memory_layout()`, `node_block(node)`, `retriever_arrays()` (projection,
centroids), `path(tokens)` (the reference's retrieval) and `fetch(path)`; their reference's carry is (context,
block).

The bundle: `memory/bank.bin` holds the nodes back to back, node i at i x node bytes (float32, little-endian),
read through a memory map one node at a time, each node's sha256 checked as it is read; `memory/index.npz` holds
those sha256s and the retriever's arrays and is checksummed like every file, so the manifest lists the bank as a
paged file vouched for by its table: a bank of gigabytes is never hashed as a whole.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit import measure, render
from edgekit.artifact import Bundle, TensorSpec
from edgekit.errors import BundleError, EdgekitError, InputShapeError
from edgekit.measure import TokenSource
from edgekit.quantize import scheme_of
from edgekit.units import BenchOptions
from edgekit.units.segment import (GOLDEN, KERNEL_CHECK_SEGMENTS, Comparison, Criteria, LocalSession, ORTEngine,
                                   Reference, RemoteSession, Segment, TVMEngine, _no_options, kernel_check,
                                   next_byte_line, reference_name)

BANK, INDEX = "memory/bank.bin", "memory/index.npz"
NGRAMS = (2, 3, 4)


# ---- retrieval: numpy only ---------------------------------------------------------------------------------------

def embed(tokens: np.ndarray, projection: np.ndarray, buckets: int) -> np.ndarray:
    """A document's embedding: its byte n-grams (NGRAMS) hashed into `buckets` bins (polynomial hash, exact in
    int64), log counts L2-normalised, projected by `projection` [buckets, E] and normalised (in its dtype)."""
    t = np.asarray(tokens, np.int64).reshape(-1)
    keys = []
    for n in NGRAMS:
        if t.size >= n:
            k = np.zeros(t.size - n + 1, np.int64)
            for j in range(n):
                k = k * 257 + t[j:t.size - n + 1 + j]
            keys.append((k * 5 + n) % buckets)
    counts = np.bincount(np.concatenate(keys), minlength=buckets) if keys else np.zeros(buckets)
    f = np.log1p(counts).astype(projection.dtype)
    e = (f / max(np.linalg.norm(f), 1e-30)) @ projection
    return e / max(np.linalg.norm(e), 1e-30)


def walk(e: np.ndarray, centroids: np.ndarray, branching: int, depth: int) -> list[int]:
    """The path of node ids (level by level, root excluded; nodes numbered level by level) whose centroids are
    most similar to e among each node's children."""
    path, first, parent = [], 0, 0
    for level in range(1, depth + 1):
        children = parent * branching + np.arange(branching)
        parent = int(children[np.argmax(centroids[first + children] @ e)])
        path.append(first + parent)
        first += branching ** level
    return path


class Bank:
    """A bundle's memory bank: the retriever and the node table from its (checksummed) index; nodes read from the
    bank file through a memory map, one node at a time into one preallocated block, each checked against its
    sha256 as it is read. Nothing of the bank stays mapped between fetches, so resident memory is one block."""

    def __init__(self, bundle: Bundle):
        m = bundle.manifest["memory"]
        with np.load(bundle.path / m["index"], allow_pickle=False) as f:
            self.sha256, self.projection, self.centroids = f["sha256"], f["projection"], f["centroids"]
        self.file, self.bundle = bundle.path / m["bank"], bundle.path
        self.branching, self.depth, self.buckets = m["branching"], m["depth"], m["buckets"]
        self.node_shape, self.nodes = tuple(m["node_shape"]), m["nodes"]
        self.node_bytes = int(np.prod(self.node_shape)) * 4
        self.block = np.empty((self.depth, *self.node_shape), np.float32)

    def path(self, tokens: np.ndarray) -> list[int]:
        return walk(embed(tokens, self.projection, self.buckets), self.centroids, self.branching, self.depth)

    def fetch(self, path: list[int]) -> np.ndarray:
        """The block of a path [depth, *node shape] (the same buffer every time)."""
        for level, node in enumerate(path):
            try:
                mapped = np.memmap(self.file, np.dtype("<f4"), "r", offset=node * self.node_bytes,
                                   shape=self.node_shape)
            except (OSError, ValueError) as e:
                raise BundleError(f"{self.bundle}: cannot read node {node} of {BANK} ({e})",
                                  "recompile the bundle; do not edit files inside it") from None
            self.block[level] = mapped
            del mapped  # unmapped: the page cache keeps the bytes, this process does not
            if hashlib.sha256(self.block[level]).digest() != self.sha256[node].tobytes():
                raise BundleError(f"{self.bundle}: node {node} of {BANK} was modified after compilation (sha256 "
                                  "mismatch)", "recompile the bundle; do not edit files inside it")
        return self.block


# ---- sessions ------------------------------------------------------------------------------------------------------

class MemoryTVMEngine(TVMEngine):
    """The segment unit's TVM engine with the bank: `fetch` puts a document's block on the device for every call."""

    def __init__(self, bundle: Bundle):
        super().__init__(bundle)
        self.bank = Bank(bundle)

    def fetch(self, tokens: np.ndarray) -> list[int]:
        path = self.bank.path(tokens)
        self.fetched = [self.vm.tensor(self.bank.fetch(path))]
        return path

    def begin(self, document: np.ndarray) -> None:
        self.fetch(document)


class MemorySession(LocalSession):
    """A memory bundle's session: `fetch` a document (its bytes, or a prompt) to start it, then `score` or `feed`
    its bytes like a segment session."""

    OPS = ("reset", "score", "feed", "fetch", "read_state")
    Engine = MemoryTVMEngine

    def fetch(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Retrieve and fetch the block of a document (its bytes; the stream starts anew): {path, seconds}."""
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.engine.vocab):
            raise InputShapeError(f"a document's token ids must lie in [0, {self.engine.vocab})", "pass bytes")
        t0 = time.perf_counter()
        path = self.engine.fetch(tokens)
        self.gen.reset()
        return {"path": np.array(path, np.int64), "seconds": np.array(time.perf_counter() - t0)}

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        self._fetched()
        return super().score(tokens)

    def feed(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        self._fetched()
        return super().feed(tokens)

    def _fetched(self) -> None:
        if not self.engine.fetched:
            raise EdgekitError("no memory block fetched yet", "call fetch(document bytes) before score or feed")


class MemoryRemoteSession(RemoteSession):
    def fetch(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return self.worker("fetch", tokens=np.asarray(tokens, np.int64))


# ---- references ----------------------------------------------------------------------------------------------------

class MemoryReference(Reference):
    """The float64 (or quantized) reference with the block its own retrieval (the model's weights, not the bundle's
    bank) finds."""

    def fetch(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        path = self.net.path(tokens)
        self.block = self.net.fetch(path).detach()  # as the segment step takes it
        self.carry = (None, self.block)
        return {"path": np.array(path)}


class MemoryGolden:
    """The golden record: one document, its path, scored logits and the last segment fed byte by byte."""

    def __init__(self, bundle: Bundle):
        with np.load(bundle.path / bundle.manifest["golden"]["file"]) as f:
            self.record = {k: f[k] for k in f.files}
        self.done = 0

    def fetch(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return {"path": self.record["path"]}

    def score(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        n = tokens.size // self.record["logits"].shape[2]
        self.done += n
        return {"logits": self.record["logits"][:, self.done - n:self.done]}

    def feed(self, segment: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": self.record["fed_logits"]}


# ---- the unit ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValidateOptions(Criteria):
    """A stream of `documents` documents of `document_segments` segments each; each fetched (from all its bytes)
    then scored, the last `decode_segments` segments of the last one fed byte by byte. Pass criteria: the segment
    unit's `Criteria` for the logits, every path identical, RSS at T within 5 MiB of T/10."""

    documents: int = 32
    document_segments: int = 4
    decode_segments: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.documents < 1 or self.document_segments < 1 or not 0 <= self.decode_segments <= self.document_segments:
            raise EdgekitError("need --documents >= 1, --document-segments >= 1 and 0 <= --decode-segments <= "
                               "--document-segments")


class Memory(Segment):
    name = "memory"
    ValidateOptions = ValidateOptions

    def manifest_fields(self, net, options) -> dict:
        return {**super().manifest_fields(net, options), "fetched": [net.block_spec().to_json()]}

    def write_data(self, net, stage: Path) -> dict:
        """The bank node by node (never whole in memory) with each node's sha256, and the index."""
        layout = net.memory_layout()
        (stage / BANK).parent.mkdir(parents=True, exist_ok=True)
        sha = np.zeros((layout["nodes"], 32), np.uint8)
        with open(stage / BANK, "wb") as f:
            for node in range(layout["nodes"]):
                data = np.ascontiguousarray(net.node_block(node), np.dtype("<f4"))
                sha[node] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
                f.write(data.tobytes())
        np.savez(stage / INDEX, sha256=sha, **{k: v.astype(np.float32) for k, v in net.retriever_arrays().items()})
        size = (stage / BANK).stat().st_size
        return {"memory": {"bank": BANK, "index": INDEX, "bank_bytes": size, "node_bytes": size // layout["nodes"],
                           "ngrams": list(NGRAMS), **layout},
                "paged": {BANK: {"bytes": size, "table": INDEX}}}

    def write_golden(self, net, path: Path) -> dict:
        """One document of warm + 4 segments of the seed-0 byte stream: its path, the segments scored, the last
        one fed byte by byte (float64)."""
        segments, L = net.warm_segments + 4, net.segment_length
        tokens = TokenSource(0).tokens(0, segments * L)
        ref = MemoryReference(net.double())
        found = ref.fetch(tokens)
        scored = ref.score(tokens[:-L])
        np.savez(path, **scored, fed_logits=ref.feed(tokens[-L:])["logits"], path=found["path"])
        net.float()
        return {"file": GOLDEN, "documents": 1, "document_segments": segments, "decode_segments": 1, "seed": 0}

    def session(self, bundle: Bundle, **options) -> MemorySession:
        _no_options(options)
        return MemorySession(bundle)

    def remote_session(self, bundle: Bundle, worker, **options) -> MemoryRemoteSession:
        _no_options(options)
        return MemoryRemoteSession(bundle, worker)

    def describe(self, manifest: dict) -> str:
        m = manifest["memory"]
        return (f"{manifest['segment']}-token segments, a {m['depth']}-node block fetched per document from a bank of "
                f"{m['nodes']} nodes ({render.mib(m['bank_bytes'])})")

    def validate(self, bundle: Bundle, session, net, options: ValidateOptions, progress) -> dict:
        """Document by document: the artifact's retrieval against the reference's (the path), then its logits
        against the reference with that block (a quantized bundle's: the quantized model's, and its kernel check
        segment by segment as the segment unit's); RSS at T/10 and T of the documents."""
        o = options
        documents, per_doc, decode_segments = o.documents, o.document_segments, o.decode_segments
        if net is None:
            golden = bundle.manifest["golden"]
            if o.seed != golden["seed"] or o.text is not None:
                raise EdgekitError("without PyTorch, validation compares with the bundle's golden record: one "
                                   f"document of {golden['document_segments']} segments of seed {golden['seed']}",
                                   "drop --seed/--text, or install edgekit[compile] for any stream")
            documents, per_doc, decode_segments = 1, golden["document_segments"], golden["decode_segments"]
            ref = MemoryGolden(bundle)
        else:
            ref = MemoryReference(self.reference(net, scheme_of(bundle.manifest)))
        quantized = scheme_of(bundle.manifest) != "none"
        ref64 = MemoryReference(net) if quantized and net is not None else None  # the quantization's own effect
        source, L = TokenSource(o.seed, o.text), bundle.manifest["segment"]
        segments, marks = documents * per_doc, measure.rss_marks(documents)
        compared, rss, fetch_seconds, paths = Comparison(segments, quantized, ref64), {}, [], [0, 0]
        checked = []  # (tokens, (block,)) of the documents the kernel check will replay
        t0 = time.perf_counter()
        for doc in range(documents):
            first = doc * per_doc
            tokens = source.tokens(first * L, (first + per_doc) * L)
            got = session.fetch(tokens)
            paths[0] += bool(np.array_equal(got["path"], ref.fetch(tokens)["path"]))
            paths[1] += 1
            if ref64 is not None:
                ref64.fetch(tokens)
                if len(checked) * per_doc < KERNEL_CHECK_SEGMENTS:
                    checked.append((tokens, (ref.block,)))
            fetch_seconds.append(float(got["seconds"]))
            fed = decode_segments if doc == documents - 1 else 0
            pieces = [(first, first + per_doc - fed, "score")] if per_doc > fed else []
            pieces += [(s, s + 1, "feed") for s in range(first + per_doc - fed, first + per_doc)]
            for start, stop, how in pieces:
                part = tokens[(start - first) * L:(stop - first) * L]
                compared.add(how, part, getattr(session, how)(part), getattr(ref, how)(part), start)
            if doc + 1 in marks:
                rss[doc + 1] = measure.rss_bytes(session.pid)
            progress(doc + 1, documents)
        mem = measure.memory(rss, documents)
        kernel = kernel_check(session, ref.net, checked, L, session.fetch) if ref64 is not None else None
        checks, fields = compared.report(o, kernel)
        checks.update({"path_agreement": paths[0] == paths[1], **mem["checks"]})
        return {
            "bundle": str(bundle.path), "target": bundle.target["name"], "documents": documents,
            "document_segments": per_doc, "segments": segments, "decode_segments": decode_segments,
            "segment_length": L, "tokens": segments * L, "seed": o.seed,
            "input": f"the bytes of {o.text}, repeated" if o.text is not None else
                     "uniform random bytes, numpy default_rng([seed, block]) per 4096-byte block",
            "reference": reference_name(bundle.manifest, "the model's retrieval (its own retriever weights and bank) "
                                                         "and its algorithm as written, one stream per document; token "
                                                         "by token, each token's distribution given only the tokens "
                                                         "before it"),
            **fields, "criteria": {**fields["criteria"], "rss_change_max_bytes": measure.RSS_CHANGE_MAX},
            "path_agreement": paths[0] / paths[1],
            "fetch_us": {"p50": float(np.percentile(fetch_seconds, 50) * 1e6),
                         "p99": float(np.percentile(fetch_seconds, 99) * 1e6)},
            "bank_bytes": bundle.manifest["memory"]["bank_bytes"], "state_bytes": bundle.manifest["state_bytes"],
            "rss_bytes": mem["rss_bytes"], "seconds": round(time.perf_counter() - t0, 2), "checks": checks,
            "passed": all(checks.values()),
        }

    def engines(self, bundle: Bundle, options: BenchOptions, torch_model) -> dict:
        """The segment unit's engines, each with the block of one random document fetched from the bank."""
        bank = Bank(bundle)
        block = bank.fetch(bank.path(np.random.default_rng(options.seed).integers(0, 256, 4096))).copy()

        def torch_engine():
            import torch

            engine = torch_model().numpy_engine()
            engine.fetched = [torch.from_numpy(block)]
            return engine

        def ort_engine():
            engine = ORTEngine(bundle, options.threads)
            engine.fetched = {"memory_block": block}
            return engine

        def tvm_engine():
            engine = TVMEngine(bundle)
            engine.fetched = [engine.vm.tensor(block)]
            return engine

        return {"pytorch": torch_engine, "onnxruntime": ort_engine, "tvm": tvm_engine}

    def render_validation(self, report: dict) -> list:
        title = (f"validation of {report['bundle']} ({report['documents']} documents of {report['document_segments']} "
                 f"segments = {report['tokens']} bytes, the last {report['decode_segments']} byte by byte, "
                 f"{report['seconds']} s)")
        return [render.errors(title, report),
                f"retrieved path agreement {report['path_agreement']:.2%}; {next_byte_line(report)}; fetch p50 "
                f"{report['fetch_us']['p50']:.0f} us, p99 "
                f"{report['fetch_us']['p99']:.0f} us from a {render.mib(report['bank_bytes'])} bank",
                *render.quantized(report), *render.validation_footer(report)]


UNIT = Memory()
