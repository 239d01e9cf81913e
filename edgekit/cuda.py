"""CUDA kernels compiled offline, here, to a cubin for the target's GPU.

Without an NVIDIA driver on the build machine, TVM 0.27 keeps each CUDA module as CUDA C source, which the
board would compile when loading the library (Python TVM plus NVRTC or nvcc there). Instead the build keeps
the source (`kernels_as_source`), and at export the packed module tree is rewritten: each CUDA module's
source becomes a cubin built with nvcc for the target's `arch` and tagged "cubin", which TVM's CUDA runtime
hands to cuModuleLoadData unchanged. A cubin holds no PTX, so nothing is JIT-compiled on the board: it loads
on that GPU architecture only, under a driver at least as new as the toolkit's major version.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgekit.errors import CompileError
from edgekit.targets import nvcc

EM_CUDA = 190
_CUDA_ELF = b"\x7fELF\x02\x01\x01\x41"  # 64-bit, little-endian, ELF version 1, OS/ABI 0x41 (CUDA)
_LIBRARY_BIN = "__tvm_ffi__library_bin"  # the symbol through which tvm-ffi finds a library's packed modules


@contextmanager
def kernels_as_source() -> Iterator[None]:
    """Make TVM keep CUDA modules as source even where a driver would let it JIT them during the build, so
    the offline compile below is the only one, on every build machine."""
    old = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TVM_COMPILE_FORCE_FALLBACK"]
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old


def export_library(executable, path: Path, arch: str, cc: str) -> dict:
    """Export a CUDA build with its kernels as a cubin for `arch` (e.g. sm_87); returns the manifest record."""
    version = toolkit_version()
    with tempfile.TemporaryDirectory() as tmp:
        executable.export_library(str(path), cc=cc, workspace_dir=tmp, fpack_imports=_pack_imports(arch))
    return {"toolkit": version, "arch": arch, "image": "cubin"}


def toolkit_version() -> str:
    """The CUDA toolkit release of the nvcc in use, e.g. 13.0.88."""
    found = re.search(r"release [\d.]+, V([\d.]+)", _run([nvcc(), "--version"]).decode())
    if not found:
        raise CompileError(f"cannot read the CUDA version from `{nvcc()} --version`", "check the CUDA toolkit install")
    return found.group(1)


def compile_cubin(source: str, arch: str) -> bytes:
    """Machine code for `arch` only (no PTX), without fast-math, so results stay comparable with PyTorch."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "kernels.cu"), Path(tmp, "kernels.cubin")
        src.write_text(source)
        _run([nvcc(), "--cubin", "-O3", f"-arch={arch}", "-o", str(out), str(src)])
        return out.read_bytes()


def cubin_arch(image: bytes) -> str:
    """The GPU architecture of a CUDA ELF image, from e_flags: bits 0-7 up to ELF ABI 7 (CUDA 12),
    bits 8-15 from ABI 8 (CUDA 13)."""
    if image[:8] != _CUDA_ELF or struct.unpack_from("<H", image, 18)[0] != EM_CUDA:
        raise ValueError("not a CUDA ELF image")
    flags = struct.unpack_from("<I", image, 48)[0]
    return f"sm_{(flags >> 8 if image[8] >= 8 else flags) & 0xFF}"


def embedded_archs(library: Path) -> list[str]:
    """The architecture of each CUDA ELF image inside a built library (what `cuobjdump --list-elf` lists)."""
    data = Path(library).read_bytes()
    found, at = [], data.find(_CUDA_ELF)
    while at >= 0:
        found.append(cubin_arch(data[at:at + 64]))
        at = data.find(_CUDA_ELF, at + 1)
    return found


def _pack_imports(arch: str) -> Callable:
    """An `fpack_imports` for export_library: TVM's packed module tree with CUDA source swapped for cubins,
    embedded through an assembler `.incbin` (the C-array alternative is slow to compile for large weights)."""

    def pack(mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        from tvm.runtime import _ffi_api

        if is_system_lib:
            raise CompileError("CUDA kernels cannot be packed into a system library", "build a shared library")
        sources = [m.inspect_source("cuda").encode() for m in _walk(mod) if m.kind == "cuda"]
        blob = _ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes()
        bin_path = Path(workspace_dir, f"{prefix}devc.bin")
        bin_path.write_bytes(_with_cubins(blob, sources, arch))
        asm = Path(workspace_dir, f"{prefix}devc.S")
        symbol = f"{prefix}{_LIBRARY_BIN}"
        asm.write_text(f'\t.section .rodata.{symbol},"a"\n\t.globl {symbol}\n\t.type {symbol}, %object\n'
                       f'\t.balign 16\n{symbol}:\n\t.incbin "{bin_path}"\n\t.size {symbol}, . - {symbol}\n'
                       '\t.section .note.GNU-stack,"",%progbits\n')
        return str(asm)

    return pack


def _with_cubins(blob: bytes, sources: list[bytes], arch: str) -> bytes:
    """Rewrite tvm-ffi's packed import tree (u64 size; u64 vectors of tree row pointers and child indices; per
    module its kind and, except `_lib`, its bytes). A CUDA module's bytes are [fmt][function map][code]:
    fmt "cuda" with source code becomes fmt "cubin" with the compiled image, the function map kept."""

    def u64(at: int) -> int:
        return struct.unpack_from("<Q", blob, at)[0]

    def field(data: bytes) -> bytes:
        return struct.pack("<Q", len(data)) + data

    at = 8
    for _ in range(2):
        at += 8 + 8 * u64(at)
    out, cuda_format, compiled = [blob[8:at]], field(b"cuda"), 0
    while at < len(blob):
        kind = blob[at + 8:at + 8 + u64(at)]
        out.append(field(kind))
        at += 8 + len(kind)
        if kind == b"_lib":
            continue
        payload = blob[at + 8:at + 8 + u64(at)]
        at += 8 + len(payload)
        if kind == b"cuda" and payload.startswith(cuda_format):
            source = next((s for s in sources if payload.endswith(field(s))), None)
            if source is None:
                raise CompileError("a CUDA module's source was not found in the packed library",
                                   "this TVM version packs CUDA modules differently; update edgekit/cuda.py")
            fmap = payload[len(cuda_format):len(payload) - len(field(source))]
            payload = field(b"cubin") + fmap + field(compile_cubin(source.decode(), arch))
            compiled += 1
        out.append(field(payload))
    if compiled != len(sources):
        raise CompileError(f"compiled {compiled} of {len(sources)} CUDA modules", "report this as an edgekit bug")
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


def _walk(mod) -> Iterator:
    yield mod
    for m in mod.imports:
        yield from _walk(m)


def _run(cmd: list[str]) -> bytes:
    try:
        return subprocess.run(cmd, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise CompileError(f"{cmd[0]} not found", "install the CUDA toolkit or set EDGEKIT_CUDA_HOME") from None
    except subprocess.CalledProcessError as e:
        raise CompileError(f"{' '.join(cmd[:3])} failed:\n{e.stderr.decode(errors='replace')[-2000:]}",
                           "check the CUDA toolkit install (EDGEKIT_CUDA_HOME selects another one)") from None
