"""Validate stage: stream a bundle in its own process (emulated for ARM bundles on x86_64) against the float64
PyTorch model it was compiled from, rebuilt from the weights it carries; without torch (a board), against the
golden record compiled into the bundle. What is streamed and how it is judged is the bundle's unit's."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgekit import units
from edgekit.artifact import Bundle, load
from edgekit.errors import EdgekitError
from edgekit.runtime import Session

RUNNERS = ("python", "native")  # what streams the bundle: a Python session in its own process, or edgekit-run


def reference_model(bundle: Bundle):
    """The float64 PyTorch model of the bundle, or None where torch is not installed or the bundle is a device copy
    without its source weights (the golden record is the reference then)."""
    try:
        from edgekit import models
    except ImportError:
        return None
    if not (bundle.path / bundle.manifest["model"]["weights"]).is_file():
        return None
    return models.from_bundle(bundle)


def validate(bundle_path: Path, options=None, progress: Callable[[int, int], None] = lambda done, total: None,
             report_path: Path | None = None, runner: str = "python", **fields) -> dict:
    """Stream the bundle against its reference; return the report (also saved as validation.json in the bundle,
    or at `report_path`). `options` is the unit's ValidateOptions, or give its fields (e.g. frames=100_000).
    runner="native" streams through the bundle's native runner (`edgekit runner`) instead of a Python session."""
    bundle = load(bundle_path, check_machine=False)
    unit = units.of(bundle)
    options = options if options is not None else unit.validate_options(**fields)
    if runner not in RUNNERS:
        raise EdgekitError(f"unknown runner {runner!r}", f"choose one of: {', '.join(RUNNERS)}")
    if runner == "native":
        from edgekit import runner as native

        session = native.session(bundle)
    else:
        session = Session(bundle, isolated=True)  # the artifact's memory apart from the reference's
    net = reference_model(bundle)
    report = unit.validate(bundle, session, net, options, progress)
    report["execution"], report["runner"] = session.execution, runner
    if net is None:
        report["reference"] += ", read from the bundle's golden record (computed at compile time; this machine has " \
                               "no PyTorch or the bundle no source weights)"
    report["runtime_startup_seconds"] = round(session.startup_seconds, 2)
    return bundle.save_report("validation.json", report, report_path)
