"""The runtime-only loader on the host, and aarch64 artifacts run under qemu against the same host build."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgekit import emulator, tvm_runtime
from edgekit.errors import EdgekitError
from edgekit.tvm_runtime import load_vm

HOST = {"kind": "llvm"}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
W = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")


def build(target: dict, path, cc: str | None = None) -> str:
    """A one-step recurrent cell with a state and a tuple output: y = tanh(x W), s' = s + x W."""
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm.relax.frontend.onnx import from_onnx

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"]),
         helper.make_node("Add", ["s", "h"], ["s_next"])],
        "cell",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("s_next", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(W, "W")],
    )
    mod = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), keep_params_in_input=False)
    ex = tvm.compile(mod, target=tvm.target.Target(target))
    ex.export_library(str(path), **({"cc": cc} if cc else {}))
    return str(path)


def inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, 4)).astype("float32"), rng.standard_normal((1, 8)).astype("float32")]


def reference(x: np.ndarray, s: np.ndarray) -> list[np.ndarray]:
    h = x @ W
    return [np.tanh(h), s + h]


def test_load_vm_runs_host_build(tmp_path):
    vm = load_vm(build(HOST, tmp_path / "cell.so"))
    args = inputs()
    outs = vm["main"](*args)
    assert len(outs) == 2
    for got, want in zip(outs, reference(*args)):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # A second call must not overwrite the first call's outputs (pooled VM memory).
    first = [o.copy() for o in outs]
    vm.fn("main")(*[2 * a for a in args])
    for o, f in zip(outs, first):
        np.testing.assert_array_equal(o, f)


def test_load_vm_never_loads_the_compiler(tmp_path):
    lib = build(HOST, tmp_path / "cell.so")
    np.savez(tmp_path / "in.npz", *inputs())
    check = (
        "import runpy, sys; sys.argv = ['tvm_runtime.py', *sys.argv[1:]];"
        f"runpy.run_path({tvm_runtime.__file__!r}, run_name='__main__');"
        "maps = open('/proc/self/maps').read();"
        "assert 'libtvm_runtime.so' in maps and 'libtvm_compiler' not in maps, 'compiler loaded';"
        "assert 'tvm' not in sys.modules, 'tvm imported'"
    )
    subprocess.run([sys.executable, "-c", check, lib, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True)
    with np.load(tmp_path / "out.npz") as f:
        for i, want in enumerate(reference(*inputs())):
            np.testing.assert_allclose(f[f"arr_{i}"], want, rtol=1e-5, atol=1e-6)


def test_missing_qemu_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(emulator.shutil, "which", lambda _name: None)
    with pytest.raises(EdgekitError) as err:
        emulator.prepare(tmp_path)
    assert "qemu-aarch64" in str(err.value) and "qemu-user" in err.value.hint
    assert not (tmp_path / "aarch64-root").exists()


def test_processes_that_need_the_root_at_once_build_it_once(monkeypatch, tmp_path):
    """Parallel test workers (or two edgekit commands) on a fresh machine: one builds, the other waits for it."""
    builds, together = [], threading.Barrier(2)

    def build(root, _say):
        builds.append(root)
        time.sleep(0.5)  # the other caller, started at the same moment, finds no root meanwhile
        root.mkdir()
        (root / emulator._MARKER).write_text(json.dumps({"spec": emulator._SPEC}))

    def prepare(_):
        together.wait()
        return emulator.prepare(tmp_path)

    monkeypatch.setattr(emulator, "_build", build)
    with ThreadPoolExecutor(2) as pool:  # flock holds between open file descriptions, so threads show it too
        roots = list(pool.map(prepare, range(2)))
    assert builds == [tmp_path / "aarch64-root"] and roots == builds * 2


@pytest.mark.slow
def test_emulated_aarch64_matches_host(tmp_path):
    root = emulator.prepare()
    marker = root / "edgekit-root.json"
    built = marker.stat().st_mtime_ns
    assert emulator.prepare() == root and marker.stat().st_mtime_ns == built, "a ready root must be reused"

    arm = build(AARCH64, tmp_path / "cell_aarch64.so", cc="aarch64-linux-gnu-gcc")
    assert open(arm, "rb").read(20)[18] == 183, "not an aarch64 ELF (e_machine EM_AARCH64)"
    host = load_vm(build(HOST, tmp_path / "cell_host.so"))
    args = inputs()
    emulated = emulator.run(arm, args, root=root)
    assert len(emulated) == 2
    for got, want in zip(emulated, host["main"](*args)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_emulated_run_reports_a_host_library(tmp_path):
    with pytest.raises(EdgekitError, match="emulated run"):
        emulator.run(build(HOST, tmp_path / "cell_host.so"), inputs())
