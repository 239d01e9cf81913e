"""Aaren against the same network with ordinary softmax attention and a KV cache: memory and per-token latency
against stream length (issue 6, part 5), plus the float64 agreement of step, scan and exact softmax attention.

Both networks share one set of weights (the bundle's). Engines, one process each so resident memory is theirs:
    pytorch-aaren        eager `Aaren.step` (O(1) state)
    pytorch-kvcache      eager `SoftmaxKVCache.step` (attention over the cached prefix, then append)
    onnxruntime-aaren    the bundle's exported step graph in ONNX Runtime
    onnxruntime-kvcache  the KV-cache step exported to ONNX with a symbolic cache length, in ONNX Runtime;
                         the cache is preallocated and handed to the graph in place, the host appends the new
                         token's key and value (what a KV-cache runtime does)
    tvm-aaren            the compiled bundle through `edgekit.runtime.Session`
    tvm-kvcache          the same KV-cache ONNX step compiled by TVM (host target, edgekit's CPU pipeline) with a
                         symbolic cache length; cache in TVM-aligned buffers, handed in place
A stream position L is reached the fast way (Aaren: its chunked step; KV cache: `SoftmaxKVCache.prefill`, the
parallel form, filling the cache), then `warmup` untimed and `window` timed single-token steps are run there.
"""
from __future__ import annotations

import concurrent.futures
import io
import math
import multiprocessing
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.artifact import write_atomic
from edgekit.engines import ort_options, use_threads
from edgekit.measure import rss_bytes

LENGTHS = (1_000, 10_000, 100_000)
ENGINES = ("pytorch-aaren", "pytorch-kvcache", "onnxruntime-aaren", "onnxruntime-kvcache", "tvm-aaren",
           "tvm-kvcache")
REACH_CHUNK = 4096  # frames per parallel call when reaching a position (eager engines)


# --------------------------------------------------------------------------------------------------- the graphs
def kv_step_module(net):
    """nn.Module: (x [B,1,F], then per layer j: keys{j}_{h} for each head h, then values{j}_{h}: [B,t,D]) ->
    (logits [B,1,C], then per layer: new key, new value [B,1,H,D]) — one token of the KV-cache network; the caller
    appends the returned keys and values. One input per head keeps every cached prefix a contiguous block the
    graph reads in place: per head the scores and the output are GEMVs (`cached_attention`)."""
    import torch

    from edgekit.models.aaren import cached_attention

    class KVStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, *cache):
            new = []

            def attend(j, attn, h):
                k, v = attn.keys_values(h)  # [B, 1, H, D]
                new.extend([k, v])
                heads = attn.heads
                keys, values = cache[2 * j * heads:(2 * j + 1) * heads], cache[(2 * j + 1) * heads:(2 * j + 2) * heads]
                o = [cached_attention(attn.query[i], keys[i], values[i], k[:, 0, i], v[:, 0, i]) for i in range(heads)]
                return torch.cat(o, dim=-1).unsqueeze(1)  # [B, 1, H*D]

            logits = self.net.network(x, attend)
            return (logits, *new)

    return KVStep().eval()


def kv_input_names(net) -> list[str]:
    return [f"{kind}{j}_{h}" for j, b in enumerate(net.blocks) for kind in ("keys", "values")
            for h in range(b.attn.heads)]


def export_kv_step(net, path: Path, example_length: int = 8) -> Path:
    """The KV-cache step as ONNX (opset 17) with the cache length `t` symbolic; checked against eager."""
    import onnx
    import onnxruntime as ort
    import torch

    module = kv_step_module(net)
    d = net.blocks[0].attn.d_head
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, net.input_size, generator=g)
    names = kv_input_names(net)
    out_names = ["logits", *[f"new_{kind}{j}" for j in range(len(net.blocks)) for kind in ("key", "value")]]
    cache = [torch.randn(1, example_length, d, generator=g) for _ in names]
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, *cache), buf, input_names=["x", *names], output_names=out_names,
                          dynamic_axes={n: {1: "t"} for n in names}, opset_version=17, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in (1, 37):
        cache = [torch.randn(1, t, d, generator=g) for _ in names]
        got = sess.run(None, {"x": x.numpy(), **{n: c.numpy() for n, c in zip(names, cache)}})
        with torch.no_grad():
            want = module(x, *cache)
        for gv, w in zip(got, want):
            np.testing.assert_allclose(gv, w.numpy(), rtol=1e-4, atol=1e-5)
    onnx.save(proto, path)
    return path


def build_kv_step_tvm(onnx_path: Path, lib_path: Path) -> Path:
    """The KV-cache ONNX step compiled for this host by edgekit's own import and CPU pipeline."""
    from edgekit.compile import import_entries
    from edgekit.pipeline import build
    from edgekit.targets import get

    host = get("host")
    build(import_entries({"kvstep": onnx_path}), host.tvm_target(), lib_path, host.cc)
    return lib_path


# ------------------------------------------------------------------------------------------------------ engines
class Engine:
    """One way of running the network token by token: `reach` appends frames fast, `step` times one."""

    kind = ""  # "aaren" or "kv-cache"

    def reach(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def step(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """State (Aaren) or cached keys and values (KV cache) held for the tokens so far."""
        raise NotImplementedError

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` tokens before they arrive (KV caches), so no timed step reallocates."""


class TorchAaren(Engine):
    kind = "aaren"

    def __init__(self, net):
        import torch

        self.torch, self.net, self.state = torch, net, net.init_state(1)

    def reach(self, x):
        with self.torch.no_grad():
            for t in range(0, x.shape[1], REACH_CHUNK):
                _, self.state = self.net.step_chunk(self.torch.from_numpy(x[:, t:t + REACH_CHUNK]), self.state)

    def step(self, x):
        with self.torch.no_grad():
            y, self.state = self.net.step(self.torch.from_numpy(x[:, 0]), self.state)
        return y["logits"].numpy()

    def memory_bytes(self):
        return sum(v.numel() * v.element_size() for v in self.state.values())


class TorchKV(Engine):
    kind = "kv-cache"

    def __init__(self, net):
        import torch

        from edgekit.models.aaren import SoftmaxKVCache

        self.torch, self.cache = torch, SoftmaxKVCache(net, batch=1)

    def reserve(self, tokens):
        self.cache.reserve(tokens)

    def reach(self, x):
        self.cache.prefill(self.torch.from_numpy(x), chunk=REACH_CHUNK)

    def step(self, x):
        return self.cache.step(self.torch.from_numpy(x[:, 0])).numpy()

    def memory_bytes(self):
        return self.cache.cache_bytes()


class OrtAaren(Engine):
    kind = "aaren"

    def __init__(self, bundle, threads: int):
        from edgekit.units.frame import OrtFrames, chunk_sizes

        self.run = OrtFrames(bundle, threads, tuple(chunk_sizes(bundle)))
        self.state_bytes = bundle.manifest["state_bytes"]

    def reach(self, x):
        big = max(self.run.sessions)
        whole = x.shape[1] // big * big
        for t in range(0, whole, big):
            self.run(x[:, t:t + big])
        for t in range(whole, x.shape[1]):
            self.run(x[:, t:t + 1])

    def step(self, x):
        return self.run(x)[0]

    def memory_bytes(self):
        return self.state_bytes


class TvmAaren(Engine):
    kind = "aaren"

    def __init__(self, bundle):
        from edgekit.runtime import Session

        self.session = Session(bundle)
        self.chunk = max(e["frames"] for e in bundle.manifest["entries"].values())
        self.state_bytes = bundle.manifest["state_bytes"]

    def reach(self, x):
        for t in range(0, x.shape[1], REACH_CHUNK):  # outputs dropped as they come: the VM pools their memory
            self.session.feed(x[:, t:t + REACH_CHUNK], self.chunk)

    def step(self, x):
        return self.session.step(x)["logits"]

    def memory_bytes(self):
        return self.state_bytes


def _host_cache(net):
    """A SoftmaxKVCache whose buffers are 64-byte aligned numpy memory (TVM's kernels may assume alignment),
    so a compiled step can read each head's cached prefix in place; prefill and append go through torch views."""
    import torch

    from edgekit.models.aaren import SoftmaxKVCache

    class HostCache(SoftmaxKVCache):
        def zeros(self, shape, dtype):
            b, h, tokens, d = shape
            tokens = -(-tokens // 16) * 16  # every head's block starts 64-byte aligned too
            return torch.from_numpy(_aligned((b, h, tokens, d)))

        def prefix(self) -> list[np.ndarray]:
            """Per layer, keys then values of each head [1, t, D] for the tokens so far: compact views, no copy."""
            views = []
            for j in range(len(self.keys)):
                for buf in (self.keys, self.values):
                    _, heads, cap, d = buf[j].shape
                    flat = buf[j].numpy().reshape(-1)
                    views += [flat[h * cap * d:h * cap * d + self.length * d].reshape(1, self.length, d)
                              for h in range(heads)]
            return views

        def append(self, new: list[np.ndarray]) -> None:
            """Add the compiled step's new keys and values [1, 1, H, D] (key0, value0, key1, ...)."""
            for j in range(len(self.keys)):
                self._append(j, torch.from_numpy(new[2 * j]), torch.from_numpy(new[2 * j + 1]))
            self.length += 1

    return HostCache(net, batch=1, capacity=16)


def _aligned(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
    """Zeroed float32 memory starting on an `align`-byte boundary (zero pages: resident only once written)."""
    n = math.prod(shape) * 4
    raw = np.zeros(n + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + n].view(np.float32).reshape(shape)


def torch_from_numpy(x: np.ndarray):
    import torch

    return torch.from_numpy(x)


class CompiledKV(Engine):
    """A compiled KV-cache step over a host-side cache: reaching a length and the first token run in torch (the
    compiled graph needs t >= 1, a max over no scores); each later step runs `_compiled` on the cache in place."""

    kind = "kv-cache"

    def __init__(self, net):
        self.cache = _host_cache(net)

    def reserve(self, tokens):
        self.cache.reserve(tokens)

    def reach(self, x):
        self.cache.prefill(torch_from_numpy(x), chunk=REACH_CHUNK)

    def step(self, x):
        if not self.cache.length:
            return self.cache.prefill(torch_from_numpy(x))[:, 0].numpy()
        out = self._compiled(np.ascontiguousarray(x), self.cache.prefix())
        self.cache.append(out[1:])
        return out[0][:, 0]

    def _compiled(self, x: np.ndarray, prefix: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def memory_bytes(self):
        return self.cache.cache_bytes()


class OrtKV(CompiledKV):
    def __init__(self, net, onnx_path: Path, threads: int):
        import onnxruntime as ort

        super().__init__(net)
        opts = ort_options(threads)
        self.ort = ort
        self.sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def _compiled(self, x, prefix):
        feeds = {n: self.ort.OrtValue.ortvalue_from_numpy(a)  # shares the cache's memory: no copy per step
                 for n, a in zip(self.names, [x, *prefix])}
        return [r.numpy() for r in self.sess.run_with_ort_values(self.outputs, feeds)]


class TvmKV(CompiledKV):
    def __init__(self, net, lib_path: Path):
        import tvm_ffi

        from edgekit.tvm_runtime import load_vm

        super().__init__(net)
        self.ffi, self.vm = tvm_ffi, load_vm(lib_path)
        self.func = self.vm.raw("kvstep")

    def _compiled(self, x, prefix):
        args = [self.vm.tensor(x), *[self.ffi.from_dlpack(a) for a in prefix]]  # cache in place
        return [self.vm.numpy(r).copy() for r in self.func(*args)]  # views of the VM's pooled memory


# ------------------------------------------------------------------------------------------------- measurement
def _make_engine(name: str, bundle_path: Path, kv_onnx: Path | None, kv_lib: Path | None, threads: int) -> Engine:
    from edgekit.artifact import load
    from edgekit.models import from_bundle as reference_model

    bundle = load(bundle_path)
    if name == "tvm-aaren":
        return TvmAaren(bundle)
    if name == "onnxruntime-aaren":
        return OrtAaren(bundle, threads)
    net = reference_model(bundle).float()
    return {"pytorch-aaren": lambda: TorchAaren(net), "pytorch-kvcache": lambda: TorchKV(net),
            "onnxruntime-kvcache": lambda: OrtKV(net, kv_onnx, threads),
            "tvm-kvcache": lambda: TvmKV(net, kv_lib)}[name]()


def measure_engine(name: str, bundle_path: Path, lengths: tuple[int, ...], window: int, warmup: int, seed: int,
                   threads: int, kv_onnx: Path | None = None, kv_lib: Path | None = None) -> dict:
    """One engine's run (meant for a fresh process): per stream length, step latency there, memory and RSS."""
    from edgekit.measure import FrameSource

    use_threads(threads)
    engine = _make_engine(name, Path(bundle_path), kv_onnx, kv_lib, threads)
    source = FrameSource(torch_input_size(bundle_path), seed)
    pos, rows = 0, []
    engine.reserve(warmup + window)
    for _ in range(warmup):  # first calls: lazy initialisation, not stream length
        engine.step(source.frames(pos, pos + 1))
        pos += 1
    rss0 = rss_bytes()
    for length in sorted(lengths):
        if length < pos:
            raise ValueError(f"lengths must exceed the warm-up ({warmup} frames)")
        engine.reserve(length + warmup + window)
        t0 = time.perf_counter()
        engine.reach(source.frames(pos, length))
        reach_seconds = time.perf_counter() - t0
        pos = length
        times = []
        for i in range(warmup + window):
            x = source.frames(pos, pos + 1)
            t0 = time.perf_counter()
            y = engine.step(x)
            dt = time.perf_counter() - t0
            pos += 1
            if i >= warmup:
                times.append(dt)
        us = np.asarray(times) * 1e6
        rss = rss_bytes()
        rows.append({"length": length, "p50_us": float(np.median(us)), "p10_us": float(np.percentile(us, 10)),
                     "p90_us": float(np.percentile(us, 90)), "mean_us": float(us.mean()),
                     "memory_bytes": engine.memory_bytes(), "rss_bytes": rss, "rss_growth_bytes": rss - rss0,
                     "reach_seconds": round(reach_seconds, 2), "finite": bool(np.isfinite(y).all()),
                     "timed_positions": [length + warmup, pos]})
    return {"engine": name, "kind": engine.kind, "rss_after_warmup_bytes": rss0, "rows": rows}


def torch_input_size(bundle_path) -> int:
    from edgekit.artifact import load

    return load(Path(bundle_path), check_machine=False).manifest["input"]["shape"][-1]


# ------------------------------------------------------------------------------------------ float64 agreement
def exact_softmax_attention(attn, h, rows: int = 256):
    """Each head's query against every prefix by the textbook formula: a masked softmax over all keys, computed
    for `rows` positions at a time (no scan, no cache, no running max)."""
    import torch

    k, v = attn.keys_values(h)
    s = attn.scores(k).transpose(1, 2)  # [B, H, T]
    v = v.transpose(1, 2)  # [B, H, T, D]
    out = []
    for r in range(0, h.shape[1], rows):
        stop = min(h.shape[1], r + rows)
        pos = torch.arange(r, stop).view(-1, 1)
        mask = torch.arange(stop).view(1, -1) <= pos  # [rows, stop]
        p = torch.softmax(s[:, :, None, :stop].masked_fill(~mask, -math.inf), dim=-1)  # [B, H, rows, stop]
        out.append(p @ v[:, :, :stop])  # [B, H, rows, D]
    return torch.cat(out, dim=2).transpose(1, 2).flatten(2).to(h.dtype)


def agreement(net, tokens: int = 10_000, seed: int = 0, chunk: int = 16) -> dict:
    """Float64: max abs error between the step (token by token), the parallel scan, the chunked step, the KV
    cache and exact softmax attention, on the logits of `tokens` frames of the seeded stream."""
    import copy

    import torch

    from edgekit.models.aaren import SoftmaxKVCache
    from edgekit.measure import FrameSource

    net = copy.deepcopy(net).double().eval()
    x = torch.from_numpy(FrameSource(net.input_size, seed).frames(0, tokens)).double()
    with torch.no_grad():
        forms = {"scan": net.forward_frames(x)["logits"],
                 f"chunk{chunk}": net.stream(x, chunk=chunk)["logits"],
                 "exact softmax": net.network(x, lambda j, attn, h: exact_softmax_attention(attn, h))}
        state, steps = net.init_state(1), []
        for t in range(tokens):
            y, state = net.step(x[:, t], state)
            steps.append(y["logits"])
        forms["step"] = torch.stack(steps, dim=1)
        cache = SoftmaxKVCache(net, batch=1, capacity=tokens)
        forms["kv-cache step"] = torch.stack([cache.step(x[:, t]) for t in range(tokens)], dim=1)
    names = list(forms)
    pairs = {f"{a} vs {b}": float((forms[a] - forms[b]).abs().max())
             for i, a in enumerate(names) for b in names[i + 1:]}
    return {"tokens": tokens, "dtype": "float64", "output": "logits",
            "reference_max_abs": float(forms["scan"].abs().max()), "max_abs_error": pairs}


# ------------------------------------------------------------------------------------------------------ report
def compare(bundle_path: Path, lengths: tuple[int, ...] = LENGTHS, engines: tuple[str, ...] = ENGINES,
            window: int = 200, warmup: int = 20, seed: int = 0, threads: int = 1, agreement_tokens: int = 10_000,
            progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Run every engine in its own process over the stream lengths; the report (also saved in the bundle as
    kv_compare.json, with kv_compare.md) plus the float64 agreement figure."""
    from edgekit.artifact import load
    from edgekit.models import from_bundle as reference_model

    bundle = load(Path(bundle_path))
    m = bundle.manifest
    if m["model"]["family"] != "aaren":
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"{bundle_path} holds a {m['model']['family']} model; the KV-cache comparison is for aaren",
                           "compile one with `edgekit compile aaren -o DIR`")
    net = reference_model(bundle).float()
    blocks = [b.attn for b in net.blocks]
    report = {"bundle": str(bundle.path), "model": m["model"], "target": m["target"]["name"],
              "machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads, "seed": seed,
              "window": window, "warmup": warmup, "lengths": list(lengths),
              "aaren_state_bytes": {"artifact_state": m["state_bytes"],
                                    "attention_state": sum(4 * a.heads * (2 * a.d_head + 3) for a in blocks)},
              "kv_cache_bytes_per_token": sum(2 * 4 * a.heads * a.d_head for a in blocks),
              "method": __doc__.split("\n\n", 1)[1].strip(), "engines": [], "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="kvcompare-") as tmp:
        kv_onnx = kv_lib = None
        if any("kvcache" in e and e != "pytorch-kvcache" for e in engines):
            progress("exporting the KV-cache step to ONNX")
            kv_onnx = export_kv_step(net, Path(tmp) / "kvstep.onnx")
        if "tvm-kvcache" in engines:
            progress("compiling the KV-cache step with TVM")
            try:
                kv_lib = build_kv_step_tvm(kv_onnx, Path(tmp) / "kvstep.so")
            except Exception as e:  # noqa: BLE001 - reported, the other engines still run
                report["skipped"]["tvm-kvcache"] = f"TVM build failed: {type(e).__name__}: {str(e)[:300]}"
        ctx = multiprocessing.get_context("spawn")
        for name in engines:
            if name in report["skipped"]:
                continue
            progress(f"{name}: lengths {', '.join(map(str, lengths))}")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                report["engines"].append(pool.submit(measure_engine, name, bundle.path, tuple(lengths), window,
                                                     warmup, seed, threads, kv_onnx, kv_lib).result())
    if agreement_tokens:
        import torch

        progress(f"float64 agreement on {agreement_tokens} tokens")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            report["agreement"] = agreement(net, agreement_tokens, seed)
        finally:
            torch.set_num_threads(before)
    bundle.record("kv_compare.json", report)
    write_atomic(bundle.path / "kv_compare.md", markdown(report).encode())
    plot(report, bundle.path / "kv_compare.png")
    return report


def markdown(report: dict) -> str:
    lines = [f"# Aaren vs softmax attention with a KV cache ({report['model']['family']} "
             f"{report['model'].get('config_name') or ''}, {report['target']})", "",
             f"{report['threads']} thread(s); per-token latency = median (p10-p90) of {report['window']} single-token "
             f"steps after {report['warmup']} untimed ones at each stream length; RSS growth since the engine's "
             "warm-up, in its own process. Each length is reached from the previous one the fast way (Aaren: "
             "its chunked step; KV cache: `SoftmaxKVCache.prefill`, the parallel form filling the cache, preallocated "
             "to length + warm-up + window), so the timed steps sit at tokens L+warm-up .. L+warm-up+window.", "",
             f"Aaren state: {report['aaren_state_bytes']['artifact_state']} bytes in the artifact "
             f"({report['aaren_state_bytes']['attention_state']} of them the attention's m and Kahan-compensated "
             f"c, a), whatever the length. KV cache: {report['kv_cache_bytes_per_token']} bytes per token.", "",
             "| engine | tokens | latency p50 (p10-p90) us | state / cache | RSS | RSS growth since warm-up "
             "| RSS growth since first length |", "|---|---:|---:|---:|---:|---:|---:|"]
    for e in report["engines"]:
        for r in e["rows"]:
            lines.append(f"| {e['engine']} | {r['length']:,} | {r['p50_us']:.1f} ({r['p10_us']:.1f}-{r['p90_us']:.1f}) "
                         f"| {_size(r['memory_bytes'])} | {_size(r['rss_bytes'])} | {_size(r['rss_growth_bytes'])} "
                         f"| {_size(r['rss_bytes'] - e['rows'][0]['rss_bytes'])} |")
    for name, why in report["skipped"].items():
        lines.append(f"\n{name} skipped: {why}")
    if "agreement" in report:
        a = report["agreement"]
        lines += ["", f"Float64 agreement on {a['tokens']:,} tokens (max abs error of the logits, "
                      f"whose max magnitude is {a['reference_max_abs']:.3g}):", "", "| forms | max abs error |",
                  "|---|---:|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in a["max_abs_error"].items()]
    return "\n".join(lines) + "\n"


def _size(b: int) -> str:
    sign, b = ("-" if b < 0 else ""), abs(b)
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{sign}{b / scale:.1f} {unit}"
    return f"{sign}{b} B"


def plot(report: dict, path: Path) -> Path | None:
    """Latency and memory against stream length, if matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"pytorch": "tab:blue", "onnxruntime": "tab:green", "tvm": "tab:purple"}  # one per runtime
    for e in report["engines"]:
        x = [r["length"] for r in e["rows"]]
        style = dict(color=colors.get(e["engine"].split("-")[0]), linestyle="-" if e["kind"] == "aaren" else "--",
                     marker="o" if e["kind"] == "aaren" else "s")
        lat.plot(x, [r["p50_us"] for r in e["rows"]], label=e["engine"], **style)
        mem.plot(x, [max(r["rss_growth_bytes"], 1) / 2**20 for r in e["rows"]], label=f"{e['engine']} RSS", **style)
    x = report["lengths"]
    mem.plot(x, [report["kv_cache_bytes_per_token"] * n / 2**20 for n in x], ":", color="k", label="KV cache bytes")
    for ax, title, unit in ((lat, "per-token latency", "us (median)"), (mem, "memory growth", "MiB")):
        ax.set(xscale="log", yscale="log", xlabel="stream length (tokens)", ylabel=unit, title=title)
        ax.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=7)
    mem.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path
