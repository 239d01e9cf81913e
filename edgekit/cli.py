"""`edgekit`: a thin click layer over the pipeline stages; errors print as one clear message, never a traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgekit.errors import EdgekitError

console = Console()
err_console = Console(stderr=True)


class Group(click.Group):
    """Turns edgekit's own errors into a red message and exit code 2, so users never see a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgekit")
def main() -> None:
    """Compile streaming recurrent models from PyTorch to validated edge artifacts.

    \b
    A typical session:
      edgekit models                                        # what can be compiled
      edgekit compile lmuformer --config scv2 -o out/lmu    # checkpoint or config -> bundle
      edgekit validate out/lmu --frames 100000              # stream it against PyTorch
      edgekit bench out/lmu                                 # PyTorch vs ONNX Runtime vs TVM
    """


@main.command()
def models() -> None:
    """List the model families and their named configurations."""
    from edgekit.models import FAMILIES

    table = Table(title="model families")
    for col in ("family", "configs", "description"):
        table.add_column(col)
    for f in FAMILIES.values():
        configs = "\n".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()) for name, cfg in f.configs.items())
        table.add_row(f.name, configs, f.summary)
    console.print(table)


@main.command()
def targets() -> None:
    """List the targets, what each needs, and whether its artifacts run on this machine."""
    from edgekit.targets import targets as all_targets

    table = Table(title="targets")
    for col in ("target", "aliases", "runs", "build tools", "description"):
        table.add_column(col)
    for t in all_targets().values():
        missing = t.missing_tools()
        tools = ", ".join((t.cc, *t.needs)) + (f"\n[red]missing: {', '.join(missing)}[/]\n{t.install}" if missing
                                               else " [green]ok[/]")
        runs = "here" if t.runs_here() else t.runs
        table.add_row(t.name, ", ".join(t.aliases), runs, tools, t.summary)
    console.print(table)


@main.group()
def emulator() -> None:
    """The aarch64 emulation root that runs ARM bundles on an x86_64 machine (under qemu-aarch64)."""


@emulator.command()
@click.option("--cache", type=click.Path(path_type=Path), help="cache directory (default $EDGEKIT_CACHE or ~/.cache/edgekit)")
def setup(cache: Path | None) -> None:
    """Prepare the emulation root once: arm64 Python 3.11, numpy and the TVM runtime (no compiler).

    `edgekit validate` does this on first use of an ARM bundle; run it ahead to pay the cost (about a
    minute and 180 MB) up front.
    """
    from edgekit import emulator as emu

    with console.status("preparing the aarch64 root") as status:
        root = emu.prepare(cache, progress=lambda msg: status.update(msg))
    console.print(f"[green]ready[/] {root}")


@main.command(name="compile")
@click.argument("model")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="trained weights (.pt/.pth); config read off it")
@click.option("--config", help="named configuration with seeded random weights (see `edgekit models`)")
@click.option("--target", "-t", default="host", show_default=True, help="where the artifact runs (`edgekit targets`)")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="bundle directory to create")
@click.option("--chunk", "chunks", type=int, multiple=True, default=(1, 16), show_default=True,
              help="frames per call to build entry points for (1 is always built)")
@click.option("--force", is_flag=True, help="replace an existing bundle at --out")
def compile_cmd(model: str, checkpoint: Path | None, config: str | None, target: str, out: Path,
                chunks: tuple[int, ...], force: bool) -> None:
    """Compile MODEL (a family from `edgekit models`) into a bundle for --target.

    The bundle holds the built library, the ONNX graphs it came from, the weights and a manifest with
    checksums. A failed compile leaves nothing behind.
    """
    from edgekit.compile import compile

    if checkpoint and config:
        raise click.UsageError("pass --checkpoint or --config, not both (a checkpoint carries its own config)")
    with console.status("compiling") as status:
        bundle = compile(model, target, out, config=config, checkpoint=checkpoint, chunks=tuple({1, *chunks}),
                         force=force, progress=lambda msg: status.update(msg))
    m = bundle.manifest
    size = sum((bundle.path / f).stat().st_size for f in m["files"])
    console.print(f"[green]built[/] {bundle.path}: {m['model']['family']} for {m['target']['name']} in "
                  f"{m['compile_seconds']:.1f} s, {size / 2**20:.1f} MiB, state {m['state_bytes']} bytes"
                  + (f", {m['segment']}-byte segments" if m["unit"] == "segment" else f", delay {m['delay']} frames")
                  + f", entries {', '.join(m['entries'])}", highlight=False)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--frames", "-n", type=int, help="stream length in frames  [default: 10000]")
@click.option("--chunk", type=int, default=1, show_default=True, help="frames per call (a size the bundle was built for)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random input stream")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="max abs error allowed per output")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="or max error relative to the output's range")
@click.option("--utterance", type=int, help="split the stream into independent utterances of this many frames")
@click.option("--spike-agreement", type=float, default=0.999, show_default=True,
              help="spiking models: minimum fraction of agreeing spikes per layer")
@click.option("--prediction-agreement", type=float, default=0.999, show_default=True,
              help="spiking models: minimum fraction of frames whose running-mean arg-max agrees")
@click.option("--segments", type=int, help="segment-level LMs (HMT): stream length in segments  [default: 256]")
@click.option("--decode-segments", type=int, default=2, show_default=True,
              help="segment-level LMs: of those, the last ones fed byte by byte (the generation path)")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="segment-level LMs: stream this file's bytes (repeated) instead of random bytes")
def validate(bundle: Path, frames: int | None, chunk: int, seed: int, atol: float, rtol: float,
             utterance: int | None, spike_agreement: float, prediction_agreement: float, segments: int | None,
             decode_segments: int, text: Path | None) -> None:
    """Stream BUNDLE over --frames random frames against the float64 PyTorch reference.

    Reports max abs and relative error per output, error by stream decile (drift), spike agreement and
    sparsity per layer (spiking models), prediction agreement, state bytes and resident memory at T/10 and
    T. Exits 1 if a check fails. The report, with the criteria applied, is saved as validation.json.

    A segment-level LM (`edgekit compile hmt`) streams --segments segments of bytes instead: logits and memory
    embeddings of each segment, and for the last --decode-segments the byte-by-byte logits that generation
    sees, against HMT's algorithm as written in float64.
    """
    from edgekit.validate import validate as run

    with _progress() as bar:
        task = bar.add_task("streaming", total=None)
        report = run(bundle, frames=frames, chunk=chunk, seed=seed, atol=atol, rtol=rtol, utterance=utterance,
                     spike_agreement=spike_agreement, prediction_agreement=prediction_agreement, segments=segments,
                     decode_segments=decode_segments, text=text,
                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    length = (f"{report['segments']} segments = {report['tokens']} bytes, the last {report['decode_segments']} byte "
              "by byte" if "segments" in report else f"{report['frames']} frames, chunk {chunk}")
    table = Table(title=f"validation of {bundle} ({length}, {report['seconds']} s)")
    for col in ("output", "max abs error", "max rel error", "error by decile (first .. last)"):
        table.add_column(col)
    for name, o in report["outputs"].items():
        d = o["error_by_decile"]
        table.add_row(name, f"{o['max_abs_error']:.3g}", f"{o['max_rel_error']:.3g}",
                      " ".join("-" if e is None else f"{e:.1e}" for e in d))
    console.print(table)
    if report.get("spikes"):
        spikes = Table(title="spikes per layer")
        for col in ("layer", "agreement", "sparsity (artifact)", "sparsity (reference)"):
            spikes.add_column(col)
        for name, sp in report["spikes"].items():
            spikes.add_row(name, f"{sp['agreement']:.6f}", f"{sp['sparsity_artifact']:.4f}", f"{sp['sparsity_reference']:.4f}")
        console.print(spikes)
        if "macs" in report:
            m = report["macs"]
            console.print(f"multiply-adds per frame {m['per_frame']:,}; fed by spikes {m['fed_by_spikes']:,}; "
                          f"skippable at this sparsity {m['skippable']:,} ({m['skippable_fraction']:.1%})")
    if "next_byte_agreement" in report:
        console.print(f"next-byte arg-max agreement {report['next_byte_agreement']:.4%}")
    for name, p in report.get("predictions", {}).items():
        console.print(f"prediction agreement ({name} arg-max): " + ", ".join(f"{k} {v:.4%}" for k, v in p.items()))
    console.print(f"ran: {report['execution']}" + (f", runtime start-up {report['runtime_startup_seconds']} s"
                                                   if "runtime_startup_seconds" in report else ""))
    r = report["rss_bytes"]
    mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else "n/a"  # noqa: E731
    console.print(f"state {report['state_bytes']} bytes; artifact process RSS at T/10 {mib(r['at_T/10'])}, at T "
                  f"{mib(r['at_T'])} " + (f"(change {r['growth'] / 2**20:+.2f} MiB)" if r["growth"] is not None
                                          else "(one point: too short a stream to check memory)"))
    for check, ok in report["checks"].items():
        console.print(f"  {'[green]pass[/]' if ok else '[red]FAIL[/]'} {check}")
    console.print(f"report: {Path(report['bundle']) / 'validation.json'}")
    sys.exit(0 if report["passed"] else 1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--calls", type=int, default=300, show_default=True, help="timed frames per engine and chunk size")
@click.option("--warmup", type=int, default=30, show_default=True, help="untimed calls first")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["pytorch", "onnxruntime", "tvm"]),
              default=("pytorch", "onnxruntime", "tvm"), show_default=True)
@click.option("--threads", type=click.IntRange(min=1),
              help="threads for every engine  [default: each engine's own; TVM counts physical cores]")
def bench(bundle: Path, calls: int, warmup: int, engines: tuple[str, ...], threads: int | None) -> None:
    """Per-frame latency of BUNDLE's step in PyTorch, ONNX Runtime and TVM, same inputs, after warm-up.

    `tvm-compute` times the compiled function inside TVM without the Python call: the gap between it
    and `tvm` is call overhead. A segment-level LM (HMT) is timed per byte: its segment step (scoring),
    its decode step, and generation (their mix). Saved as bench.json in the bundle.
    """
    from edgekit.bench import bench as run

    with console.status("benchmarking") as status:
        report = run(bundle, calls=calls, warmup=warmup, engines=engines, threads=threads,
                     progress=lambda m: status.update(m))
    console.print(_segment_bench_table(report) if report.get("unit") == "segment" else _frame_bench_table(report))
    console.print("threads: " + ", ".join(f"{k} {v}" for k, v in report["threads"].items() if k != "requested"))
    console.print(f"report: {Path(report['bundle']) / 'bench.json'}")


def _frame_bench_table(report: dict) -> Table:
    table = Table(title=f"{report['model']} on {report['target']}: latency per frame (hop {report['hop_ms']:g} ms)")
    for col in ("engine", "chunk", "p50 us", "p90 us", "p99 us", "max us", "frames/s", "RTF"):
        table.add_column(col, justify="right" if col != "engine" else "left")
    for r in report["results"]:
        fmt = lambda k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
        table.add_row(r["engine"], str(r["frames_per_call"]), fmt("p50_us") if "p50_us" in r else fmt("mean_us"),
                      fmt("p90_us"), fmt("p99_us"), fmt("max_us"), f"{r['frames_per_second']:.0f}",
                      f"{r['real_time_factor']:.4f}")
    return table


def _segment_bench_table(report: dict) -> Table:
    table = Table(title=f"{report['model']} on {report['target']}: latency per byte ({report['segment']}-byte "
                        "segments; generate = the mix generation runs)")
    for col in ("engine", "call", "bytes/call", "p50 us", "p90 us", "p99 us", "max us", "bytes/s"):
        table.add_column(col, justify="right" if col not in ("engine", "call") else "left")
    for r in report["results"]:
        table.add_row(r["engine"], r["call"], str(r["bytes_per_call"]),
                      *(f"{r[k]:.1f}" for k in ("p50_us", "p90_us", "p99_us", "max_us")), f"{r['bytes_per_second']:.0f}")
    return table


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def info(bundle: Path) -> None:
    """Verify BUNDLE's checksums and print its manifest."""
    from edgekit.artifact import load

    console.print_json(json.dumps(load(bundle, check_machine=False).manifest))


@main.command()
@click.option("--wav", type=click.Path(path_type=Path), help="16 kHz WAV file to stream")
@click.option("--mic", is_flag=True, help="stream the default microphone instead (needs the sounddevice package)")
@click.option("--bundle", type=click.Path(path_type=Path), help="a compiled LMUFormer bundle (default: the demo model)")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="an LMUFormer checkpoint (e.g. a public SCv2 one), compiled for this host on first use")
@click.option("--labels", help="class names in model order, comma-separated (when the model does not say)")
@click.option("--hop", type=int, default=14, show_default=True, help="frames between window starts (10 ms each)")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="keyword probability to detect (0.5: chosen on the demo's validation streams)")
@click.option("--repeat", type=int, default=1, show_default=True, help="play the WAV this many times (a long stream)")
def stream(wav: Path | None, mic: bool, bundle: Path | None, checkpoint: Path | None, labels: str | None, hop: int,
           threshold: float, repeat: int) -> None:
    """Spot keywords in a WAV file (or the microphone) with a compiled LMUFormer, printing each detection
    as it happens, then the real-time factor and resident memory.

    With no model option it uses the demo keyword spotter shipped with edgekit (yes, no, up, down, left,
    right, on, off, stop, go), compiled for this host on first use and cached under ~/.cache/edgekit
    ($EDGEKIT_CACHE).
    """
    from edgekit.stream import detect, mic_blocks, open_model, wav_blocks

    if bool(wav) == mic:
        raise click.UsageError("pass --wav FILE or --mic")
    with console.status("loading the model") as status:
        b, spec = open_model(bundle, checkpoint, labels.split(",") if labels else None, lambda m: status.update(m))
    source = wav_blocks(wav, repeat) if wav else mic_blocks()
    console.print(f"streaming {wav or 'the microphone'} through {b.path} ({b.manifest['target']['name']}), "
                  f"{spec.clip_frames}-frame windows every {hop} frames; Ctrl-C stops")
    show = lambda d: console.print(f"{d.time:9.2f} s  [bold]{d.label}[/]  {d.confidence:.2f}")  # noqa: E731
    try:
        report = detect(b, spec, source, hop=hop, threshold=threshold, on_detection=show)
    except KeyboardInterrupt:
        return
    rss = " -> ".join(f"{r / 2**20:.1f} MiB at {t:g} s" for t, r in report.rss[:2] + report.rss[2:][-1:])
    console.print(f"{report.detections} detections in {report.audio_seconds:.1f} s of audio; real-time factor "
                  f"{report.rtf:.4f} (CPU time {report.cpu_rtf:.4f}); RSS {rss}")


@main.command(name="compare-kv")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--length", "lengths", type=int, multiple=True, default=(1_000, 10_000, 100_000), show_default=True,
              help="stream lengths (tokens) to measure at")
@click.option("--engine", "engines", multiple=True, default=None,
              type=click.Choice(["pytorch-aaren", "pytorch-kvcache", "onnxruntime-aaren", "onnxruntime-kvcache",
                                 "tvm-aaren", "tvm-kvcache"]), help="engines to run (default: all)")
@click.option("--window", type=int, default=200, show_default=True, help="timed single-token steps per length")
@click.option("--warmup", type=int, default=20, show_default=True, help="untimed steps before them")
@click.option("--threads", type=int, default=1, show_default=True, help="threads per engine")
@click.option("--agreement-tokens", type=int, default=10_000, show_default=True,
              help="tokens for the float64 step/scan/softmax agreement (0: skip)")
def compare_kv(bundle: Path, lengths: tuple[int, ...], engines: tuple[str, ...], window: int, warmup: int,
               threads: int, agreement_tokens: int) -> None:
    """Aaren BUNDLE against the same weights with softmax attention and a KV cache: per-token latency and
    memory at each stream length, per engine (eager PyTorch, ONNX Runtime, TVM), each in its own process.

    Saved in the bundle as kv_compare.json, kv_compare.md (and kv_compare.png with matplotlib).
    """
    from edgekit.kvcompare import ENGINES, compare, markdown

    with console.status("comparing") as status:
        report = compare(bundle, lengths=lengths, engines=engines or ENGINES, window=window, warmup=warmup,
                         threads=threads, agreement_tokens=agreement_tokens, progress=lambda m: status.update(m))
    console.print(markdown(report), markup=False, highlight=False)
    console.print(f"report: {Path(report['bundle']) / 'kv_compare.json'}")


@main.command()
@click.option("--prompt", "-p", default="The ", show_default=True, help="text to continue (UTF-8, as bytes)")
@click.option("--tokens", "-n", type=int, default=200, show_default=True, help="bytes to generate")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 picks the most likely byte")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="HMT weights (default: the shipped models/checkpoints/hmt_small.pt)")
@click.option("--config", help="a named HMT config with seeded random weights instead (see `edgekit models`)")
@click.option("--engine", type=click.Choice(["tvm", "pytorch"]), default="tvm", show_default=True,
              help="tvm: the model compiled for this host (built on first use, cached); pytorch: eager")
@click.option("--bundle", type=click.Path(path_type=Path),
              help="a bundle made by `edgekit compile hmt` to run instead")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
def generate(prompt: str, tokens: int, temperature: float, checkpoint: Path | None, config: str | None, engine: str,
             bundle: Path | None, seed: int) -> None:
    """Continue --prompt with a hierarchical-memory byte LM (HMT), byte by byte, in bounded memory.

    Inside a segment the decode step extends a KV cache of at most one segment; at each segment boundary the
    segment step folds the segment into the memory (N embeddings, k sensory bytes), so any length runs in
    the same memory. Prints the text as it comes, then bytes per second, state bytes and resident memory.
    """
    import codecs
    import time

    import numpy as np
    import torch

    from edgekit.hmt_runtime import Generator, host_bundle, load_engine, rss_bytes
    from edgekit.models import hmt

    if checkpoint and config:
        raise click.UsageError("pass --checkpoint or --config, not both (a checkpoint carries its own config)")
    if bundle and (checkpoint or config):
        raise click.UsageError("pass --bundle or --checkpoint/--config, not both (a bundle holds its weights)")
    if tokens < 0 or temperature < 0:
        raise click.UsageError("--tokens and --temperature must not be negative")
    if not prompt:
        raise click.UsageError("--prompt must hold at least one character")
    torch.set_num_threads(1)
    if config is None and checkpoint is None and bundle is None:
        checkpoint = hmt.DEFAULT_CHECKPOINT
        if not checkpoint.is_file():
            raise EdgekitError(f"the shipped checkpoint {checkpoint} is missing",
                               "pass --checkpoint PATH or --config small (random weights)")
    with err_console.status("loading") as status:
        if bundle is not None or engine == "tvm":
            eng = load_engine(bundle if bundle is not None else
                              host_bundle(checkpoint, config, progress=lambda m: status.update(m)))
            state_bytes = eng.state_bytes
        else:
            model = hmt.build(config, checkpoint)
            eng = hmt.TorchEngine(model)
            state_bytes = model.state_bytes()
    gen = Generator(eng)
    data = prompt.encode()
    t0 = time.perf_counter()
    gen.prefill(data)
    t1 = time.perf_counter()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    rng = np.random.default_rng(seed)
    for _ in range(tokens):
        t = gen.sample(temperature, rng)
        sys.stdout.write(decoder.decode(bytes([t])))
        sys.stdout.flush()
        gen.feed(t)
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    source = "bundle" if bundle else engine
    err_console.print(f"[dim]{source}: prompt {len(data)} bytes in {t1 - t0:.2f} s, generated {tokens} bytes at "
                      f"{tokens / max(t2 - t1, 1e-9):.1f} bytes/s ({gen.calls['segment']} segment, "
                      f"{gen.calls['decode']} decode calls); state {state_bytes} bytes between segments; "
                      f"RSS {rss_bytes() / 2**20:.0f} MiB[/]", highlight=False)
