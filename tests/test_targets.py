"""Targets: discovery, cross-built aarch64 libraries, CUDA builds with thread-bound kernels compiled offline to
a cubin of the right architecture, and clear errors for unknown targets and missing compilers."""
import dataclasses
import platform
import shutil
import struct

import pytest
import tvm_ffi
from tvm import tirx

from edgekit import cuda
from edgekit.compile import compile, import_entries
from edgekit.errors import CompileError, UnknownNameError
from edgekit.export import export
from edgekit.units.frame import UNIT as frame
from edgekit.models import build
from edgekit.pipeline import pipeline
from edgekit.targets import get, nvcc, targets

EM_X86_64, EM_AARCH64 = 62, 183
needs_nvcc = pytest.mark.skipif(shutil.which(nvcc()) is None, reason="nvcc (CUDA toolkit) not installed")


def e_machine(path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF"
    return struct.unpack_from("<H", head, 18)[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny LMUFormer step built once per target for this module."""
    cache = {}

    def get_bundle(target: str):
        if target not in cache:
            out = tmp_path_factory.mktemp("targets") / target
            cache[target] = compile("lmuformer", target, out, config="tiny", chunks=(1,))
        return cache[target]

    return get_bundle


def test_every_board_is_discovered_with_its_aliases():
    assert {"host", "arm64", "rpi4", "rpi5", "jetson-orin-nano", "jetson-agx-orin", "cuda-sm90"} <= set(targets())
    assert get("jetson").name == "jetson-orin-nano" and get("arm").name == "arm64"
    for t in targets().values():
        assert t.arch in ("x86_64", "aarch64") and t.runs in ("native", "qemu-aarch64", "cuda")


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        get("jetson-nano-2gb")
    assert all(name in err.value.hint for name in targets()) and "jetson-orin-nano (jetson)" in err.value.hint


def test_tvm_targets_name_each_board_cpu_and_gpu():
    nano = get("jetson-orin-nano").tvm_target()
    assert nano.kind.name == "cuda" and str(nano.arch) == "sm_87"
    assert str(nano.host.attrs["mcpu"]) == "cortex-a78"  # not the tag's carmel (Xavier)
    assert str(get("jetson-agx-orin").tvm_target().host.attrs["mcpu"]) == "cortex-a78"
    assert str(get("rpi4").tvm_target().attrs["mcpu"]) == "cortex-a72"
    assert str(get("rpi5").tvm_target().attrs["mcpu"]) == "cortex-a76"
    assert str(get("cuda-sm90").tvm_target().arch) == "sm_90"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="describes an x86_64 build machine")
def test_where_artifacts_run_from_an_x86_64_machine():
    assert get("host").runs_here()
    assert get("rpi5").runs == "qemu-aarch64" and not get("rpi5").runs_here()
    assert get("jetson").runs == "cuda" and not get("jetson").runs_here()


def test_arm_build_is_an_aarch64_library(built):
    bundle = built("arm64")
    assert e_machine(bundle.library) == EM_AARCH64
    assert bundle.manifest["target"]["arch"] == "aarch64" and bundle.manifest["cuda"] is None


def test_missing_cross_compiler_is_a_clear_error(monkeypatch, tmp_path):
    board = dataclasses.replace(get("rpi5"), name="rpi5-no-gcc", cc="aarch64-nonexistent-gcc")
    monkeypatch.setitem(targets(), board.name, board)
    with pytest.raises(CompileError) as err:
        compile("lmuformer", board.name, tmp_path / "out", config="tiny", chunks=(1,))
    assert "aarch64-nonexistent-gcc" in str(err.value) and "apt-get install gcc-aarch64-linux-gnu" in err.value.hint
    assert not any(tmp_path.iterdir())


def test_missing_nvcc_names_the_toolkit_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEKIT_CUDA_HOME", str(tmp_path))
    with pytest.raises(CompileError) as err:
        get("jetson").check_tools()
    assert "nvcc" in str(err.value) and "EDGEKIT_CUDA_HOME" in err.value.hint


def thread_tags(func: tirx.PrimFunc) -> set[str]:
    """The GPU threads (blockIdx.x, threadIdx.x, ...) that the loops of a kernel are bound to."""
    tags = set()

    def visit(loop: tirx.For) -> None:
        if loop.thread_binding is not None:
            tags.add(str(loop.thread_binding.thread_tag))

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)], order="post")
    return tags


def test_every_cuda_kernel_is_bound_to_blocks_and_threads(tmp_path):
    mod = import_entries(export(build("lmuformer", "tiny"), frame, tmp_path, frame.export_options(chunks=(1, 4))))
    kernels = {"cuda": get("jetson"), "llvm": get("host")}
    tags = {kind: {gv.name_hint: thread_tags(f) for gv, f in pipeline(t.tvm_target())(mod).functions.items()
                   if isinstance(f, tirx.PrimFunc)} for kind, t in kernels.items()}
    assert len(tags["cuda"]) > 10
    unbound = [name for name, t in tags["cuda"].items() if not {"blockIdx.x", "threadIdx.x"} <= t]
    assert not unbound, f"kernels without a GPU schedule: {unbound}"
    assert not any(tags["llvm"].values())  # the check can fail: CPU kernels bind no threads


@needs_nvcc
def test_cubin_arch_reads_cuda_12_and_13_images():
    for arch in ("sm_87", "sm_90"):
        image = cuda.compile_cubin('extern "C" __global__ void k(float* a) { a[threadIdx.x] += 1.0f; }', arch)
        assert cuda.cubin_arch(image) == arch
    abi7 = bytearray(64)  # the header CUDA 12.9's ptxas writes for sm_87: ELF ABI 7, arch in e_flags bits 0-7
    abi7[:9] = b"\x7fELF\x02\x01\x01\x41\x07"
    struct.pack_into("<H", abi7, 18, cuda.EM_CUDA)
    struct.pack_into("<I", abi7, 48, 0x570557)
    assert cuda.cubin_arch(bytes(abi7)) == "sm_87"


@needs_nvcc
def test_jetson_build_has_sm87_cubin_and_aarch64_host_code(built):
    bundle = built("jetson")
    assert e_machine(bundle.library) == EM_AARCH64
    assert set(cuda.embedded_archs(bundle.library)) == {"sm_87"}
    assert b"__global__" not in bundle.library.read_bytes()  # compiled here, no CUDA source left for the board
    assert bundle.manifest["cuda"] == {"toolkit": cuda.toolkit_version(), "arch": "sm_87", "image": "cubin"}


@needs_nvcc
def test_sm90_build_packs_a_cubin_the_cuda_runtime_loader_reads(built):
    """The x86_64 library loads here up to its CUDA module (no driver): the bytes TVM's CUDA loader would get
    are the "cubin" format with an sm_90 image, so the rewritten module tree parses as TVM's own."""
    bundle = built("cuda-sm90")
    assert e_machine(bundle.library) == EM_X86_64
    assert set(cuda.embedded_archs(bundle.library)) == {"sm_90"}
    from edgekit.tvm_runtime import _load_runtime

    _load_runtime("cpu")
    got = []

    def capture(payload):
        got.append(bytes(payload))
        raise RuntimeError("captured")

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        pytest.skip("a CUDA runtime is loaded: the GPU check script covers loading for real")
    tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda", capture)
    try:
        with pytest.raises(Exception, match="captured"):
            tvm_ffi.load_module(str(bundle.library))
    finally:
        tvm_ffi.remove_global_func("ffi.Module.load_from_bytes.cuda")
    (payload,) = got
    assert payload[:13] == struct.pack("<Q", 5) + b"cubin"
    image = payload[payload.index(b"\x7fELF"):]
    assert struct.unpack_from("<Q", payload, len(payload) - len(image) - 8)[0] == len(image)
    assert cuda.cubin_arch(image) == "sm_90"


@needs_nvcc
def test_cuda_kernels_are_compiled_by_nvcc_even_where_a_driver_is(tmp_path):
    """On a GPU machine TVM would JIT kernels through its CUDA runtime during the build (NVRTC, the runtime's
    choice of toolkit and flags). A stand-in for that runtime's factory shows the build never calls it."""
    import tvm
    from tvm import relax

    from edgekit.pipeline import build as build_library

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(y)
    target = get("cuda-sm90").tvm_target()
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        pytest.skip("a CUDA runtime is loaded")
    calls = []

    def jit(*args):
        calls.append(args)
        raise RuntimeError("kernels JIT-compiled during the build")

    tvm_ffi.register_global_func("ffi.Module.create.cuda", jit)
    try:
        with pytest.raises(Exception, match="JIT-compiled"):
            tvm.compile(bb.get(), target=target)  # TVM's own build reaches the stand-in
        record = build_library(bb.get(), target, tmp_path / "relu.so", "gcc")
    finally:
        tvm_ffi.remove_global_func("ffi.Module.create.cuda")
    assert len(calls) == 1 and record["arch"] == "sm_90"
    assert cuda.embedded_archs(tmp_path / "relu.so") == ["sm_90"]
