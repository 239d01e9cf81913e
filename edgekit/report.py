"""Report stage: a frame bundle's latency where it runs, as a trtexec / benchmark_model / onnxruntime_perf_test user
expects it: per engine (a Python session, the native runner) and chunk size, every call timed over a carried,
realistic state (random frames and stretches of silence, as `edgekit bench` streams them), warm-up and N stated,
min/median/mean/p90/p99/p99.9/max/std per frame, init time and first call, peak resident memory and memory over
the run, real-time factor, and the machine it ran on. Writes DIR/report.json, DIR/report.md and PNG plots.

Each engine runs in its own process, so its memory is its own: the native runner (`edgekit-run --serve`, timed
inside it around the compiled call) and a Python session (`python -m edgekit.report`, timed around `step`).
Bundles for another machine are refused: emulated timings are not board timings."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit import measure, remote
from edgekit.artifact import Bundle, load, write_atomic
from edgekit.errors import BundleError, EdgekitError
from edgekit.remote import machine
from edgekit.units.frame import HOP_SECONDS, SILENCE_CALLS, LocalSession, bench_frames, chunk_sizes

ENGINES = ("python", "native")  # engines on this machine; "rpc" times a board
FILES = ("report.json", "report.md", "latency_cdf.png", "timeline.png", "memory.png")
RSS_SAMPLES = 20  # resident memory is read this many times along each run
PROFILE_CALLS, PROFILE_TOP = 100, 12  # calls profiled per kernel after the timed run, kernels listed
TIMING = {"python": "a Python session's step (input check, copy into the aligned input buffer, the compiled call, "
                    "output views), perf_counter around each call, in a process of its own",
          "native": "the compiled entry called by edgekit-run (C++, input already in its buffer), steady_clock "
                    "around each call, in the runner's own process",
          "rpc": "the compiled entry on the board, timed there by TVM's time evaluator around one invoke_stateful "
                 "(number=1, repeat=1; the evaluator calls it once untimed first), the state carried on the board; "
                 "peak RSS: the board's RPC session process (TVM's Python server included)"}
Progress = Callable[[str], None]


def report(bundle_path: Path, out: Path, engines: tuple[str, ...] = ENGINES, calls: int = 1000, warmup: int = 100,
           seed: int = 0, threads: int | None = None, force: bool = False, rpc: str | None = None,
           progress: Progress = lambda msg: None) -> dict:
    """Time every chunk size of the bundle with each engine; write report.json, report.md and plots into `out`.
    With `rpc` (HOST:PORT of an `edgekit serve` on a board), the bundle is timed there instead (engine "rpc")."""
    if unknown := set(engines) - set(ENGINES):
        raise EdgekitError(f"unknown engine(s) {', '.join(sorted(unknown))}", f"choose from {', '.join(ENGINES)}")
    bundle = load(bundle_path, check_machine=rpc is None)  # here, another machine's bundle is refused: no
    engines = ("rpc",) if rpc else engines                  # emulated timings; over RPC, the board runs it
    if bundle.manifest["unit"] != "frame" or bundle.device != "cpu":
        raise BundleError(f"{bundle.path}: reports time frame bundles on CPUs", "use `edgekit bench` for this bundle")
    if "native" in engines and "runner" not in bundle.manifest:
        raise BundleError(f"{bundle.path} has no native runner", f"build it in: edgekit runner {bundle.path}")
    if calls < 1 or warmup < 0:
        raise EdgekitError("need --calls >= 1 and --warmup >= 0")
    out = _output_dir(Path(out), force)
    env = {**os.environ, **({"TVM_NUM_THREADS": str(threads)} if threads else {})}
    runs, where = [], machine(threads)
    if rpc:
        for frames, timed in remote.time_calls(bundle, rpc, chunk_sizes(bundle), calls + warmup, seed,
                                               progress).items():
            runs.append(_run("rpc", frames, warmup, timed))
            where = {**timed["machine"], "rpc": rpc}
    for engine in (e for e in engines if e != "rpc"):
        for frames in chunk_sizes(bundle):
            progress(f"{engine}, chunk {frames}: {warmup} + {calls} calls")
            timed = (_native if engine == "native" else _python)(bundle, frames, calls + warmup, seed, env)
            runs.append(_run(engine, frames, warmup, timed))
    result = {"bundle": str(bundle.path), "model": bundle.manifest["model"]["family"],
              "target": bundle.target["name"], "machine": where, "hop_ms": HOP_SECONDS * 1e3,
              **({"note": "EMULATED: the board ran under qemu; these are not board timings"} if where["emulated"]
                 else {}),
              "input": f"standard normal frames and silence (zeros), alternating every {SILENCE_CALLS} calls, the state carried "
                       "from a fresh stream; warm-up calls are timed too (call_us) but left out of the statistics",
              "timing": {e: TIMING[e] for e in engines}, "runs": runs}
    progress("writing the report and plots")
    write_atomic(out / "report.json", (json.dumps(result, indent=1) + "\n").encode())
    result["plots"] = _plots(runs, out)
    write_atomic(out / "report.md", markdown(result).encode())
    return result


def _output_dir(out: Path, force: bool) -> Path:
    """A new or empty directory, or (with force) one holding only an earlier report: nothing else is replaced."""
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} exists and is not a directory", "choose another -o")
    if out.is_dir() and (present := {p.name for p in out.iterdir()}):
        if not force or present - set(FILES):
            raise EdgekitError(f"{out} is not empty" + ("" if present <= set(FILES) else
                                                        " and holds files that are not an edgekit report"),
                               "choose a new -o" + (", or pass --force to replace the report there"
                                                    if present <= set(FILES) else ""))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _native(bundle: Bundle, frames: int, n: int, seed: int, env: dict) -> dict:
    from edgekit.runner import NativeSession

    t0 = time.perf_counter()
    session = NativeSession(bundle, env=env)
    init = time.perf_counter() - t0
    rss = []
    for i, x in enumerate(bench_frames(bundle, frames, n, np.random.default_rng([seed, frames]))):
        session.step(x)
        if i % max(1, n // RSS_SAMPLES) == 0 or i == n - 1:
            rss.append([i, measure.rss_bytes(session.pid)])
    peak = measure.peak_rss_bytes(session.pid)
    session.close()
    return {"call_seconds": [ns / 1e9 for _, ns in session.times], "init_seconds": init, "rss": rss,
            "peak_rss_bytes": peak}


def _python(bundle: Bundle, frames: int, n: int, seed: int, env: dict) -> dict:
    """A Python session timed in a process of its own (`_serve_python`), so that its memory is its own."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {package_parent!r}); from edgekit.report import _serve_python; " \
           "_serve_python()"
    proc = subprocess.run([sys.executable, "-c", code, str(bundle.path.resolve()), str(frames), str(n), str(seed)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise EdgekitError(f"the Python session for {bundle.path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _serve_python() -> None:
    path, frames, n, seed = sys.argv[-4], *map(int, sys.argv[-3:])
    t0 = time.perf_counter()
    bundle = load(Path(path), verify=False)  # the parent checked it; the library is checked again as it loads
    session = LocalSession(bundle)
    init, rss, times = time.perf_counter() - t0, [], []
    for i, x in enumerate(bench_frames(bundle, frames, n, np.random.default_rng([seed, frames]))):
        times += measure.time_calls(session.step, [x], 0)
        if i % max(1, n // RSS_SAMPLES) == 0 or i == n - 1:
            rss.append([i, measure.rss_bytes()])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump({"call_seconds": times, "init_seconds": init, "rss": rss, "peak_rss_bytes": peak,
               "profile": _profile(session, bench_frames(bundle, frames, PROFILE_CALLS, np.random.default_rng(seed)))},
              sys.stdout)


def _profile(session: LocalSession, xs: np.ndarray) -> list[dict]:
    """Top compiled kernels by time over `xs`, the stream carried on, timed through the VM's instrument hook
    (`set_instrument`; TVM 0.27 has no `vm.profile`). The Python hook adds a few microseconds to each timed call,
    so the shares matter more than the times."""
    total, count, started = {}, {}, {}

    def hook(func, name, before, result, *args):
        if before:
            started[name] = time.perf_counter()
            return
        total[name] = total.get(name, 0.0) + time.perf_counter() - started[name]
        count[name] = count.get(name, 0) + 1

    session.vm.raw_function("set_instrument")(hook)
    for x in xs:
        session.step(x)
    for name in [n for n in total if n.startswith("vm.builtin.")]:  # the VM's bookkeeping, not kernels
        del total[name]
    whole = sum(total.values())
    return [{"function": name, "calls_per_step": count[name] / len(xs), "us_per_step": total[name] / len(xs) * 1e6,
             "share": total[name] / whole} for name in sorted(total, key=total.get, reverse=True)[:PROFILE_TOP]]


def _run(engine: str, frames: int, warmup: int, timed: dict) -> dict:
    """One engine at one chunk size: the statistics per frame of the calls after warm-up, as the tools users
    know state them (min, median, mean, p90, p99, p99.9, max, std), init time and first call."""
    seconds = np.asarray(timed["call_seconds"])
    per_frame = seconds[warmup:] / frames * 1e6
    p999 = float(np.percentile(per_frame, 99.9))
    return {"engine": engine, "frames_per_call": frames, "warmup": warmup,
            **measure.summarize(list(seconds[warmup:]), frames, hop=HOP_SECONDS),
            "min_us": float(per_frame.min()), "mean_us": float(per_frame.mean()), "p99_9_us": p999,
            "std_us": float(per_frame.std()), "init_seconds": round(timed["init_seconds"], 4),
            "first_call_us": float(seconds[0] * 1e6), "peak_rss_bytes": int(timed["peak_rss_bytes"]),
            "rss_bytes": timed["rss"], "call_us": [round(float(s) * 1e6, 2) for s in seconds],
            **({"profile": timed["profile"]} if "profile" in timed else {})}


def _plots(runs: list[dict], out: Path) -> list[str]:
    """Latency CDF per engine and chunk, the per-call timeline (warm-up, jitter), resident memory over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = lambda r: f"{r['engine']}, chunk {r['frames_per_call']}"  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        per_frame = np.sort(np.asarray(r["call_us"][r["warmup"]:]) / r["frames_per_call"])
        ax.plot(per_frame, np.arange(1, per_frame.size + 1) / per_frame.size, label=label(r))
    ax.set(xscale="log", xlabel="latency per frame (us, log)", ylabel="fraction of calls", title="latency CDF")
    _save(fig, ax, out / "latency_cdf.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot(np.asarray(r["call_us"]) / r["frames_per_call"], lw=0.6, label=label(r))
    ax.axvline(runs[0]["warmup"], color="grey", ls=":", lw=1)
    ax.set(yscale="log", xlabel="call (dotted: end of warm-up)", ylabel="latency per frame (us, log)",
           title="per-call timeline")
    _save(fig, ax, out / "timeline.png")
    sampled = [r for r in runs if r["rss_bytes"]]  # over RPC only the peak is known
    if not sampled:
        return ["latency_cdf.png", "timeline.png"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in sampled:
        calls, rss = np.asarray(r["rss_bytes"]).T
        ax.plot(calls, rss / 2**20, marker=".", label=label(r))
    ax.set(xlabel="call", ylabel="resident memory (MiB)", title="resident memory over the run", ylim=(0, None))
    _save(fig, ax, out / "memory.png")
    return ["latency_cdf.png", "timeline.png", "memory.png"]


def _save(fig, ax, path: Path) -> None:
    import io

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    fig.clf()
    write_atomic(path, buf.getvalue())


def markdown(report: dict) -> str:
    m = report["machine"]
    rows = [f"| {r['engine']} | {r['frames_per_call']} | {r['calls']} | {r['min_us']:.1f} | {r['p50_us']:.1f} | "
            f"{r['mean_us']:.1f} | {r['p90_us']:.1f} | {r['p99_us']:.1f} | {r['p99_9_us']:.1f} | {r['max_us']:.1f} | "
            f"{r['std_us']:.1f} | {r['real_time_factor']:.4f} | {r['init_seconds'] * 1e3:.0f} | "
            f"{r['first_call_us']:.0f} | {r['peak_rss_bytes'] / 2**20:.1f} |" for r in report["runs"]]
    return "\n".join([
        f"# Latency report: {report['model']} on {report['target']}", "",
        *([f"**{report['note']}**", ""] if "note" in report else []),
        f"Bundle `{report['bundle']}`. Machine" + (f" (over RPC at {m['rpc']})" if "rpc" in m else "") +
        f": {m['cpu']} ({m['arch']}), {m['logical_cpus']} logical CPUs, pinned to "
        f"{len(m['pinned_to_cpus'])}, governor {m['governor'] or 'not readable'}, TVM threads {m['tvm_threads']}, "
        f"Linux {m['kernel']}.", "",
        f"Input: {report['input']}. Warm-up {report['runs'][0]['warmup']} calls. Real-time factor: p50 per frame / "
        f"hop ({report['hop_ms']:g} ms).", "",
        *[f"- {e}: {t}" for e, t in report["timing"].items()], "",
        "Latency per frame (us):", "",
        "| engine | chunk | calls | min | median | mean | p90 | p99 | p99.9 | max | std | RTF | init ms | "
        "first call us | peak RSS MiB |",
        "|" + "---|" * 15, *rows, "",
        *[f"![{p}]({p})" for p in report.get("plots", [])], "",
        *[line for r in report["runs"] if r.get("profile") for line in (
            f"Per-kernel profile, {r['engine']} engine, chunk {r['frames_per_call']} ({PROFILE_CALLS} calls after "
            "the timed ones, through the VM's instrument hook, whose Python callback adds a few us to each call):",
            "", "| kernel | calls per step | us per step | share of kernel time |", "|---|---|---|---|",
            *[f"| {k['function'][:80]} | {k['calls_per_step']:g} | {k['us_per_step']:.1f} | {k['share']:.1%} |"
              for k in r["profile"]], "")]])
