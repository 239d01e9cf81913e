"""Target descriptions: one small module per board, each defining `TARGET = Target(...)`.

Adding a board means adding one file here; `targets()` discovers every module in this package.
"""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from edgekit.artifact import nvidia_driver
from edgekit.errors import CompileError, UnknownNameError
from edgekit.plugins import discover

AARCH64_CC = "aarch64-linux-gnu-gcc"
AARCH64_INSTALL = "apt-get install gcc-aarch64-linux-gnu (scripts/setup.sh installs it)"
CUDA_INSTALL = ("install NVIDIA's CUDA toolkit so that `nvcc` is on PATH, or set EDGEKIT_CUDA_HOME to a toolkit's "
                "root (its bin/nvcc is used)")


@dataclass(frozen=True)
class Target:
    """How to build for a board and where its artifacts run.

    tvm: a TVM target as a JSON-able dict or a tag name; host: overrides the tag's host CPU target.
    arch: the machine (`uname -m`) whose processes can load the library.
    cc: the C compiler that links the library (a cross compiler for other architectures).
    runs: `native` (this kind of machine), `qemu-aarch64` (emulated here), or `cuda` (needs an NVIDIA GPU).
    emulated_cpu: the qemu-aarch64 `-cpu` that stands for the board's core (what it lacks, qemu refuses too).
    install: how to get the build tools when one is missing.
    """

    name: str
    summary: str
    tvm: dict | str
    arch: str
    cc: str = "gcc"
    runs: str = "native"
    aliases: tuple[str, ...] = ()
    needs: tuple[str, ...] = field(default=())  # executables the build needs, besides `cc`
    host: dict | None = None
    install: str = ""
    emulated_cpu: str = "max"

    def tvm_target(self):
        """The TVM target; an `"mcpu": "native"` entry becomes this machine's CPU (as LLVM names it)."""
        import tvm

        spec = self.tvm
        if isinstance(spec, dict) and spec.get("mcpu") == "native":
            spec = {**spec, "mcpu": tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()}
        return tvm.target.Target(spec, host=self.host)

    def missing_tools(self) -> list[str]:
        return [t for t in (self.cc, *self.needs) if shutil.which(nvcc() if t == "nvcc" else t) is None]

    def check_tools(self) -> None:
        """A missing compiler fails before any work, with how to install it."""
        if missing := self.missing_tools():
            raise CompileError(f"target {self.name} needs {', '.join(missing)}, which is not installed",
                               self.install or "see `edgekit targets` for what each target needs")

    def runs_here(self) -> bool:
        if self.arch != platform.machine():
            return False
        return self.runs == "native" or (self.runs == "cuda" and nvidia_driver())


def nvcc() -> str:
    """The nvcc that builds CUDA kernels: $EDGEKIT_CUDA_HOME/bin/nvcc when set (another toolkit than PATH's)."""
    home = os.environ.get("EDGEKIT_CUDA_HOME")
    return str(Path(home) / "bin" / "nvcc") if home else "nvcc"


def aarch64(name: str, summary: str, tvm: dict, aliases: tuple[str, ...] = ()) -> Target:
    """An ARM CPU board: cross-built here and run under qemu-aarch64 on its own core (the baseline Cortex-A53 for
    a board without a named one), or built and run natively on aarch64."""
    return Target(name=name, summary=summary, tvm=tvm, arch="aarch64", cc=AARCH64_CC,
                  runs="native" if platform.machine() == "aarch64" else "qemu-aarch64", aliases=aliases,
                  install=AARCH64_INSTALL, emulated_cpu=tvm.get("mcpu", "cortex-a53"))


@cache
def targets() -> dict[str, Target]:
    """Every target in this package, by name."""
    return discover(__name__, __path__, "TARGET")


def get(name: str) -> Target:
    """A target by name or alias; an unknown name lists the valid ones."""
    for t in targets().values():
        if name == t.name or name in t.aliases:
            return t
    names = [f"{t.name}" + (f" ({', '.join(t.aliases)})" if t.aliases else "") for t in targets().values()]
    raise UnknownNameError(f"unknown target {name!r}", f"choose one of: {', '.join(names)}")
