"""edgekit: compact recurrent models from PyTorch to validated streaming artifacts for edge targets.

The Python API mirrors the CLI, one function per pipeline stage:
    edgekit.compile(model, target, out, config=... | checkpoint=...) -> Bundle
    edgekit.validate(bundle_dir, frames=...) -> report dict
    edgekit.bench(bundle_dir) -> report dict
    edgekit.load(bundle_dir) -> Bundle;  edgekit.Session(bundle) streams it
Stages import their heavy dependencies lazily, so a board with only the TVM runtime can load bundles.
"""
from __future__ import annotations

import os
from importlib import import_module

# TVM's thread pool otherwise pins the calling thread to one core when it starts (with one worker, here: a 2-vCPU
# machine), and every thread the process makes afterwards inherits that: PyTorch then ran 100x slower beside it.
os.environ.setdefault("TVM_BIND_THREADS", "0")

__version__ = "0.1.0"

_API = {"compile": "edgekit.compile", "export": "edgekit.export", "validate": "edgekit.validate",
        "bench": "edgekit.bench", "load": "edgekit.artifact", "Session": "edgekit.runtime"}


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")
