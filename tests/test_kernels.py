"""The CPU kernels (edgekit.kernels) on small shapes: each schedule rule takes the op it was written for, and the
host build computes what numpy does."""
from __future__ import annotations

from math import erf

import os

import numpy as np
import pytest
import tvm
from tvm import relax

from edgekit import targets
from edgekit.pipeline import cpu_passes, pipeline

TARGET = targets.get("host").tvm_target()
RNG = np.random.default_rng(0)


def gelu(x: np.ndarray) -> np.ndarray:
    return x * 0.5 * (1 + np.vectorize(erf)(x.astype(np.float64) / np.sqrt(2)))


def relax_gelu(x: relax.Expr) -> relax.Expr:
    """GELU as the ONNX importer gives it for torch's (opset 17: Div, Erf, Add, Mul, Mul)."""
    erf_ = relax.op.erf(relax.op.divide(x, relax.const(np.float32(np.sqrt(2)))))
    return relax.op.multiply(relax.op.multiply(x, relax.op.add(erf_, relax.const(np.float32(1)))),
                             relax.const(np.float32(0.5)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def module(shapes: list[tuple[int, ...]], body) -> tvm.IRModule:
    """`main(*inputs)` returning body(*input vars), as one Relax dataflow block."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(shape, "float32")) for i, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(*params))
        bb.emit_func_output(out)
    return bb.get()


def run(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET, relax_pipeline=pipeline(TARGET)), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def scheduled(mod: tvm.IRModule) -> dict[str, str]:
    """TVMScript of every PrimFunc right after the schedule rules ran, by name."""
    passes = cpu_passes(TARGET)
    end = [p.info.name for p in passes].index("ApplyDefaultSchedule") + 1
    with TARGET:
        mod = tvm.transform.Sequential(passes[:end])(mod)
    return {gv.name_hint: f.script() for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("rows", [1, 13])
def test_packed_matmul_with_gelu_matches_numpy(rows):
    """1 row (a vector) and 13 (padded to a tile of 8, 3 rows dropped), bias and GELU fused."""
    w, b = RNG.standard_normal((40, 48), dtype=np.float32), RNG.standard_normal(48, dtype=np.float32)
    x = RNG.standard_normal((rows, 40), dtype=np.float32)
    mod = module([x.shape], lambda v: relax_gelu(relax.op.add(relax.op.matmul(v, relax.const(w)), relax.const(b))))
    ((name, kernel),) = [(name, s) for name, s in scheduled(mod).items() if "packed_gemv" in name]
    assert "fast_erf" in name and "T.vectorized(T.int64(16))" in kernel  # GELU fused, computed per tile
    np.testing.assert_allclose(run(mod, x), gelu(x @ w + b), rtol=1e-5, atol=2e-5)


def test_packed_matmul_flattens_leading_dims():
    w, x = RNG.standard_normal((24, 32), dtype=np.float32), RNG.standard_normal((2, 7, 24), dtype=np.float32)
    mod = module([x.shape], lambda v: relax.op.matmul(v, relax.const(w)))
    assert any("packed_gemv" in name for name in scheduled(mod))
    np.testing.assert_allclose(run(mod, x), x @ w, rtol=1e-5, atol=1e-5)


def test_attention_matmuls_and_softmax_match_numpy():
    """q @ k^T (keys padded 21 -> 32), scale, causal mask, softmax over 21 keys, @ v: one head of attention."""
    q, k, v = (RNG.standard_normal((1, 3, 21, 8), dtype=np.float32) for _ in range(3))
    mask = np.tril(np.ones((21, 21), bool))

    def attention(q_, k_, v_):
        s = relax.op.divide(relax.op.matmul(q_, relax.op.permute_dims(k_, [0, 1, 3, 2])), relax.const(np.float32(3)))
        s = relax.op.where(relax.const(mask), s, relax.const(np.float32(-1e9)))
        return relax.op.matmul(relax.op.nn.softmax(s, axis=-1), v_)

    mod = module([q.shape, k.shape, v.shape], attention)
    funcs = scheduled(mod)
    assert any("matmul_intermediate_pad" in s and "T.vectorized(T.int64(16))" in s for s in funcs.values())
    assert any(name.startswith("fast_softmax") and "_rf" in s for name, s in funcs.items())
    ref = softmax(np.where(mask, q @ k.transpose(0, 1, 3, 2) / 3, -1e9)) @ v
    np.testing.assert_allclose(run(mod, q, k, v), ref, rtol=1e-5, atol=1e-6)


def test_layer_norm_is_vectorized_and_matches_numpy():
    x = RNG.standard_normal((1, 5, 64), dtype=np.float32) * 3 + 1
    gamma, beta = RNG.standard_normal(64, dtype=np.float32), RNG.standard_normal(64, dtype=np.float32)
    mod = module([x.shape], lambda v: relax.op.nn.layer_norm(v, relax.const(gamma), relax.const(beta), axes=[-1]))
    (script,) = [s for name, s in scheduled(mod).items() if "layer_norm" in name]
    assert "_rf" in script and "T.vectorized(T.int64(16))" in script
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(run(mod, x), ref, rtol=1e-5, atol=1e-5)


def test_data_movement_is_inlined_into_one_pass_a_loop_per_concatenated_piece():
    """Two transposes feeding a concatenate: no intermediate tensors, and the concatenated axis split at the
    pieces' offsets (each loop copies one input instead of choosing among all of them per element)."""
    a, b = RNG.standard_normal((3, 5, 16), dtype=np.float32), RNG.standard_normal((3, 5, 24), dtype=np.float32)
    mod = module([a.shape, b.shape], lambda x, y: relax.op.concat(
        [relax.op.permute_dims(x, [1, 0, 2]), relax.op.permute_dims(y, [1, 0, 2])], axis=2))
    ((script,),) = [[s] for name, s in scheduled(mod).items() if "concatenate" in name]
    assert "sblock_alloc_buffer" not in script
    assert "range(T.int64(16))" in script and "range(T.int64(16), T.int64(40))" in script
    np.testing.assert_array_equal(run(mod, a, b), np.concatenate([a.transpose(1, 0, 2), b.transpose(1, 0, 2)], 2))


@pytest.mark.parametrize("target", ["host", "rpi5"])
def test_row_tiles_fit_the_registers_and_survive_padding(target):
    """AVX-512 takes tiles of 8 or 6 rows, NEON of 4; the schedule finds the tile again from the padded count."""
    from edgekit.kernels.cpu_gemv import _accumulators, _row_tile

    tvm_target = targets.get(target).tvm_target()
    for rows in range(1, 100):
        tile = _row_tile(rows, tvm_target)
        assert tile <= _accumulators(tvm_target)
        assert _row_tile(-(-rows // tile) * tile, tvm_target) == tile
    assert _row_tile(74, tvm_target) == (8 if target == "host" else 4)


def test_gathers_clamp_out_of_range_indices():
    """A bad id reaching a compiled gather reads the nearest row, never outside the table."""
    from edgekit.pipeline import pipeline

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 3), "float32"))
    i = relax.Var("i", relax.TensorType((2,), "int64"))
    with bb.function("main", [x, i]):
        bb.emit_func_output(bb.emit(relax.op.take(x, i, axis=0)))
    target = tvm.target.Target("llvm")
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target, relax_pipeline=pipeline(target)), tvm.cpu())
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    got = vm["main"](tvm.runtime.tensor(table), tvm.runtime.tensor(np.array([1, 1000], np.int64))).numpy()
    np.testing.assert_array_equal(got, table[[1, 3]])


POOL_PROBE = """
import sys, numpy as np
from edgekit.tvm_runtime import load_vm, num_threads
num_threads()  # the pool's threads start here, in the default floating-point mode
vm = load_vm(sys.argv[1])
tiny = np.full((64, 4096), 1e-20, np.float32)  # squares are denormal: 0 where flushed
flushed = lambda y: sum(bool((row == 0).all()) for row in y)
before = flushed(vm["main"](tiny)[0])
vm["edgekit_flush_denormals_on_pool_threads"]()
after = flushed(vm["main"](tiny)[0])
print(before, after, float(np.float32(1e-20) * np.float32(1e-20)) > 0)
"""


def test_kernels_flush_denormals_on_every_thread_and_restore_the_callers_mode(tmp_path):
    """A parallel kernel over 2 threads: the calling thread's share is flushed by the kernel itself, the pool
    thread's once the pool function ran; the caller's own mode is as before every call."""
    import subprocess
    import sys

    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    from edgekit.pipeline import build

    @I.ir_module
    class Square:
        @T.prim_func(private=True)
        def square(x: T.Buffer((64, 4096), "float32"), y: T.Buffer((64, 4096), "float32")):
            for i in T.parallel(64):
                for j in range(4096):
                    y[i, j] = x[i, j] * x[i, j]

        @R.function
        def main(x: R.Tensor((64, 4096), "float32")) -> R.Tensor((64, 4096), "float32"):
            cls = Square
            return R.call_tir(cls.square, (x,), out_ty=R.Tensor((64, 4096), "float32"))

    host = targets.get("host")
    build(Square, host.tvm_target(), tmp_path / "square.so", host.cc)
    out = subprocess.run([sys.executable, "-c", POOL_PROBE, str(tmp_path / "square.so")], capture_output=True,
                         text=True, check=True, env={**os.environ, "TVM_NUM_THREADS": "2"}).stdout.split()
    assert out == ["32", "64", "True"], out


@pytest.mark.parametrize("axis,exclusive", [(1, False), (1, True), (2, False)])
def test_a_short_cumulative_sum_is_a_serial_prefix_reduction(axis, exclusive):
    """A running sum over a chunk's frames: no parallel scan (a thread-pool wake per call), values as numpy's."""
    x = RNG.standard_normal((1, 16, 35), dtype=np.float32)
    mod = module([x.shape], lambda v: relax.op.cumsum(v, axis=axis, exclusive=exclusive))
    (script,) = [s for name, s in scheduled(mod).items() if "cumsum" in name]
    assert "T.parallel" not in script and "cumsum_generic" not in script
    want = np.cumsum(x, axis=axis)
    if exclusive:
        want = np.concatenate([np.zeros_like(np.take(want, [0], axis)), np.delete(want, -1, axis)], axis)
    np.testing.assert_allclose(run(mod, x), want, rtol=1e-6, atol=1e-6)


def test_a_split_state_is_read_through_slices_fused_into_its_readers():
    """Unpacking a flat state: no split op (a kernel copying every piece, whose outputs cannot become views); each
    piece is a slice fused into its reader."""
    x = RNG.standard_normal(40, dtype=np.float32)
    mod = module([x.shape], lambda v: (lambda parts: relax.op.concat(
        [relax.op.multiply(parts[0], relax.const(np.float32(2))), relax.op.exp(parts[1]), parts[2]], axis=0))(
        relax.op.split(v, [8, 24], axis=0)))
    names = list(scheduled(mod))
    assert not any("split" in n for n in names) and len(names) == 1, names
    np.testing.assert_allclose(run(mod, x), np.concatenate([2 * x[:8], np.exp(x[8:24]), x[24:]]), rtol=1e-6)
