"""Target descriptions: one small module per board, each defining `TARGET = Target(...)`.

Adding a board means adding one file here; `targets()` discovers every module in this package.
"""
from __future__ import annotations

import importlib
import pkgutil
import platform
import shutil
from dataclasses import dataclass, field
from functools import cache

from edgekit.errors import UnknownNameError


@dataclass(frozen=True)
class Target:
    """How to build for a board and where its artifacts run.

    tvm: a TVM target as a JSON-able dict or a tag name.
    arch: the machine (`uname -m`) whose processes can load the library.
    cc: the C compiler that links the library (a cross compiler for other architectures).
    runs: `native` (this kind of machine), `qemu-aarch64` (emulated here), or `cuda` (needs an NVIDIA GPU).
    """

    name: str
    summary: str
    tvm: dict | str
    arch: str
    cc: str = "gcc"
    runs: str = "native"
    aliases: tuple[str, ...] = ()
    needs: tuple[str, ...] = field(default=())  # executables the build needs, besides `cc`

    def tvm_target(self):
        """The TVM target; an `"mcpu": "native"` entry becomes this machine's CPU (as LLVM names it)."""
        import tvm

        spec = self.tvm
        if isinstance(spec, dict) and spec.get("mcpu") == "native":
            spec = {**spec, "mcpu": tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()}
        return tvm.target.Target(spec)

    def missing_tools(self) -> list[str]:
        return [t for t in (self.cc, *self.needs) if shutil.which(t) is None]

    def runs_here(self) -> bool:
        return self.arch == platform.machine() and self.runs == "native"


@cache
def targets() -> dict[str, Target]:
    found = {}
    for mod in pkgutil.iter_modules(__path__):
        target = importlib.import_module(f"{__name__}.{mod.name}").TARGET
        found[target.name] = target
    return found


def get(name: str) -> Target:
    """A target by name or alias; an unknown name lists the valid ones."""
    for t in targets().values():
        if name == t.name or name in t.aliases:
            return t
    names = [f"{t.name}" + (f" ({', '.join(t.aliases)})" if t.aliases else "") for t in targets().values()]
    raise UnknownNameError(f"unknown target {name!r}", f"choose one of: {', '.join(names)}")
