"""Registries filled by the modules of a package: a new unit or target is one new file, listed nowhere else."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Iterable


def discover(package: str, path: Iterable[str], attribute: str) -> dict[str, Any]:
    """`attribute` (UNIT, TARGET) of every module of `package` (its name and `__path__`), by that object's name."""
    found = {}
    for mod in pkgutil.iter_modules(path):
        item = getattr(importlib.import_module(f"{package}.{mod.name}"), attribute)
        found[item.name] = item
    return found
