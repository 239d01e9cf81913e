"""CPU kernel for the products with constant weights (y = x @ W) that dominate a step: matrix-vector at batch 1,
a few rows in a chunked step, tens of rows in a segment-level LM.

TVM's default lowering of y = x @ W (W [K, N] after constant folding) walks k innermost, striding through W
column by column (about 1 GFLOP/s here). Instead:
- `PackGEMVWeights` (a Relax pass) rewrites `matmul(x, constant W)` into a `packed_gemv` kernel over x flattened
  to rows [M, K], reading W repacked at compile time as P[N/16, K, 16]: panels of 16 output columns, each stored
  row after row;
- `PackedGEMVSchedule` (a dlight rule, applied after fusion with the epilogue) computes a register tile of
  a few rows x panels at a time: loops (panel group, row group, k, row, panel, lane), the 16 lanes one vector,
  so each weight vector loaded is used by every row of the tile and each x value by every panel; k stays in
  order, so the sums are the ones the default lowering makes. The elementwise epilogue (bias, GELU) runs on each
  tile while it is in cache. Big products are split over the cores by panel group.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import dlight
from tvm.target.codegen import llvm_get_vector_width

from edgekit.kernels import call_rewrite_pass, epilogue_at, extent, fused_blocks

LANES = 16
KERNEL = "packed_gemv"
# Rows per register tile (each weight vector loaded serves all of them), with their speed here relative to 8 rows
# (2 rows: 0.65).
ROW_TILES = {8: 1.0, 6: 0.95}
PARALLEL_MACS = 1 << 21  # a product this big is split over the cores; a batch-1 step's are not (the launch costs more)


def _accumulators(target: tvm.target.Target) -> int:
    """16-lane accumulators for half of a 32-register file: 16 with AVX-512 (8 x 2 beat 2 x 4, 4 x 4 and 16 x 1
    here), 4 with NEON."""
    return max(llvm_get_vector_width(target) // 32, 1)


def _row_tile(rows: int, target: tvm.target.Target) -> int:
    """The quickest tile for `rows` counting the padding (34 rows run as 36 in tiles of 6, 74 as 80 in tiles of 8);
    fewer rows: all of them. A padded row count gets back the tile it was padded for."""
    tiles = {tile: speed for tile, speed in ROW_TILES.items() if tile <= _accumulators(target)}
    tiles = tiles or {_accumulators(target): 1.0}
    if rows <= min(tiles):
        return rows
    return min(tiles, key=lambda tile: -(-rows // tile) * tile / tiles[tile])


def _packed_gemv(x: te.Tensor, panels: te.Tensor, rows: int) -> te.Tensor:
    """x [M, K] @ W as panels [N/16, K, 16], M rounded up to whole tiles of `rows`: the extra rows repeat x's
    last row (a clamped index, hoisted out of the k loop; no test inside it) and are dropped at the end."""
    (m, k), (p, _, lanes) = x.shape, panels.shape
    padded = -(-m // rows) * rows
    row = (lambda i: i) if padded == m else (lambda i: te.min(i, m - 1))
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((padded, p * lanes), lambda i, j: te.sum(x[row(i), r] * panels[j // lanes, r, j % lanes], axis=r),
                   name=KERNEL)
    return y if padded == m else te.compute((m, p * lanes), lambda i, j: y[i, j], name="unpad")


def _static_shape(expr: relax.Expr) -> list[int] | None:
    shape = expr.ty.shape
    if shape is None or not all(isinstance(s, tirx.IntImm) for s in shape):
        return None
    return [int(s) for s in shape]


def _pack(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if call.op != tvm.ir.Op.get("relax.matmul") or not isinstance(call.args[1], tvm.ir.expr.Constant):
        return call
    x, w = call.args[0], call.args[1].value.numpy()
    shape = _static_shape(x)
    if w.ndim != 2 or w.shape[1] % LANES or shape is None or len(shape) < 2 or str(x.ty.dtype) != str(w.dtype):
        return call
    k, n = w.shape
    panels = np.ascontiguousarray(w.reshape(k, n // LANES, LANES).transpose(1, 0, 2))
    rows = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, (math.prod(shape[:-1]), k)))
    tile = _row_tile(math.prod(shape[:-1]), tvm.target.Target.current())
    y = bb.call_te(_packed_gemv, rows, relax.const(panels), tile, primfunc_name_hint=KERNEL)
    return y if len(shape) == 2 else relax.op.reshape(bb.emit(y), (*shape[:-1], n))


# `matmul(x, constant W)` (x of any rank >= 2, N a multiple of 16) -> the packed-panel kernel (run under the
# build's target: the row tile depends on its vector registers)
PackGEMVWeights = call_rewrite_pass("PackGEMVWeights", _pack)


class PackedGEMVSchedule(dlight.ScheduleRule):
    """Register-tiled loops for the packed_gemv block of a fused function, its elementwise epilogue at each tile."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool) -> s_tir.Schedule | None:
        if (fused := fused_blocks(func)) is None:
            return None
        sch, blocks = fused
        names = [sch.get(b).name_hint for b in blocks]
        if names.count(KERNEL) != 1:
            return None
        at = names.index(KERNEL)
        self._tile(sch, blocks[at], blocks[at + 1:], target)
        return sch

    @staticmethod
    def _tile(sch: s_tir.Schedule, block, steps: list, target: tvm.target.Target) -> None:
        i, j, k = sch.get_loops(block)
        rows, cols, depth = extent(sch, i), extent(sch, j), extent(sch, k)
        row_tile = _row_tile(rows, target)
        panels = cols // LANES
        panel_tile = max(p for p in (8, 4, 2, 1) if panels % p == 0 and row_tile * p <= _accumulators(target))
        panel, lane = sch.split(j, [None, LANES])
        group, panel = sch.split(panel, [None, panel_tile])
        row_group, row = sch.split(i, [None, row_tile])
        sch.reorder(group, row_group, k, row, panel, lane)
        sch.unroll(row)
        sch.unroll(panel)
        sch.vectorize(lane)
        if rows * cols * depth >= PARALLEL_MACS:
            sch.parallel(group)
        if (epilogue := epilogue_at(sch, steps, row_group)) is not None:
            inner = sch.get_loops(epilogue)[-1]
            if extent(sch, inner) % LANES == 0:
                sch.vectorize(sch.split(inner, [None, LANES])[1])
        sch.decompose_reduction(block, k)
