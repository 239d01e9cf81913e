"""`edgekit`: a thin click layer over the pipeline stages; errors print as one clear message, never a traceback.

Results go to stdout (tables never cut when piped, or one JSON object with --json); progress goes to stderr: a
spinner on a terminal, else one line per stage."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import click
from rich.console import Console
from rich.table import Table

from edgekit import artifact
from edgekit.errors import EdgekitError
from edgekit.units import frame, memory, segment

FRAME, SEGMENT, MEMORY = frame.ValidateOptions(), segment.ValidateOptions(), memory.ValidateOptions()  # help defaults


def _console(stderr: bool = False) -> Console:
    """On a terminal, rich's own width; piped, wide enough that no table or line is ever cut or wrapped."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, width=None if tty else 100_000, soft_wrap=not tty)


console = _console()
err_console = _console(stderr=True)


@contextmanager
def stages(what: str) -> Iterator[Callable[[str], None]]:
    """Progress of long work: a spinner on a terminal, else one timestamped line per stage on stderr."""
    if err_console.is_terminal:
        with err_console.status(what) as status:
            yield lambda msg: status.update(msg)
        return
    t0 = time.perf_counter()
    say = lambda msg: err_console.print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", highlight=False,  # noqa: E731
                                        markup=False)
    say(what)
    yield say


@contextmanager
def counter(what: str) -> Iterator[Callable[[int, int], None]]:
    """Progress through a stream of items: a bar on a terminal, else a line at every tenth of it."""
    if err_console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err_console, transient=True) as bar:
            task = bar.add_task(what, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    with stages(what) as say:
        shown = [-1]

        def update(done: int, total: int) -> None:
            tenth = done * 10 // max(total, 1)
            if tenth > shown[0]:
                shown[0] = tenth
                say(f"{what}: {done}/{total}")

        yield update


def _print(renderables: list) -> None:
    for r in renderables:
        console.print(r, highlight=False)


def _interrupted(signum: int, frame) -> None:
    """Ctrl-C or SIGTERM. During a build the staging folders go and the process ends at once: an exception raised
    inside torch's or TVM's native frames can crash the process or be swallowed there. Elsewhere Ctrl-C is a
    KeyboardInterrupt (a stream prints its summary) and SIGTERM an exit."""
    if artifact.abandon_stages():
        err_console.print("interrupted; nothing was written", highlight=False)
        sys.stderr.flush()
        os._exit(128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


class Group(click.Group):
    """Turns edgekit's own errors into a red message and exit code 2, so users never see a traceback."""

    def invoke(self, ctx: click.Context):
        signal.signal(signal.SIGINT, _interrupted)
        signal.signal(signal.SIGTERM, _interrupted)
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted; nothing was written", highlight=False)
            sys.exit(130)


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
    for col in ("family", "unit", "configs", "description"):
        table.add_column(col)
    for f in FAMILIES.values():
        configs = "\n".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in cfg.items())
                            for name, cfg in f.configs.items())
        table.add_row(f.name, f.unit, configs, f.summary)
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
@click.option("--cache", type=click.Path(path_type=Path),
              help="cache directory (default $EDGEKIT_CACHE or ~/.cache/edgekit)")
def setup(cache: Path | None) -> None:
    """Prepare the emulation root once: arm64 Python 3.11, numpy and the TVM runtime (no compiler).

    `edgekit validate` does this on first use of an ARM bundle; run it ahead to pay the cost (about a
    minute and 180 MB) up front.
    """
    from edgekit import emulator as emu

    with stages("preparing the aarch64 root") as say:
        root = emu.prepare(cache, progress=say)
    console.print(f"[green]ready[/] {root}")


def _given(**flags) -> dict:
    """The options a user gave (flags without a default are None when not given)."""
    return {k: v for k, v in flags.items() if v is not None}


@main.command(name="compile")
@click.argument("model")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="trained weights (.pt/.pth); config read off it")
@click.option("--config", help="named configuration with seeded random weights (see `edgekit models`)")
@click.option("--target", "-t", default="host", show_default=True, help="where the artifact runs (`edgekit targets`)")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="bundle directory to create")
@click.option("--chunk", "chunks", type=int, multiple=True,
              help=f"frame models: frames per call to build entry points for (1 is always built)  "
                   f"[default: {', '.join(map(str, frame.ExportOptions.chunks))}]")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="int8: weights int8 per output channel, activations int8 per row at run time, int32 dot products "
                   "on the target's instructions (AVX-512 VNNI, AVX-512BW or AVX2 without it, Arm sdot); recurrences, "
                   "norms and softmax stay fp32")
@click.option("--force", is_flag=True, help="replace an existing bundle at --out")
@click.option("--runner", "with_runner", is_flag=True,
              help="also build the native runner edgekit-run into the bundle (as `edgekit runner` does)")
def compile_cmd(model: str, checkpoint: Path | None, config: str | None, target: str, out: Path,
                chunks: tuple[int, ...], quantize: str, force: bool, with_runner: bool) -> None:
    """Compile MODEL (a family from `edgekit models`) into a bundle for --target.

    The bundle holds the built library, the ONNX graphs it came from, the weights, a golden record (float64; for
    --quantize int8 the quantized model's) and a manifest with checksums. A failed compile leaves nothing behind.
    """
    from edgekit import units
    from edgekit.compile import compile

    if checkpoint and config:
        raise click.UsageError("pass --checkpoint or --config, not both (a checkpoint carries its own config)")
    with stages(f"compiling {model} for {target}") as say:
        bundle = compile(model, target, out, config=config, checkpoint=checkpoint, quantize=quantize, force=force,
                         progress=say, **_given(chunks=tuple({1, *chunks}) if chunks else None))
        if with_runner:
            from edgekit.runner import add_runner

            bundle = add_runner(bundle.path, progress=say)
    m = bundle.manifest
    size = sum((bundle.path / f).stat().st_size for f in m["files"])
    console.print(f"[green]built[/] {bundle.path}: {m['model']['family']} for {m['target']['name']} in "
                  f"{m['compile_seconds']:.1f} s, {size / 2**20:.1f} MiB, {m['precision']}"
                  + (f" ({m['quantization']['isa']})" if m["quantization"] else "")
                  + f", state {m['state_bytes']} bytes, "
                  f"{units.of(bundle).describe(m)}, entries {', '.join(m['entries'])}", highlight=False)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--frames", "-n", type=int, help=f"frame models: stream length in frames  [default: {FRAME.frames}]")
@click.option("--chunk", type=int,
              help=f"frame models: frames per call (a size the bundle was built for)  [default: {FRAME.chunk}]")
@click.option("--utterance", type=int, help="frame models: split the stream into independent utterances of N frames")
@click.option("--spike-agreement", type=float,
              help=f"spiking models: minimum fraction of agreeing spikes per layer  [default: {FRAME.spike_agreement}]")
@click.option("--prediction-agreement", type=float,
              help="spiking models: minimum fraction of frames whose running-mean arg-max agrees  "
                   f"[default: {FRAME.prediction_agreement}]")
@click.option("--segments", type=int, help=f"segment LMs: stream length in segments  [default: {SEGMENT.segments}]")
@click.option("--decode-segments", type=int,
              help="segment LMs: of those, the last ones fed byte by byte (the generation path)  "
                   f"[default: {SEGMENT.decode_segments}]")
@click.option("--documents", type=int,
              help=f"memory-bank LMs: documents in the stream, each fetching its block  [default: {MEMORY.documents}]")
@click.option("--document-segments", type=int,
              help=f"memory-bank LMs: segments per document  [default: {MEMORY.document_segments}]")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="segment LMs: stream this file's bytes (repeated) instead of random bytes")
@click.option("--seed", type=int, help=f"seed of the random input stream  [default: {FRAME.seed}]")
@click.option("--atol", type=float, help=f"max abs error allowed per output  [default: {FRAME.atol:g}]")
@click.option("--rtol", type=float, help=f"or max error relative to the output's range  [default: {FRAME.rtol:g}]")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object instead of tables")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write the report here  [default: BUNDLE/validation.json]")
@click.option("--runner", type=click.Choice(["python", "native"]), default="python", show_default=True,
              help="stream through a Python session, or the bundle's native runner (`edgekit runner`; ARM bundles "
                   "under qemu-aarch64 here; frame and segment models)")
def validate(bundle: Path, as_json: bool, report_path: Path | None, runner: str, **flags) -> None:
    """Stream BUNDLE against the float64 PyTorch model it was compiled from (without torch: the golden record
    compiled into it).

    A frame model streams --frames random frames: max abs and relative error per output, error by stream decile
    (drift), spike agreement and sparsity per layer (spiking models), prediction agreement. A segment-level LM
    (`edgekit compile hmt`) streams --segments segments of bytes: logits and memory embeddings of each segment,
    and for the last --decode-segments the byte-by-byte logits that generation sees; an LM over a memory bank
    (`edgekit compile memlm`) streams --documents documents, each first retrieving and fetching its block: the
    retrieved paths must be the reference's. All: state bytes and the
    artifact process's resident memory at T/10 and T. Exits 1 if a check fails. Saved as validation.json.
    """
    from edgekit import units
    from edgekit.artifact import load
    from edgekit.validate import validate as run

    unit = units.of(load(bundle, check_machine=False))
    options = unit.validate_options(**_given(**flags))
    with counter("streaming") as progress:
        report = run(bundle, options, progress=progress, report_path=report_path, runner=runner)
    if as_json:
        click.echo(json.dumps(report))
    else:
        _print(unit.render_validation(report))
    sys.exit(0 if report["passed"] else 1)


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--calls", type=click.IntRange(min=1), default=300, show_default=True,
              help="timed frames (or decode steps) per engine and chunk size")
@click.option("--warmup", type=click.IntRange(min=0), default=30, show_default=True, help="untimed calls first")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["pytorch", "onnxruntime", "tvm"]),
              default=("pytorch", "onnxruntime", "tvm"), show_default=True)
@click.option("--threads", type=click.IntRange(min=1),
              help="threads for every engine  [default: each engine's own; TVM counts physical cores]")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object instead of a table")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write the report here  [default: BUNDLE/bench.json]")
def bench(bundles: tuple[Path, ...], calls: int, warmup: int, engines: tuple[str, ...], threads: int | None,
          as_json: bool, report_path: Path | None) -> None:
    """Latency of BUNDLES in PyTorch, ONNX Runtime and TVM, same inputs, after warm-up.

    Several bundles (`edgekit bench out/lmu out/lmu-int8`) are timed in interleaved rounds, so that an fp32 and
    an int8 build compare on the same machine state, with each one's p50 ratio to the first bundle's. ONNX Runtime
    runs each bundle's own ONNX graphs: for an int8 bundle, its integer products (MatMulInteger).

    A frame model is timed per frame for each chunk size; `tvm-compute` times the compiled entry alone, taking
    turns with the `tvm` session's step over one carried state, and the session's row states what the session
    adds per call (`session_overhead_us`, the p50 of their paired difference). A segment-level LM (HMT) is timed
    per byte: its segment step (scoring), its decode step, and generation (their mix). Saved as bench.json in the
    bundle.
    """
    from edgekit import units
    from edgekit.bench import bench as run
    from edgekit.units import BenchOptions

    options = BenchOptions(calls=calls, warmup=warmup, engines=engines, threads=threads)
    with stages("benchmarking") as say:
        report = run(list(bundles), options, progress=say, report_path=report_path)
    if as_json:
        click.echo(json.dumps(report))
    else:
        from edgekit.artifact import load

        _print(units.of(load(bundles[0], check_machine=False)).render_bench(report))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="directory for report.json, report.md and the PNG plots (new or empty)")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["python", "native"]),
              default=("python", "native"), show_default=True,
              help="python: a Python session; native: the bundle's runner (`edgekit runner BUNDLE` builds it)")
@click.option("--calls", type=click.IntRange(min=1), default=1000, show_default=True,
              help="timed calls per engine and chunk size")
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True,
              help="calls before them (timed, plotted, left out of the statistics)")
@click.option("--threads", type=click.IntRange(min=1), help="TVM threads  [default: one per physical core]")
@click.option("--force", is_flag=True, help="replace an earlier report in --out")
@click.option("--rpc", metavar="HOST:PORT", help="time the bundle on a board running `edgekit serve` instead")
@click.option("--json", "as_json", is_flag=True, help="print report.json instead of the table")
def report(bundle: Path, out: Path, engines: tuple[str, ...], calls: int, warmup: int, threads: int | None,
           force: bool, rpc: str | None, as_json: bool) -> None:
    """Latency report of BUNDLE on this machine, per engine and call, in the conventions of trtexec and LiteRT's
    benchmark_model.

    \b
    Every call is timed over a carried state, each engine in its own process: a frame model per chunk size (random
    frames and stretches of silence; latency per frame, real-time factor), a segment LM per segment step (whole
    segments) and per byte fed one at a time as generation feeds them. min/median/mean/p90/p99/p99.9/max/std,
    init time, first call, peak resident memory, the machine (CPU, cores, governor, threads, pinning). Writes
    OUT/report.json (`runs`: one entry per engine and call, with every call's time), OUT/report.md and PNG plots:
    latency CDF, per-call timeline, resident memory over the run (a memory-bank LM fetches one document's block
    first). A bundle for another machine is refused (no emulated timings).
      edgekit runner out/lmu && edgekit report out/lmu -o out/lmu-report
    With --rpc, the board runs it (uploaded over TVM RPC) and times every call there:
      edgekit report out/lmu-rpi5 --rpc 192.168.1.20:9090 -o out/rpi5-report   # board: edgekit serve --port 9090
    """
    from edgekit.report import markdown, report as run

    with stages("timing") as say:
        result = run(bundle, out, engines=engines, calls=calls, warmup=warmup, threads=threads, force=force,
                     rpc=rpc, progress=say)
    if as_json:
        click.echo(json.dumps(result))
    else:
        console.print(markdown(result), markup=False, highlight=False)


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="TCP port to listen on (exactly this one)")
@click.option("--host", default="0.0.0.0", show_default=True,
              help="address to listen on (127.0.0.1: this machine only)")
def serve(port: int, host: str) -> None:
    """Serve TVM RPC on this board, so that `edgekit report BUNDLE --rpc THIS-HOST:PORT` on the build machine can
    time bundles here. Needs only the runtime install. Prints `ready on HOST:PORT` once it accepts connections;
    Ctrl-C stops it and every session process it started.
    """
    from edgekit.remote import serve as run

    run(host, port, lambda line: click.echo(line) or sys.stdout.flush())


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def runner(bundle: Path) -> None:
    """Build the native runner `edgekit-run` into BUNDLE (a frame model, a segment LM or a memory-bank LM for a CPU
    target): a C++ program over TVM's runtime, so the board needs no Python.

    \b
    Built with the target's g++ against the TVM runtime and tvm-ffi libraries of the wheels (aarch64 ones for ARM
    targets), which go into BUNDLE/runner/ beside it; all three are listed and checksummed in the manifest. On
    the board (a copy of the whole bundle):
      BUNDLE/runner/edgekit-run BUNDLE --in frames.f32 --out outputs.f32 --chunk 16 --times times.json
    frames: raw float32 [T, batch, features]; outputs float32 per frame; --times: every call's time, load time,
    first output and peak RSS as JSON. It verifies the sha256 of what it loads and refuses NaN/Inf frames.
    A segment LM (HMT) streams a file's bytes instead: whole segments through the segment step, the rest byte by
    byte; outputs: the float32 logits of the next byte after each byte. A memory-bank LM (memlm) first retrieves
    the block of the whole input from its bank (each node read is checked against its sha256).
      BUNDLE/runner/edgekit-run BUNDLE --in text.txt --out logits.f32 --times times.json
      BUNDLE/runner/edgekit-run BUNDLE --in prompt.txt --generate 200     # greedy bytes to stdout
    Here: `edgekit validate BUNDLE --runner native` streams through it (ARM bundles under qemu-aarch64);
    `edgekit compile ... --runner` builds it at compile time.
    """
    from edgekit.runner import add_runner

    with stages(f"adding the native runner to {bundle}") as say:
        b = add_runner(bundle, progress=say)
    size = sum((b.path / f).stat().st_size for f in (b.manifest["runner"]["executable"],
                                                     *b.manifest["runner"]["libraries"]))
    console.print(f"[green]built[/] {b.path / b.manifest['runner']['executable']} ({size / 2**20:.1f} MiB with "
                  f"its runtime libraries; {b.manifest['runner']['compiler']})", highlight=False)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the whole manifest as one JSON object")
@click.option("--device-files", is_flag=True,
              help="print the paths (relative to BUNDLE) of what a board needs, one per line")
def info(bundle: Path, as_json: bool, device_files: bool) -> None:
    """Verify BUNDLE's checksums and describe it (model, target, interface, files, the size of what a board needs).

    A board needs the device payload only: `edgekit info B --device-files | tar -C B -cf - -T - | ssh pi 'mkdir -p
    b && tar -C b -xf -'` copies it (the ONNX graphs and source weights stay here; the copy validates against its
    golden record and runs with the runtime-only `pip install edgekit`).
    """
    from edgekit import units
    from edgekit.artifact import MANIFEST, device_files as device, file_sha256, load, provenance_files

    b = load(bundle, check_machine=False)
    m = b.manifest
    if device_files:
        click.echo("\n".join(device(m)))
        return
    if as_json:
        click.echo(json.dumps(m))
        return
    present = [f for f in m["files"] if (b.path / f).is_file()]
    size = lambda files: sum((b.path / f).stat().st_size for f in files if (b.path / f).is_file())  # noqa: E731
    provenance = provenance_files(m)
    ck = m["model"]["checkpoint"]
    _print([f"{b.path}: every checksum matches ({len(present)} files, {size(present) / 2**20:.1f} MiB)",
            f"device payload {size(device(m)) / 2**20:.2f} MiB (library, manifest, golden record and other runtime "
            f"files: `--device-files` lists them); build provenance {size(provenance) / 2**20:.2f} MiB (ONNX graphs, "
            "source weights)" + ("" if all((b.path / f).is_file() for f in provenance) else ", not in this copy"),
            f"model: {m['model']['family']} " + (f"from {ck['path']} (sha256 {ck['sha256'][:16]}…)" if ck else
                                                  f"config {m['model']['config_name']} (seeded random weights)"),
            f"target: {m['target']['name']} ({m['target']['arch']}, {m['target']['tvm']}); runs {m['target']['runs']}",
            f"streams: {m['unit']} unit, {units.of(b).describe(m)}; state {m['state_bytes']} bytes; precision "
            f"{m['precision']}" + (f" ({m['quantization']['isa']} products)" if m.get("quantization") else "")
            + f"; entries {', '.join(m['entries'])}",
            f"built {m['created']} with " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
            f"manifest sha256 {file_sha256(b.path / MANIFEST)}",
            "`edgekit info --json` prints the whole manifest"])


@main.command()
@click.option("--wav", type=click.Path(path_type=Path),
              help="sound file to stream: WAV at any rate and channel count, 8/16/24/32-bit or float (also FLAC, OGG)")
@click.option("--mic", is_flag=True, help="stream a microphone instead (needs the sounddevice package and PortAudio)")
@click.option("--device",
              help="with --mic: input device name (or part of it) or index; `python -m sounddevice` lists them")
@click.option("--bundle", type=click.Path(path_type=Path), help="a compiled LMUFormer bundle (default: the demo model)")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="an LMUFormer checkpoint (e.g. a public SCv2 one), compiled for this host on first use")
@click.option("--labels", help="class names in model order, comma-separated (when the model does not say)")
@click.option("--hop", type=int, default=14, show_default=True, help="frames between window starts (10 ms each)")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="smoothed keyword probability to detect (chosen on the demo's validation streams)")
@click.option("--smooth", type=click.IntRange(min=1), default=3, show_default=True,
              help="windows the probabilities are averaged over before peak picking")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="play the WAV this many times (a long stream)")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines on stdout: one object per detection, then one {\"summary\": ...}")
def stream(wav: Path | None, mic: bool, device: str | None, bundle: Path | None, checkpoint: Path | None,
           labels: str | None, hop: int, threshold: float, smooth: int, repeat: int, as_json: bool) -> None:
    """Spot keywords in a sound file (or a microphone) with a compiled LMUFormer, printing each detection as
    soon as it is final, then the real-time factor and resident memory (also after Ctrl-C).

    Each detection gives the word's start and end (seconds from the start of the stream: the stretch shared
    by the one-second windows that heard it), the keyword, and its confidence (the keyword's probability
    averaged over --smooth neighbouring windows, 0-1).

    With no model option it uses the demo keyword spotter shipped with edgekit (yes, no, up, down, left,
    right, on, off, stop, go), compiled for this host on first use and cached under ~/.cache/edgekit
    ($EDGEKIT_CACHE).

    \b
    edgekit stream --wav speech.wav                  # any rate, channels, bit depth: converted on the fly
    edgekit stream --mic --device 2                  # live, from input device 2
    edgekit stream --wav speech.wav --json | jq .    # JSON Lines for scripts
    """
    from edgekit.apps.kws import detect, open_mic, open_model, open_wav

    if bool(wav) == mic:
        raise click.UsageError("pass --wav FILE or --mic")
    if device is not None and not mic:
        raise click.UsageError("--device picks a microphone: pass it with --mic")
    about, source = open_wav(wav, repeat) if wav else open_mic(device)
    with stages("loading the model") as say:
        b, spec = open_model(bundle, checkpoint, labels.split(",") if labels else None, say)
    out = err_console if as_json else console
    keywords = ", ".join(x for x in spec.labels if not x.startswith("_"))
    out.print(f"streaming {about}\nthrough {b.path} ({b.manifest['target']['name']}): {keywords}; "
              f"{spec.clip_frames}-frame windows every {hop} frames, smoothed over {smooth}, threshold {threshold}; "
              "Ctrl-C stops", highlight=False, markup=False)
    if not as_json:
        console.print(f"{'start s':>9} {'end s':>9}  {'keyword':<10} confidence", highlight=False)

    def show(d) -> None:
        if as_json:
            print(json.dumps({"label": d.label, "start": d.start, "end": d.end, "confidence": d.confidence}),
                  flush=True)
        else:
            console.print(f"{d.start:9.2f} {d.end:9.2f}  {d.label:<10} {d.confidence:.2f}", highlight=False)

    report = detect(b, spec, source, hop=hop, threshold=threshold, smooth=smooth, on_detection=show)
    if not report.audio_seconds and not report.interrupted:
        raise EdgekitError(f"{wav} holds no audio samples: nothing was streamed", "pass a WAV file with sound in it")
    rss = report.rss[:2] + report.rss[2:][-1:]  # at the start, after the first minute, at the end
    summary = {"audio_seconds": round(report.audio_seconds, 2), "detections": report.detections,
               "real_time_factor": round(report.rtf, 5), "cpu_real_time_factor": round(report.cpu_rtf, 5),
               "rss_mib": [[t, round(r / 2**20, 1)] for t, r in rss], "interrupted": report.interrupted}
    if as_json:
        print(json.dumps({"summary": summary}), flush=True)
        return
    console.print(("interrupted: " if report.interrupted else "") +
                  f"{report.detections} detections in {report.audio_seconds:.1f} s of audio; real-time factor "
                  f"{report.rtf:.4f} (compute time / audio time; CPU time {report.cpu_rtf:.4f}); RSS "
                  + " -> ".join(f"{r / 2**20:.1f} MiB at {t:g} s" for t, r in rss),
                  highlight=False)


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
    from edgekit.apps.kvcompare import ENGINES, compare, markdown

    with stages("comparing") as say:
        report = compare(bundle, lengths=lengths, engines=engines or ENGINES, window=window, warmup=warmup,
                         threads=threads, agreement_tokens=agreement_tokens, progress=say)
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
              help="a bundle made by `edgekit compile hmt` (or memlm) to run instead")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
def generate(prompt: str, tokens: int, temperature: float, checkpoint: Path | None, config: str | None, engine: str,
             bundle: Path | None, seed: int) -> None:
    """Continue --prompt with a hierarchical-memory byte LM (HMT), byte by byte, in bounded memory.

    Inside a segment the decode step extends a KV cache of at most one segment; at each segment boundary the
    segment step folds the segment into the memory (N embeddings, k sensory bytes), so any length runs in
    the same memory. Prints the text as it comes, then bytes per second, state bytes and resident memory.
    """
    import codecs

    from edgekit.apps.textgen import generate as run, open_generator
    from edgekit.measure import rss_bytes

    if checkpoint and config:
        raise click.UsageError("pass --checkpoint or --config, not both (a checkpoint carries its own config)")
    if bundle and (checkpoint or config):
        raise click.UsageError("pass --bundle or --checkpoint/--config, not both (a bundle holds its weights)")
    if tokens < 0 or not temperature >= 0:  # NaN is not >= 0 either
        raise click.UsageError("--tokens and --temperature must be numbers >= 0")
    if not prompt:
        raise click.UsageError("--prompt must hold at least one character")
    with stages("loading") as say:
        gen, state_bytes = open_generator(engine, bundle, checkpoint, config, say)
    data = prompt.encode(errors="surrogateescape")  # bytes that are not UTF-8 reach the model as they are
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(decoder.decode(data))

    def show(t: int) -> None:
        sys.stdout.write(decoder.decode(bytes([t])))
        sys.stdout.flush()

    t0 = time.perf_counter()
    gen.begin(data)  # a new document: LMs over a memory bank fetch the prompt's block here
    gen.prefill(data)
    t1 = time.perf_counter()
    run(gen, tokens, temperature, seed, show)
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    source = "bundle" if bundle else engine
    err_console.print(f"[dim]{source}: prompt {len(data)} bytes in {t1 - t0:.2f} s, generated {tokens} bytes at "
                      f"{tokens / max(t2 - t1, 1e-9):.1f} bytes/s ({gen.calls['segment']} segment, "
                      f"{gen.calls['decode']} decode calls); state {state_bytes} bytes between segments; "
                      f"RSS {rss_bytes() / 2**20:.0f} MiB[/]", highlight=False)
