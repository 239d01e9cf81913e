"""Report pieces every unit renders the same way (rich tables and lines); the CLI prints what units return.
rich is imported on use: units import this module, and a board's runtime (or the emulation root) has no rich."""
from __future__ import annotations

from pathlib import Path


def table(title: str, columns: list[str], rows: list[list[str]], left: int = 1):
    """A rich table whose first `left` columns are text and the rest right-aligned figures."""
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        t.add_row(*row)
    return t


def errors(title: str, report: dict):
    """Max abs and relative error per output and the error by decile of the stream (drift)."""
    return table(title, ["output", "max abs error", "max rel error", "error by decile (first .. last)"],
                 [[name, f"{o['max_abs_error']:.3g}", f"{o['max_rel_error']:.3g}",
                   " ".join("-" if e is None else f"{e:.1e}" for e in o["error_by_decile"])]
                  for name, o in report["outputs"].items()])


def quantized(report: dict) -> list:
    """A quantized bundle's validation: errors in each output's int8 steps against the quantized reference, and
    the quantization's own effect against the fp32 model (with bits per byte for a byte LM on text)."""
    steps = lambda title, outputs: table(title, ["output", "codes differing", "max error (steps)"],  # noqa: E731
                                         [[n, f"{o['codes_differing']:.4%}", f"{o['max_error_steps']:.3f}"]
                                          for n, o in outputs.items() if "codes_differing" in o])
    out = []
    if kernel := report.get("kernel_check"):
        out.append(steps(f"kernel check ({kernel['items']} {kernel['unit']}; {kernel['how']}), in each "
                         "output's int8 steps (max|row| / 127): the step criteria judge this", kernel["outputs"]))
    if any("codes_differing" in o for o in report["outputs"].values()):
        out.append(steps("against the quantized reference, in each output's int8 steps (max|row| / 127)"
                         + (", free-running: a flipped code carried on by the state counts in every later item"
                            if kernel else ""), report["outputs"]))
    if effect := report.get("quantization_effect"):
        out.append(errors(f"quantization effect: the quantized model against {effect['against']}", effect))
        if bits := effect.get("bits_per_byte"):
            out.append(f"bits per byte of the scored segments: artifact {bits['artifact']:.4f}, fp32 model "
                       f"{bits['fp32']:.4f} (difference {bits['artifact'] - bits['fp32']:+.4f})")
    return out


def mib(b: int | None) -> str:
    return f"{b / 2**20:.1f} MiB" if b is not None else "n/a"


def validation_footer(report: dict) -> list[str]:
    """Where it ran, the memory check, every check with its verdict, and where the report is."""
    r = report["rss_bytes"]
    lines = [f"ran: {report['execution']}" + (f", runtime start-up {report['runtime_startup_seconds']} s"
                                              if "runtime_startup_seconds" in report else ""),
             f"state {report['state_bytes']} bytes; artifact process RSS at T/10 {mib(r['at_T/10'])}, at T "
             f"{mib(r['at_T'])} " + (f"(change {r['growth'] / 2**20:+.2f} MiB)" if r["growth"] is not None
                                     else "(one point: too short a stream to check memory)")]
    lines += [f"  {'[green]pass[/]' if ok else '[red]FAIL[/]'} {check}" for check, ok in report["checks"].items()]
    return lines + [saved(report)]


def bench_footer(report: dict) -> list[str]:
    ratios = [f"  {r['engine']} {' '.join(f'{k} {v}' for k, v in r['per_call'].items())}: {r['precision']} "
              f"{Path(r['bundle']).name} / {Path(r['baseline']).name} p50 = {r['p50_ratio']:.3f} (rounds: "
              f"{', '.join(f'{x:.3f}' for x in r['p50_ratio_by_round'])})" for r in report.get("ratios", [])]
    return [*([f"p50 ratios, median of {report['rounds']} interleaved rounds:"] + ratios if ratios else []),
            "threads: " + ", ".join(f"{k} {v}" for k, v in report["threads"].items() if k != "requested"),
            "denormals flushed in every engine: " + "; ".join(f"{k}: {v}" for k, v in report["denormals"].items()),
            saved(report)]


def saved(report: dict) -> str:
    if report.get("report"):
        return f"report: {report['report']}"
    return f"[yellow]warning:[/] {report['report_error']}; the results above are all there is (pass --report PATH)"
