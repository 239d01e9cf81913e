"""Bench stage: per-frame latency of the same streaming step in PyTorch eager, ONNX Runtime and the TVM bundle,
on the same inputs after warm-up, for each chunk size the bundle was built with."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.artifact import load
from edgekit.runtime import Session, require_frames

HOP_SECONDS = 0.010  # one frame of the published audio front end: 10 ms shift


def summarize(call_seconds: list[float], frames_per_call: int, hop: float = HOP_SECONDS) -> dict:
    per_frame = np.asarray(call_seconds) / frames_per_call
    p50, p90, p99 = np.percentile(per_frame, [50, 90, 99])
    return {"frames_per_call": frames_per_call, "calls": len(per_frame),
            "p50_us": p50 * 1e6, "p90_us": p90 * 1e6, "p99_us": p99 * 1e6, "max_us": per_frame.max() * 1e6,
            "frames_per_second": 1.0 / per_frame.mean(), "real_time_factor": p50 / hop}


def time_calls(fn: Callable[[np.ndarray], object], xs: np.ndarray, warmup: int) -> list[float]:
    for x in xs[:warmup]:
        fn(x)
    times = []
    for x in xs:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def _torch_engine(bundle, frames: int):
    import torch

    from edgekit.validate import reference_model

    net = reference_model(bundle).float()
    state = net.init_state(bundle.manifest["batch"])

    @torch.no_grad()
    def call(x: np.ndarray):
        nonlocal state
        y, state = net.step_chunk(torch.from_numpy(x), state)
        return y

    return call


def _onnxruntime_engine(bundle, frames: int):
    import onnxruntime as ort

    entry = bundle.entry_for(frames)
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(str(bundle.path / bundle.manifest["entries"][entry]["onnx"]), opts,
                                providers=["CPUExecutionProvider"])
    names = [s["name"] for s in bundle.manifest["state"]]
    outs = [o["name"] for o in bundle.manifest["outputs"]]
    state = {f"state.{s['name']}": np.zeros(s["shape"], s["dtype"]) for s in bundle.manifest["state"]}

    def call(x: np.ndarray):
        nonlocal state
        result = sess.run(None, {"x": x, **state})
        state = dict(zip((f"state.{n}" for n in names), result[len(outs):]))
        return result[:len(outs)]

    return call


def _tvm_engine(bundle, frames: int):
    return Session(bundle).step


def _tvm_vm_only(bundle, frames: int, calls: int) -> dict:
    """The compiled function alone, timed inside TVM (no Python per call): what compute costs."""
    import tvm
    from tvm import relax

    m = bundle.manifest
    dev = tvm.cuda() if m["target"]["runs"] == "cuda" else tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(bundle.library)), dev)
    entry = bundle.entry_for(frames)
    args = [np.zeros((m["batch"], frames, m["input"]["shape"][-1]), np.float32),
            *[np.zeros(s["shape"], s["dtype"]) for s in m["state"]]]
    vm.set_input(entry, *[tvm.runtime.tensor(a, dev) for a in args])
    te = vm.time_evaluator("invoke_stateful", dev, number=max(1, calls // 5), repeat=5)(entry)
    per_frame = te.mean / frames
    return {"frames_per_call": frames, "calls": calls, "mean_us": per_frame * 1e6, "min_us": te.min / frames * 1e6,
            "frames_per_second": 1.0 / per_frame, "real_time_factor": per_frame / HOP_SECONDS}


ENGINES = {"pytorch": _torch_engine, "onnxruntime": _onnxruntime_engine, "tvm": _tvm_engine}


def bench(bundle_path: Path, calls: int = 200, warmup: int = 20, engines: tuple[str, ...] = tuple(ENGINES),
          seed: int = 0, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Latency per frame for every engine and chunk size; saved as bench.json in the bundle."""
    bundle = require_frames(load(bundle_path))  # for another machine: refused, emulated timings would mislead
    m = bundle.manifest
    sizes = sorted(e["frames"] for e in m["entries"].values() if e["frames"])
    rng = np.random.default_rng(seed)
    results = []
    for frames in sizes:
        n = max(warmup + 10, calls // frames)
        xs = rng.standard_normal((n, m["batch"], frames, m["input"]["shape"][-1]), dtype=np.float32)
        for engine in engines:
            progress(f"{engine}, chunk {frames}: {n} calls")
            results.append({"engine": engine, **summarize(time_calls(ENGINES[engine](bundle, frames), xs, warmup),
                                                          frames)})
        if "tvm" in engines:
            results.append({"engine": "tvm-compute", **_tvm_vm_only(bundle, frames, n)})
    report = {"bundle": str(bundle.path), "target": m["target"]["name"], "model": m["model"]["family"],
              "hop_ms": HOP_SECONDS * 1e3, "batch": m["batch"], "results": results,
              "note": "per-frame latency = call latency / frames per call; real-time factor = p50 per frame / hop"}
    bundle.record("bench.json", report)
    return report
