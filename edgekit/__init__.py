"""edgekit: compact recurrent models from PyTorch to validated streaming artifacts for edge targets.

The Python API mirrors the CLI, one function per pipeline stage:
    edgekit.compile(model, target, out, config=... | checkpoint=...) -> Bundle
    edgekit.validate(bundle_dir, frames=...) -> report dict
    edgekit.bench(bundle_dir) -> report dict
    edgekit.load(bundle_dir) -> Bundle;  edgekit.Session(bundle) streams it (any unit)
Stages import their heavy dependencies (torch, onnx, TVM's compiler) lazily, so a board with only the TVM
runtime can load bundles and open sessions.
"""
from __future__ import annotations

import os

# TVM's thread pool otherwise pins the calling thread to one core when it starts (with one worker, here: a 2-vCPU
# machine), and every thread the process makes afterwards inherits that: PyTorch then ran 100x slower beside it.
os.environ.setdefault("TVM_BIND_THREADS", "0")

__version__ = "0.1.0"

# Bound after the stage modules are imported: a stage module's name is also its function's, and importing a
# submodule sets the package attribute to the module; these lines leave the functions there.
from edgekit.artifact import load  # noqa: E402
from edgekit.bench import bench  # noqa: E402
from edgekit.compile import compile  # noqa: E402
from edgekit.export import export  # noqa: E402
from edgekit.runtime import Session  # noqa: E402
from edgekit.validate import validate  # noqa: E402

__all__ = ["Session", "bench", "compile", "export", "load", "validate", "__version__"]
