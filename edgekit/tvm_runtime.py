"""Runs an exported Relax VM library with TVM's runtime library alone, without `import tvm`.

`import tvm` loads libtvm_compiler (250 MB) and the whole Python IR stack: seconds natively, 5-10 s per
process under qemu-aarch64. Running a built artifact needs only tvm_ffi, libtvm_runtime.so (which
registers the loader of the VM executable embedded in the library) and the packed functions that
`tvm.relax.VirtualMachine` itself calls ("vm_load_executable", "vm_initialization", then the function).

This file imports nothing from edgekit, so it also runs as a script inside the aarch64 emulation root:
    python tvm_runtime.py LIB INPUTS.npz OUTPUTS.npz [FUNCTION]
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _import_tvm_ffi():
    """tvm_ffi's __init__ imports torch whenever torch is installed (a workaround for a Windows symbol clash):
    seconds and ~150 MB per process. A runtime that does not use torch imports tvm_ffi with torch hidden."""
    if "tvm_ffi" in sys.modules or "torch" in sys.modules:
        import tvm_ffi
        return tvm_ffi

    class HideTorch:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not imported by edgekit's runtime")
            return None

    sys.meta_path.insert(0, HideTorch)
    try:
        import tvm_ffi
    finally:
        sys.meta_path.remove(HideTorch)
    return tvm_ffi


tvm_ffi = _import_tvm_ffi()

_DLPACK_DEVICE = {"cpu": 1, "cuda": 2}
_POOLED_ALLOCATOR = 2  # tvm.relax.VirtualMachine.POOLED_ALLOCATOR, its default
ALIGNMENT = 64  # bytes: what TVM's own allocations guarantee and compiled kernels may assume


def num_threads() -> int:
    """Threads TVM's parallel CPU loops run on: TVM_NUM_THREADS, else TVM's count of physical cores."""
    _load_runtime("cpu")
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


@functools.cache
def _load_runtime(device: str) -> None:
    """Loads libtvm_runtime (and the CUDA runtime sidecar) from the tvm wheel, as tvm/base.py does,
    but finds the wheel without executing tvm/__init__.py."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise ImportError("the apache-tvm package (for its lib/libtvm_runtime.so) is not installed")
    lib_dir = Path(spec.origin).parent / "lib"
    ctypes.CDLL(str(lib_dir / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    if device == "cuda":
        ctypes.CDLL(str(lib_dir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)


class VM:
    """A Relax VM over one exported library; `vm["main"](*arrays)` returns the outputs as numpy arrays,
    tuple outputs flattened in order."""

    def __init__(self, lib_path: str | os.PathLike, device: str = "cpu"):
        if device not in _DLPACK_DEVICE:
            raise ValueError(f"device must be one of {sorted(_DLPACK_DEVICE)}, not {device!r}")
        _load_runtime(device)
        self.device, self.on_cpu = tvm_ffi.device(device, 0), device == "cpu"
        # dlopen resolves a bare file name through the library search path, not the working directory.
        self._vm = tvm_ffi.load_module(os.path.abspath(lib_path))["vm_load_executable"]()
        init = [_DLPACK_DEVICE[device], 0, _POOLED_ALLOCATOR]
        if device != "cpu":
            init += [_DLPACK_DEVICE["cpu"], 0, _POOLED_ALLOCATOR]  # the VM runs shape functions on the CPU
        self._vm["vm_initialization"](*init)
        self._cpu = tvm_ffi.device("cpu", 0)
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        self._stream_sync = tvm_ffi.get_global_func("runtime.Device_StreamSync")

    def sync(self) -> None:
        """Waits for the device's work queued so far (a CPU VM's calls return when they are done)."""
        if not self.on_cpu:
            self._stream_sync(self.device, None)

    def __getitem__(self, name: str) -> Callable[..., list[np.ndarray]]:
        func = self.raw(name)
        return lambda *arrays: [self.numpy(t) for t in func(*[self.tensor(a) for a in arrays])]

    def fn(self, name: str) -> Callable[..., list[np.ndarray]]:
        return self[name]

    def raw(self, name: str) -> Callable[..., list[tvm_ffi.Tensor]]:
        """The function on device tensors, outputs left on the device (for state carried between calls)."""
        func = self._vm[name]
        return lambda *tensors: _flatten(func(*tensors))

    def raw_function(self, name: str) -> Callable:
        """The VM function itself: device tensors in, its result (a Tensor or an Array) as the VM returns it."""
        return self._vm[name]

    def aligned(self, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, tvm_ffi.Tensor]:
        """A numpy buffer in 64-byte aligned memory and the same memory as a CPU tensor: writing the buffer
        is writing the tensor, with no copy at call time."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
        offset = (-raw.ctypes.data) % ALIGNMENT
        array = raw[offset:offset + nbytes].view(dtype).reshape(shape)
        return array, tvm_ffi.from_dlpack(array)

    def tensor(self, array: np.ndarray) -> tvm_ffi.Tensor:
        """A copy on the device in TVM's own (64-byte aligned) memory: compiled kernels may assume that
        alignment, which numpy's buffers do not guarantee."""
        src = tvm_ffi.from_dlpack(np.ascontiguousarray(array))
        dst = self._alloc(src.shape, src.dtype, self.device, None)
        self._copy(src, dst)
        return dst

    def numpy(self, tensor: tvm_ffi.Tensor) -> np.ndarray:
        """The tensor as a numpy array: a view of a CPU VM's tensor (no copy), a host copy of a GPU one."""
        return np.from_dlpack(tensor if self.on_cpu else self._to(tensor, self._cpu))

    def _to(self, tensor: tvm_ffi.Tensor, device: tvm_ffi.Device) -> tvm_ffi.Tensor:
        if tensor.device.dlpack_device_type() == device.dlpack_device_type():
            return tensor
        moved = self._alloc(tensor.shape, tensor.dtype, device, None)
        self._copy(tensor, moved)
        return moved


def _flatten(value: object) -> list[tvm_ffi.Tensor]:
    if isinstance(value, tvm_ffi.Tensor):
        return [value]
    if isinstance(value, tvm_ffi.Array):
        return [t for v in value for t in _flatten(v)]
    raise TypeError(f"unsupported VM output of type {type(value).__name__}")


def load_vm(lib_path: str | os.PathLike, device: str = "cpu") -> VM:
    """Loads an exported Relax library (`ex.export_library(...)`) for `device` ("cpu" or "cuda")."""
    return VM(lib_path, device)


def _main(argv: list[str]) -> None:
    """One call of FUNCTION on the arrays of INPUTS.npz (arr_0, arr_1, ... as np.savez names them)."""
    lib, inputs, outputs, *rest = argv
    with np.load(inputs) as f:
        args = [f[f"arr_{i}"] for i in range(len(f.files))]
    np.savez(outputs, *load_vm(lib)[rest[0] if rest else "main"](*args))


if __name__ == "__main__":
    _main(sys.argv[1:])
