"""Units: how a model streams. A unit is one module in this package that defines `UNIT`, an instance of a `Unit`
subclass; units are found by name like targets. A model family's registry row names its unit, and the stages and
the CLI reach everything unit-specific through this contract, never by probing the model or the manifest:

- compile side (needs torch, imported lazily): the entries a model exports, its manifest fields, its golden record;
- runtime side (numpy and the TVM runtime only): the session, in this process or in a `worker.Worker`;
- validation: its options, the PyTorch (or golden) reference, the checks; benchmarks: its engines;
- how its reports render.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Callable

from edgekit.artifact import Bundle
from edgekit.errors import EdgekitError, UnknownNameError
from edgekit.plugins import discover

ENGINES = ("pytorch", "onnxruntime", "tvm")
Progress = Callable[[str], None]
Counter = Callable[[int, int], None]  # (done, total) items of a stream


@dataclass(frozen=True)
class BenchOptions:
    """Latency measurement, the same for every unit: calls timed per engine after warm-up, one thread count."""

    calls: int = 200
    warmup: int = 20
    engines: tuple[str, ...] = ENGINES
    seed: int = 0
    threads: int | None = None  # None: each engine's own default

    def __post_init__(self):
        if self.calls < 1 or self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise EdgekitError("need calls >= 1, warmup >= 0 and threads >= 1")
        if unknown := set(self.engines) - set(ENGINES):
            raise EdgekitError(f"unknown engine(s) {', '.join(sorted(unknown))}", f"choose from {', '.join(ENGINES)}")


class Unit:
    """The contract every unit implements (see the module docstring). Options are frozen dataclasses; a field
    given for another unit's options is refused by name."""

    name = ""
    # ONNX Runtime against eager PyTorch on the exported entries' examples (and rtol 1e-4): float32 rounding of sums
    # behind outputs of magnitude ~100 (the examples' random states) differs between engines by up to ~5e-5
    export_atol = 1e-4
    quantizations: tuple[str, ...] = ("none",)  # edgekit.quantize schemes whose reference this unit can build
    ExportOptions: type
    ValidateOptions: type

    def options(self, cls: type, given: dict):
        known = {f.name for f in fields(cls)}
        if unknown := [k for k in given if k not in known]:
            raise EdgekitError(f"{', '.join(unknown)}: not an option of {self.name}-streaming models",
                               f"{self.name} models take {', '.join(sorted(known))}")
        return cls(**given)

    def export_options(self, **given):
        return self.options(self.ExportOptions, given)

    def validate_options(self, **given):
        return self.options(self.ValidateOptions, given)

    def reference(self, net, scheme: str):
        """The PyTorch model that validation and the golden record compare a bundle of `scheme` with: the model
        itself for fp32; for a quantized bundle, the model computing its products as the scheme says (a unit lists
        in `quantizations` the schemes it can build this for)."""
        return net

    # ---- compile side --------------------------------------------------------------------------------------------
    def export_entries(self, net, options) -> list[tuple]:
        """[(entry name, module over flat tensors, example inputs {name: ndarray}, output names)]."""
        raise NotImplementedError

    def manifest_fields(self, net, options) -> dict:
        """The manifest's interface fields: unit, input, outputs, state, entries and what the unit needs."""
        raise NotImplementedError

    def write_data(self, net, stage: Path) -> dict:
        """Files the bundle carries besides library, weights and golden record (a memory bank), written into the
        staging directory; their manifest fields (none by default)."""
        return {}

    def write_golden(self, net, path: Path) -> dict:
        """Float64 reference outputs of a fixed stream, for boards without torch; the manifest's record of it."""
        raise NotImplementedError

    # ---- runtime side ----------------------------------------------------------------------------------------------
    def session(self, bundle: Bundle, **options):
        """A session over the bundle's library in this process; `options` are the unit's session options (frame:
        allow_nonfinite)."""
        raise NotImplementedError

    def remote_session(self, bundle: Bundle, worker, **options):
        """The same session run by a `worker.Worker` (started with the same options)."""
        raise NotImplementedError

    def describe(self, manifest: dict) -> str:
        """One line on how the bundle streams, for the compile summary."""
        raise NotImplementedError

    # ---- validation and benchmarks -----------------------------------------------------------------------------------
    def validate(self, bundle: Bundle, session, net, options, progress: Counter) -> dict:
        """Stream the bundle through `session` against `net` (the float64 PyTorch model; None without torch: the
        golden record); the report with its checks."""
        raise NotImplementedError

    def bench(self, bundle: Bundle, options: BenchOptions, torch_model: Callable[[], object],
              progress: Progress) -> dict:
        """Latency per engine; `torch_model()` builds the float32 PyTorch model for the pytorch engine."""
        raise NotImplementedError

    def render_validation(self, report: dict) -> list:
        raise NotImplementedError

    def render_bench(self, report: dict) -> list:
        raise NotImplementedError


@cache
def units() -> dict[str, Unit]:
    """Every unit in this package, by name."""
    return discover(__name__, __path__, "UNIT")


def get(name: str) -> Unit:
    if name not in units():
        raise UnknownNameError(f"unknown streaming unit {name!r}", f"this edgekit knows: {', '.join(units())}")
    return units()[name]


def of(bundle: Bundle) -> Unit:
    """The unit a bundle streams in (read from its manifest)."""
    return get(bundle.manifest["unit"])
