"""CPU schedule for row-wise reductions with their elementwise steps: softmax (max, exp, sum, divide) and layer
norm (sum, mean, variance, scale), over rows of a few hundred values at most.

TVM's default lowering runs each step over the whole tensor before the next, and each row's sum as one serial
chain (one add per FP latency, about 4 cycles). Here all steps run row by row while the row is in L1, and each
reduction is split into up to LANES interleaved partial results (rfactor) held in one vector register, combined
at the end: about one vector op per 16 values. This changes the order of the additions, as any vectorized
softmax or layer norm does (ONNX Runtime's included).
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight

from edgekit.kernels import extent, fused_blocks

LANES = 16
PARALLEL_VALUES = 1 << 14  # from this size the rows are split over the cores


def _kinds(sch: s_tir.Schedule, block) -> str:
    return "".join("S" if v.iter_type == tirx.IterVar.DataPar else "R" if v.iter_type == tirx.IterVar.CommReduce
                   else "O" for v in sch.get(block).iter_vars)


def lanes(extent: int) -> int:
    """Partial results for a reduction over `extent` values: the most that divide it evenly, up to LANES."""
    return max(d for d in range(1, LANES + 1) if extent % d == 0)


class RowReductionSchedule(dlight.ScheduleRule):
    """Every block under one loop over the rows; row reductions as vectors of partial results."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool) -> s_tir.Schedule | None:
        if (fused := fused_blocks(func)) is None:
            return None
        sch, blocks = fused
        kinds = [_kinds(sch, b) for b in blocks]
        rows = len(kinds[-1]) - 1  # the last block maps rows x columns
        if len(blocks) < 2 or rows < 1 or kinds[-1] != "S" * (rows + 1) or not any("R" in k for k in kinds):
            return None
        row_extents = [extent(sch, loop) for loop in sch.get_loops(blocks[-1])[:rows]]
        for block, kind in zip(blocks, kinds):
            loops = sch.get_loops(block)
            if kind not in ("S" * rows, "S" * (rows + 1), "S" * rows + "R") or len(loops) != len(kind) \
                    or [extent(sch, loop) for loop in loops[:rows]] != row_extents \
                    or (kind.endswith("R") and lanes(extent(sch, loops[-1])) == 1):
                return None
        for block, kind in zip(blocks[:-1], kinds):
            if kind == kinds[-1] and len(sch.get_consumers(block)) == 1:  # e.g. x - max, read once by exp
                sch.compute_inline(block)
        partials = []
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if _kinds(sch, block).endswith("R"):
                loop = sch.get_loops(block)[-1]
                partials.append(sch.rfactor(sch.split(loop, [None, lanes(extent(sch, loop))])[1], rows))
        row = sch.fuse(*sch.get_loops(blocks[-1])[:rows])
        if math.prod(extent(sch, loop) for loop in sch.get_loops(blocks[-1])) >= PARALLEL_VALUES:
            sch.parallel(row)
        for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
            sch.compute_at(block, row)
        for block in partials:  # loops (row, lane, step), or (row, lane) for a single step
            lane, *step = sch.get_loops(block)[1:]
            sch.reorder(*step, lane)
            sch.vectorize(lane)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            inner = sch.get_loops(block)[1:]
            if _kinds(sch, block) == kinds[-1] and extent(sch, inner[-1]) % LANES == 0:
                sch.vectorize(sch.split(inner[-1], [None, LANES])[1])
        return sch
