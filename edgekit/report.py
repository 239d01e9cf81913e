"""Report stage: a bundle's latency where it runs, as a trtexec / benchmark_model / onnxruntime_perf_test user
expects it: per engine (a Python session, the native runner) and call, every call timed over a carried, realistic
state, warm-up and N stated, min/median/mean/p90/p99/p99.9/max/std, init time and first call, peak resident memory
and memory over the run, and the machine it ran on. Writes DIR/report.json, DIR/report.md and PNG plots.

The calls are the unit's natural ones, read off the manifest's entries: a frame bundle's chunk sizes (random frames
and stretches of silence, as `edgekit bench` streams them; latency per frame, real-time factor), a segment
bundle's segment step over whole segments (latency per segment) and bytes fed one at a time as generation feeds
them (latency per token); a memory bundle first fetches one document's block.

Each engine runs in its own process, so its memory is its own: the native runner (`edgekit-run --serve`, timed
inside it around the compiled calls) and a Python session (a child Python, timed around the session's call).
Bundles for another machine are refused: emulated timings are not board timings."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit import measure, remote, units
from edgekit.artifact import Bundle, load, write_atomic
from edgekit.errors import BundleError, EdgekitError
from edgekit.measure import TokenSource
from edgekit.remote import machine
from edgekit.units.frame import HOP_SECONDS, SILENCE_CALLS, bench_frames, chunk_sizes

ENGINES = ("python", "native")  # engines on this machine; "rpc" times a board
FILES = ("report.json", "report.md", "latency_cdf.png", "timeline.png", "memory.png")
RSS_SAMPLES = 20  # resident memory is read this many times along each run
PROFILE_CALLS, PROFILE_TOP = 100, 12  # calls profiled per kernel after the timed run, kernels listed
TIMING = {"python": "a Python session's call (frames: step, with the input check, the copy into the aligned input "
                    "buffer, the compiled call and output views; segments: score or feed), perf_counter around each "
                    "call, in a process of its own",
          "native": "the compiled entries called by edgekit-run (C++, input already in its buffers), steady_clock "
                    "around each compiled call, in the runner's own process",
          "rpc": "the compiled entry on the board, timed there by TVM's time evaluator around one invoke_stateful "
                 "(number=1, repeat=1; the evaluator calls it once untimed first), the state carried on the board; "
                 "peak RSS: the board's RPC session process (TVM's Python server included)"}
Progress = Callable[[str], None]
SEGMENT_INPUT = ("uniform random bytes, numpy default_rng([seed, block]) per 4096-byte block, the state carried from a "
                 "fresh stream: `segment` scores one whole segment per call (the segment step); `feed` feeds one byte "
                 "per call as generation does (the segment step over the partial segment for its first `summary` "
                 "bytes and at its end, the decode step otherwise); warm-up calls are timed too (call_us) but left "
                 "out of the statistics")


@dataclass(frozen=True)
class Workload:
    """One kind of call a report times: the session operation `op` on inputs of `per_call` items (frames), or on
    one `item` (a segment, a token) of `tokens` tokens."""

    call: str
    op: str
    item: str
    per_call: int = 1
    tokens: int = 0

    def inputs(self, bundle: Bundle, n: int, seed: int) -> np.ndarray:
        """The inputs of n calls: frames as `edgekit bench` streams them, or one byte stream's tokens."""
        if self.item == "frame":
            return bench_frames(bundle, self.per_call, n, np.random.default_rng([seed, self.per_call]))
        return TokenSource(seed).tokens(0, n * self.tokens).reshape(n, self.tokens)


def workloads(bundle: Bundle) -> list[Workload]:
    """The calls of a bundle, from its manifest's entries: per chunk size for frame entries; a segment step and
    bytes fed one by one for token entries (a segment LM)."""
    entries = bundle.manifest["entries"]
    if any(e["frames"] for e in entries.values()):
        return [Workload(name, "step", "frame", e["frames"]) for name, e in
                sorted(entries.items(), key=lambda kv: kv[1]["frames"]) if e["frames"]]
    return [Workload("segment", "score", "segment", tokens=bundle.manifest["segment"]),
            Workload("feed", "feed", "token", tokens=1)]


def report(bundle_path: Path, out: Path, engines: tuple[str, ...] = ENGINES, calls: int = 1000, warmup: int = 100,
           seed: int = 0, threads: int | None = None, force: bool = False, rpc: str | None = None,
           progress: Progress = lambda msg: None) -> dict:
    """Time every call of the bundle (`workloads`) with each engine; write report.json, report.md and plots into
    `out`. With `rpc` (HOST:PORT of an `edgekit serve` on a board), a frame bundle is timed there instead (engine
    "rpc")."""
    from edgekit import runner

    if unknown := set(engines) - set(ENGINES):
        raise EdgekitError(f"unknown engine(s) {', '.join(sorted(unknown))}", f"choose from {', '.join(ENGINES)}")
    bundle = load(bundle_path, check_machine=rpc is None)  # here, another machine's bundle is refused: no
    engines = ("rpc",) if rpc else engines                  # emulated timings; over RPC, the board runs it
    if bundle.device != "cpu":
        raise BundleError(f"{bundle.path}: reports time bundles on CPUs", "use `edgekit bench` for this bundle")
    calls_of = workloads(bundle)
    if rpc and calls_of[0].item != "frame":
        raise BundleError(f"{bundle.path}: reports over RPC time frame bundles",
                          "run `edgekit report` on the board itself (a runtime install) for this bundle")
    if "native" in engines:
        runner.check_unit(bundle)
        if "runner" not in bundle.manifest:
            raise BundleError(f"{bundle.path} has no native runner", f"build it in: edgekit runner {bundle.path}")
    if calls < 1 or warmup < 0:
        raise EdgekitError("need --calls >= 1 and --warmup >= 0")
    out = _output_dir(Path(out), force)
    env = {**os.environ, **({"TVM_NUM_THREADS": str(threads)} if threads else {})}
    runs, where = [], machine(threads)
    if rpc:
        timed_there = remote.time_calls(bundle, rpc, chunk_sizes(bundle), calls + warmup, seed, progress)
        for work in calls_of:
            runs.append(_run("rpc", work, warmup, timed_there[work.per_call]))
            where = {**timed_there[work.per_call]["machine"], "rpc": rpc}
    for engine in (e for e in engines if e != "rpc"):
        for index, work in enumerate(calls_of):
            progress(f"{engine}, {work.call}: {warmup} + {calls} calls")
            timed = (_native if engine == "native" else _python)(bundle, index, calls + warmup, seed, env)
            runs.append(_run(engine, work, warmup, timed))
    frames = calls_of[0].item == "frame"
    result = {"bundle": str(bundle.path), "model": bundle.manifest["model"]["family"],
              "target": bundle.target["name"], "unit": bundle.manifest["unit"], "machine": where,
              **({"hop_ms": HOP_SECONDS * 1e3} if frames else {"segment": bundle.manifest["segment"],
                                                              "summary": bundle.manifest["summary"]}),
              **({"note": "EMULATED: the board ran under qemu; these are not board timings"} if where["emulated"]
                 else {}),
              "input": f"standard normal frames and silence (zeros), alternating every {SILENCE_CALLS} calls, the "
                       "state carried from a fresh stream; warm-up calls are timed too (call_us) but left out of the "
                       "statistics" if frames else SEGMENT_INPUT,
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


def _native(bundle: Bundle, index: int, n: int, seed: int, env: dict) -> dict:
    """The native runner: each call's time is that of the compiled calls it made, timed inside the runner."""
    from edgekit import runner

    work = workloads(bundle)[index]
    t0 = time.perf_counter()
    session = _started(runner.session(bundle, env=env), bundle, seed)
    init, rss, seconds, log = time.perf_counter() - t0, [], [], session.worker.times
    for i, x in enumerate(work.inputs(bundle, n, seed)):
        before = len(log)
        getattr(session, work.op)(x)
        seconds.append(sum(ns for _, _, ns in log[before:]) / 1e9)
        if i % max(1, n // RSS_SAMPLES) == 0 or i == n - 1:
            rss.append([i, measure.rss_bytes(session.pid)])
    peak = measure.peak_rss_bytes(session.pid)
    session.worker.close()
    return {"call_seconds": seconds, "init_seconds": init, "rss": rss, "peak_rss_bytes": peak}


def _python(bundle: Bundle, index: int, n: int, seed: int, env: dict) -> dict:
    """A Python session timed in a process of its own (`_serve_python`), so that its memory is its own."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {package_parent!r}); from edgekit.report import _serve_python; " \
           "_serve_python()"
    proc = subprocess.run([sys.executable, "-c", code, str(bundle.path.resolve()), str(index), str(n), str(seed)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise EdgekitError(f"the Python session for {bundle.path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _serve_python() -> None:
    path, index, n, seed = sys.argv[-4], *map(int, sys.argv[-3:])
    t0 = time.perf_counter()
    bundle = load(Path(path), verify=False)  # the parent checked it; the library is checked again as it loads
    work = workloads(bundle)[index]
    session = _started(units.of(bundle).session(bundle), bundle, seed)
    init, rss, times = time.perf_counter() - t0, [], []
    for i, x in enumerate(work.inputs(bundle, n, seed)):
        times += measure.time_calls(getattr(session, work.op), [x], 0)
        if i % max(1, n // RSS_SAMPLES) == 0 or i == n - 1:
            rss.append([i, measure.rss_bytes()])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vm = session.vm if work.item == "frame" else session.engine.vm  # a segment session's engine holds its VM
    json.dump({"call_seconds": times, "init_seconds": init, "rss": rss, "peak_rss_bytes": peak,
               "profile": _profile(vm, getattr(session, work.op), work.inputs(bundle, PROFILE_CALLS, seed + 1))},
              sys.stdout)


def _started(session, bundle: Bundle, seed: int):
    """The session ready for its calls: a memory bundle's session first fetches one document's block."""
    if bundle.manifest.get("fetched"):
        session.fetch(TokenSource(seed).tokens(0, 4 * bundle.manifest["segment"]))
    return session


def _profile(vm, call: Callable[[np.ndarray], object], xs: np.ndarray) -> list[dict]:
    """Top compiled kernels by time over calls of `call` on `xs`, the stream carried on, timed through the VM's
    instrument hook (`set_instrument`; TVM 0.27 has no `vm.profile`). The Python hook adds a few microseconds to
    each timed call, so the shares matter more than the times."""
    total, count, started = {}, {}, {}

    def hook(func, name, before, result, *args):
        if before:
            started[name] = time.perf_counter()
            return
        total[name] = total.get(name, 0.0) + time.perf_counter() - started[name]
        count[name] = count.get(name, 0) + 1

    vm.raw_function("set_instrument")(hook)
    for x in xs:
        call(x)
    for name in [n for n in total if n.startswith("vm.builtin.")]:  # the VM's bookkeeping, not kernels
        del total[name]
    whole = sum(total.values())
    return [{"function": name, "calls_per_step": count[name] / len(xs), "us_per_step": total[name] / len(xs) * 1e6,
             "share": total[name] / whole} for name in sorted(total, key=total.get, reverse=True)[:PROFILE_TOP]]


def _run(engine: str, work: Workload, warmup: int, timed: dict) -> dict:
    """One engine on one kind of call: the statistics per item (frame, segment or token) of the calls after
    warm-up, as the tools users know state them (min, median, mean, p90, p99, p99.9, max, std), init time and
    first call."""
    seconds = np.asarray(timed["call_seconds"])
    per_item = seconds[warmup:] / work.per_call * 1e6
    p999 = float(np.percentile(per_item, 99.9))
    return {"engine": engine, "call": work.call, "latency_per": work.item, "warmup": warmup,
            **measure.summarize(list(seconds[warmup:]), work.per_call, work.item,
                                hop=HOP_SECONDS if work.item == "frame" else None),
            **({"tokens_per_call": work.tokens} if work.tokens else {}),
            "min_us": float(per_item.min()), "mean_us": float(per_item.mean()), "p99_9_us": p999,
            "std_us": float(per_item.std()), "init_seconds": round(timed["init_seconds"], 4),
            "first_call_us": float(seconds[0] * 1e6), "peak_rss_bytes": int(timed["peak_rss_bytes"]),
            "rss_bytes": timed["rss"], "call_us": [round(float(s) * 1e6, 2) for s in seconds],
            **({"profile": timed["profile"]} if "profile" in timed else {})}


def _plots(runs: list[dict], out: Path) -> list[str]:
    """Latency CDF per engine and call, the per-call timeline (warm-up, jitter), resident memory over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = lambda r: f"{r['engine']}, {r['call']}"  # noqa: E731
    per_item = lambda r: np.asarray(r["call_us"]) / r[f"{r['latency_per']}s_per_call"]  # noqa: E731
    per = f"latency per {' or '.join(sorted({r['latency_per'] for r in runs}))} (us, log)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        latency = np.sort(per_item(r)[r["warmup"]:])
        ax.plot(latency, np.arange(1, latency.size + 1) / latency.size, label=label(r))
    ax.set(xscale="log", xlabel=per, ylabel="fraction of calls", title="latency CDF")
    _save(fig, ax, out / "latency_cdf.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot(per_item(r), lw=0.6, label=label(r))
    ax.axvline(runs[0]["warmup"], color="grey", ls=":", lw=1)
    ax.set(yscale="log", xlabel="call (dotted: end of warm-up)", ylabel=per, title="per-call timeline")
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
    m, frames = report["machine"], "hop_ms" in report
    rows = [f"| {r['engine']} | {_call(r)} | {r['calls']} | " + " | ".join(
        f"{r[k]:.1f}" for k in ("min_us", "p50_us", "mean_us", "p90_us", "p99_us", "p99_9_us", "max_us", "std_us")) +
        (f" | {r['real_time_factor']:.4f}" if frames else "") +
        f" | {r['init_seconds'] * 1e3:.0f} | {r['first_call_us']:.0f} | {r['peak_rss_bytes'] / 2**20:.1f} |"
        for r in report["runs"]]
    columns = ["engine", "call", "calls", "min", "median", "mean", "p90", "p99", "p99.9", "max", "std",
               *(["RTF"] if frames else []), "init ms", "first call us", "peak RSS MiB"]
    return "\n".join([
        f"# Latency report: {report['model']} on {report['target']}", "",
        *([f"**{report['note']}**", ""] if "note" in report else []),
        f"Bundle `{report['bundle']}`. Machine" + (f" (over RPC at {m['rpc']})" if "rpc" in m else "") +
        f": {m['cpu']} ({m['arch']}), {m['logical_cpus']} logical CPUs, pinned to "
        f"{len(m['pinned_to_cpus'])}, governor {m['governor'] or 'not readable'}, TVM threads {m['tvm_threads']}, "
        f"Linux {m['kernel']}.", "",
        f"Input: {report['input']}. Warm-up {report['runs'][0]['warmup']} calls." +
        (f" Real-time factor: p50 per frame / hop ({report['hop_ms']:g} ms)." if frames else ""), "",
        *[f"- {e}: {t}" for e, t in report["timing"].items()], "",
        "Latency per frame (us):" if frames else
        f"Latency per call (us): a segment ({report['segment']} tokens) per segment call, one token per feed call:", "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows, "",
        *[f"![{p}]({p})" for p in report.get("plots", [])], "",
        *[line for r in report["runs"] if r.get("profile") for line in (
            f"Per-kernel profile, {r['engine']} engine, {_call(r)} ({PROFILE_CALLS} calls after "
            "the timed ones, through the VM's instrument hook, whose Python callback adds a few us to each call):",
            "", "| kernel | calls per call | us per call | share of kernel time |", "|---|---|---|---|",
            *[f"| {k['function'][:80]} | {k['calls_per_step']:g} | {k['us_per_step']:.1f} | {k['share']:.1%} |"
              for k in r["profile"]], "")]])


def _call(run: dict) -> str:
    """A run's call as the table names it: `chunk4 (4 frames)`, `segment (8 tokens)`, `feed (1 token)`."""
    items = run.get("frames_per_call")
    unit, n = ("frame", items) if items else ("token", run["tokens_per_call"])
    return f"{run['call']} ({n} {unit}{'s' * (n != 1)})"
