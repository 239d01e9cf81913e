"""CPU kernels for int8 products (edgekit.quantize): fp32 rows in, int8 codes and int32 dot products inside,
fp32 rows out, one kernel per product.

TVM's ONNX importer spreads an int8 product over a dozen ops (the row's abs-max and scale, divide, round, clip, a
cast emulated with masks, int32 casts, an int32 matmul whose int8 weights FoldConstant turns into int32, the
scale epilogue): five kernels per product with scalar loops for the matmul. `Int8DotKernels` (a Relax pass before
FoldConstant) finds that pattern, checks that it is exactly edgekit.quantize's scheme, and replaces it
with one hand-written kernel that quantizes each row in registers (the same fp32 operations in the same order:
codes and scales agree bit for bit with the PyTorch reference), runs the dot products on the target's instruction
over the weights stored as int8 and repacked for it, and applies the scales. The instruction set is read off the
target's features, never assumed:

- `avx512-vnni` (x86 with AVX-512 VNNI): `vpdpbusd`, u8 x s8 -> s32, 16 columns x 4 k per instruction. The codes
  are signed, so they go in as code + 128 (the sign bit flipped) and the accumulators start at -128 * column sum.
- `sdot` (Armv8.2 dotprod: Cortex-A76/A78, Pi 5, Orin's CPU): s8 x s8 -> s32, 4 columns x 4 k.
- `avx512-bw`, `avx2` (x86 without VNNI): the same tiles in three instructions, as int8 libraries did before VNNI:
  `vpmaddubsw` multiplies |code| (u8) by the weight with the code's sign moved onto it (s8) and adds pairs to s16,
  `vpmaddwd` by ones adds those pairs to s32. Exact, as codes are symmetric: a pair is at most 2 x 127 x 127 =
  32,258, under the s16 saturation at 32,767. 16 columns per instruction on AVX-512BW, 8 on AVX2.
- `generic` (other CPUs, Cortex-A72 of the Pi 4, and products whose N is not a multiple of the lanes): a plain
  int32 reduction over K, which LLVM vectorizes for the target (smull/addv on the A72).

The instructions are called through `T.call_llvm_pure_intrin` (TVM's `tensorize` crashes with the pinned tvm-ffi
and its shipped VNNI intrinsic no longer verifies with LLVM 22). A register tile of `rows` rows x `tile` groups of
columns: every weight vector loaded serves all rows of the tile. A row holding NaN or infinity gets a NaN scale
(a probe sums x * 0), so its outputs are NaN as in PyTorch.
"""
from __future__ import annotations

from functools import cache

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T
from tvm.target import codegen

from edgekit.kernels import call_rewrite_pass
from edgekit.kernels.cpu_gemv import PARALLEL_MACS
from edgekit.quantize import QMAX, TINY

VEC = 16  # fp32 lanes of the row quantization
SIGN_BITS = -0x7F7F7F80  # 0x80808080 as int32: flips the sign bit of 4 packed int8 codes (code + 128 as u8)
LANES = {"avx512-vnni": 16, "sdot": 4, "avx512-bw": 16, "avx2": 8}  # int32 columns per instruction
ACCUMULATORS = {"avx512-vnni": 16, "sdot": 16, "avx512-bw": 16, "avx2": 8}  # vector registers a tile may hold
INTRINSICS = {"avx512-vnni": ("llvm.x86.avx512.vpdpbusd.512", "int8x64", "int32x16"),
              "sdot": ("llvm.aarch64.neon.sdot.v4i32.v16i8", "int8x16", "int32x4"),
              "avx512-bw": (("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"), "int8x64", "int32x16"),
              "avx2": (("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"), "int8x32", "int32x8")}


def isa(target: tvm.target.Target) -> str:
    """The dot-product instruction set the int8 products use on `target` (read off its LLVM features)."""
    arm = str(target.attrs.get("mtriple", "")).startswith("aarch64")
    if arm and codegen.target_has_features("dotprod", target):
        return "sdot"
    if not arm and codegen.target_has_features("avx512vnni", target):
        return "avx512-vnni"
    if not arm and codegen.target_has_features("avx512bw", target):
        return "avx512-bw"
    if not arm and codegen.target_has_features("avx2", target):
        return "avx2"
    return "generic"


def _group(panels: int) -> int:
    """Panels of columns stored interleaved, k by k: a tile of them reads one run of memory per 4 k instead of one
    stream per panel (the same for every row count, so all entries of a model share one weight constant)."""
    return next(g for g in (4, 2, 1) if panels % g == 0)


def _rows(m: int) -> int:
    return next(r for r in (4, 2, 1) if m % r == 0)


def _quantize_rows(k: int, rows: int, width: int):
    """A TVMScript macro: rows [i0, i0 + rows) of x [M, K] as int8 codes q [rows, width] (zeros past K) and scales
    s [rows], as edgekit.quantize computes them: 16 lanes at a time, then the K % 16 left one by one."""
    body = k // VEC * VEC

    @T.macro
    def quantize(x, i0, q, s):
        for r in range(rows):
            peak = T.decl_buffer((VEC,), "float32", scope="local")
            probe = T.decl_buffer((VEC,), "float32", scope="local")
            peak[T.ramp(0, 1, VEC)] = T.broadcast(T.float32(0), VEC)
            probe[T.ramp(0, 1, VEC)] = T.broadcast(T.float32(0), VEC)
            for ko in range(k // VEC):
                v = x.vload([i0 + r, ko * VEC], f"float32x{VEC}")
                peak[T.ramp(0, 1, VEC)] = T.max(peak[T.ramp(0, 1, VEC)], T.fabs(v))
                probe[T.ramp(0, 1, VEC)] = probe[T.ramp(0, 1, VEC)] + v * T.broadcast(T.float32(0), VEC)
            for t in range(k - body):
                peak[0] = T.max(peak[0], T.fabs(x[i0 + r, body + t]))
                probe[0] = probe[0] + x[i0 + r, body + t] * T.float32(0)
            total = T.decl_buffer((2,), "float32", scope="local")
            total[0] = T.float32(0)
            total[1] = T.float32(0)
            for lane in range(VEC):
                total[0] = T.max(total[0], peak[lane])
                total[1] = total[1] + probe[lane]
            s[r] = total[0] / T.float32(QMAX) + total[1]
            for ko in range(k // VEC):
                v = x.vload([i0 + r, ko * VEC], f"float32x{VEC}") / T.broadcast(T.max(s[r], T.float32(TINY)), VEC)
                c = T.min(T.max(T.round(v), T.broadcast(T.float32(-QMAX), VEC)), T.broadcast(T.float32(QMAX), VEC))
                q[r, T.ramp(ko * VEC, 1, VEC)] = T.Cast(f"int8x{VEC}", c)
            for t in range(k - body):
                c = T.round(x[i0 + r, body + t] / T.max(s[r], T.float32(TINY)))
                q[r, body + t] = T.Cast("int8", T.min(T.max(c, T.float32(-QMAX)), T.float32(QMAX)))
            for t in range(width - k):
                q[r, k + t] = T.int8(0)

    return quantize


def _dot4(kind: str):
    """(acc, xs, ws) -> acc (int32 lanes) + the 4-k dot product of the broadcast codes xs with each lane's 4
    weights ws, on `kind`'s instructions (see the module docstring); called while TVMScript parses the kernel."""
    name, operand, acc_type = INTRINSICS[kind]
    if isinstance(name, str):
        def one_instruction(acc, xs, ws):
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), acc, xs, ws, dtype=acc_type)

        return one_instruction
    bytes_, pairs = int(operand.split("x")[1]), f"int16x{int(operand.split('x')[1]) // 2}"
    madd_u8s8, madd_s16 = name

    def three_instructions(acc, xs, ws):
        zero = T.broadcast(T.int8(0), bytes_)
        negative = xs < zero
        sums = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(madd_u8s8), T.Select(negative, zero - xs, xs),
                                       T.Select(negative, zero - ws, ws), dtype=pairs)
        return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(madd_s16), sums,
                                             T.broadcast(T.int16(1), bytes_ // 2), dtype=acc_type)

    return three_instructions


def start_offsets(kind: str, codes: np.ndarray) -> np.ndarray:
    """Where each column's accumulator starts: -128 x its weight sum on VNNI (the codes go in as code + 128), else 0."""
    return (-128 * codes.astype(np.int64).sum(axis=0) if kind == "avx512-vnni" else np.zeros(codes.shape[1])
            ).astype(np.int32)


@cache  # parsing TVMScript costs ~0.1 s; a chunked step repeats the same shapes
def dot_kernel(kind: str, m: int, k: int, n: int) -> tirx.PrimFunc:
    """x [M, K] fp32, packed weights [N/(L G), K4/4, G, 4L] int8 (K4: K rounded up to 4, zero rows; G: `_group`),
    start [N] int32, weight scales [N] -> [M, N] fp32 with the instruction of `kind`; the accumulators start at
    `start` (`start_offsets`)."""
    lanes, k4, budget = LANES[kind], -(-k // 4) * 4, ACCUMULATORS[kind]
    _, operand, acc_type = INTRINSICS[kind]
    panels = n // lanes
    group = _group(panels)
    rows = next(r for r in (4, 2, 1) if m % r == 0 and r * group <= budget)
    tile = next(p for p in (budget // rows, 4, 2, 1) if panels % p == 0 and p * rows <= budget and p % group == 0)
    flip = SIGN_BITS if kind == "avx512-vnni" else 0
    outer = T.parallel if m * k * n >= PARALLEL_MACS and m > rows else T.serial
    quantize = _quantize_rows(k, rows, k4)
    dot4 = _dot4(kind)

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), w: T.Buffer((panels // group, k4 // 4, group, lanes * 4), "int8"),
               start: T.Buffer((n,), "int32"), sw: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for rb in outer(m // rows):
            q = T.decl_buffer((rows, k4), "int8", scope="local")
            s = T.decl_buffer((rows,), "float32", scope="local")
            quantize(x, rb * rows, q, s)
            for g in range(panels // tile):
                acc = T.decl_buffer((rows * tile * lanes,), "int32", scope="local")
                for r in T.unroll(rows):
                    for p in T.unroll(tile):
                        acc[T.ramp((r * tile + p) * lanes, 1, lanes)] = start.vload([(g * tile + p) * lanes], acc_type)
                for ko in range(k4 // 4):
                    for r in T.unroll(rows):
                        word = T.bitwise_xor(T.reinterpret(q.vload([r, ko * 4], "int8x4"), dtype="int32"),
                                             T.int32(flip))
                        xs = T.reinterpret(T.broadcast(word, lanes), dtype=operand)
                        for p in T.unroll(tile):
                            acc[T.ramp((r * tile + p) * lanes, 1, lanes)] = dot4(
                                acc[T.ramp((r * tile + p) * lanes, 1, lanes)], xs,
                                w.vload([(g * tile + p) // group, ko, (g * tile + p) % group, 0], operand))
                for r in T.unroll(rows):
                    for p in T.unroll(tile):
                        y[rb * rows + r, T.ramp((g * tile + p) * lanes, 1, lanes)] = \
                            T.Cast(f"float32x{lanes}", acc[T.ramp((r * tile + p) * lanes, 1, lanes)]) * \
                            sw.vload([(g * tile + p) * lanes], f"float32x{lanes}") * T.broadcast(s[r], lanes)

    return kernel.with_attr("global_symbol", f"int8_{kind.replace('-', '_')}_{m}x{k}x{n}")


@cache
def generic_kernel(m: int, k: int, n: int) -> tirx.PrimFunc:
    """x [M, K] fp32, weights [N, K] int8 (K contiguous), weight scales [N] -> [M, N] fp32: the dot products a
    plain int32 reduction for LLVM to vectorize with whatever the target has."""
    rows = _rows(m)
    quantize = _quantize_rows(k, rows, k)

    @T.prim_func
    def kernel(x: T.Buffer((m, k), "float32"), w: T.Buffer((n, k), "int8"), sw: T.Buffer((n,), "float32"),
               y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for rb in range(m // rows):
            q = T.decl_buffer((rows, k), "int8", scope="local")
            s = T.decl_buffer((rows,), "float32", scope="local")
            quantize(x, rb * rows, q, s)
            for r, j in T.grid(rows, n):
                acc = T.decl_buffer((1,), "int32", scope="local")
                acc[0] = 0
                for kk in range(k):
                    acc[0] = acc[0] + T.Cast("int32", q[r, kk]) * T.Cast("int32", w[j, kk])
                y[rb * rows + r, j] = T.Cast("float32", acc[0]) * sw[j] * s[r]

    return kernel.with_attr("global_symbol", f"int8_generic_{m}x{k}x{n}")


def pack(codes: np.ndarray, lanes: int) -> np.ndarray:
    """Weights [K, N] -> [N/(L G), K4/4, G, 4L]: panels of L columns in groups of G (`_group`); within a group,
    each 4 k of every panel in turn, column by column (K padded with zero rows to K4, a multiple of 4)."""
    codes = np.pad(codes, ((0, -codes.shape[0] % 4), (0, 0)))
    k, n = codes.shape
    group = _group(n // lanes)
    return np.ascontiguousarray(codes.reshape(k // 4, 4, n // lanes // group, group, lanes).transpose(2, 0, 3, 4, 1)
                                .reshape(n // lanes // group, k // 4, group, lanes * 4))


def _op(expr, name: str, lookup) -> relax.Call | None:
    """The call of relax op `name` that `expr` is (or is bound to), else None."""
    bound = lookup(expr) if isinstance(expr, relax.Var) else expr
    return bound if isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get(f"relax.{name}") else None


def _constant(expr, lookup=None) -> np.ndarray | None:
    """A constant's value; with `lookup`, also that of a constant widened by astype (as the importer leaves the
    weights of MatMulInteger, before FoldConstant would materialise them as int32)."""
    if lookup is not None and (cast := _op(expr, "astype", lookup)) is not None:
        expr = cast.args[0]
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _derives_from(expr, source, lookup, depth: int = 32) -> bool:
    """Whether `expr` is computed from `source` along first arguments (the codes' elementwise chain)."""
    for _ in range(depth):
        if expr.same_as(source):
            return True
        bound = lookup(expr) if isinstance(expr, relax.Var) else expr
        if not isinstance(bound, relax.Call) or not bound.args:
            return False
        first = bound.args[0]
        expr = bound.args[1].fields[0] if isinstance(first, tvm.ir.GlobalVar) else first
    return False


def _match(call: relax.Call, lookup) -> tuple[relax.Expr, np.ndarray, np.ndarray] | None:
    """(x, int8-valued weights [K, N], weight scales [N]) if `call` ends an edgekit int8 product:
    (float(matmul(int32(codes of x + 128) - 128, W)) * s_w) * s_x with s_x = max|x| / 127 per row."""
    if (outer := _op(call, "multiply", lookup)) is None or (inner := _op(outer.args[0], "multiply", lookup)) is None \
            or (sw := _constant(inner.args[1])) is None or (cast := _op(inner.args[0], "astype", lookup)) is None \
            or (mm := _op(cast.args[0], "matmul", lookup)) is None or (w := _constant(mm.args[1], lookup)) is None:
        return None
    if (scale := _op(outer.args[1], "divide", lookup)) is None or _constant(scale.args[1]) != QMAX or \
            (peak := _op(scale.args[0], "max", lookup)) is None or (absx := _op(peak.args[0], "abs", lookup)) is None:
        return None
    x, centred = absx.args[0], _op(mm.args[0], "subtract", lookup)  # (codes + 128 as uint8) - zero point 128
    codes = _op(centred.args[0], "astype", lookup) if centred is not None else None
    shape = [int(d) for d in x.ty.shape] if x.ty.shape is not None else []
    if codes is None or str(codes.args[0].ty.dtype) != "uint8" or _constant(centred.args[1], lookup) != 128 or \
            not _derives_from(codes.args[0], x, lookup) or \
            len(shape) != 2 or str(x.ty.dtype) != "float32" or w.ndim != 2 or np.abs(w).max(initial=0) > QMAX or \
            sw.shape != (w.shape[1],):
        return None
    return x, w, sw.astype(np.float32)


def _rewrite(bb: relax.BlockBuilder, call: relax.Call, lookup) -> relax.Expr:
    if (found := _match(call, lookup)) is None:
        return call
    x, w, sw = found
    (m, k), n = [int(d) for d in x.ty.shape], w.shape[1]
    kind, codes = isa(tvm.target.Target.current()), w.astype(np.int8)
    if kind == "generic" or n % LANES[kind]:
        func = generic_kernel(m, k, n)
        args = [x, relax.const(np.ascontiguousarray(codes.T)), relax.const(sw)]
    else:
        func = dot_kernel(kind, m, k, n)
        args = [x, relax.const(pack(codes, LANES[kind])), relax.const(start_offsets(kind, codes)), relax.const(sw)]
    gv = bb.add_func(func, func.attrs["global_symbol"])
    return relax.call_tir(gv, args, out_ty=relax.TensorType((m, n), "float32"))


# An int8 product as ONNX spells it -> one kernel on the target's dot-product instruction, the weights stored as
# int8 (before FoldConstant, which would compile and run a cast of every weight to int32; the quantization ops left
# behind are dead, for DeadCodeElimination)
Int8DotKernels = call_rewrite_pass("Int8DotKernels", _rewrite, bindings=True)
