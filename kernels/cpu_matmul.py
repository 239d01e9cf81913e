"""CPU schedule for products of two computed tensors: attention's q @ k^T and a @ v (batched over heads, a few
tens of rows), with their elementwise epilogue (scale, mask).

TVM's default lowering walks k innermost, reading B[k, j] down a column (a cache miss per step). Here each
tile of ROWS output rows keeps its whole row span j (up to MAX_SPAN: one head's keys or values) in vector
registers while k runs in order: one broadcast of A[i, k] and one contiguous load of B[k, :] per step.
Rows and span are padded to whole tiles and vectors (pad_einsum: 74 keys are computed as 80, B copied with
zeros); the sums are the default lowering's, term for term.
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight

from edgekit.kernels import epilogue_at, extent, fused_blocks

KERNEL = "matmul"  # the block name of a legalized relax.matmul
ROWS = 2  # rows per register tile; the row count is padded to a multiple
LANES = 16
MAX_SPAN = 128  # output columns held in registers at once (8 vectors of 16 lanes)
PARALLEL_MACS = 1 << 20  # from this size the heads (batch) are split over the cores


class BatchMatmulSchedule(dlight.ScheduleRule):
    """Loops (batch, row group, k, row, j) for a matmul block of a fused function, j one vector, rows unrolled,
    the elementwise epilogue computed per row group."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool) -> s_tir.Schedule | None:
        if (fused := fused_blocks(func)) is None:
            return None
        sch, blocks = fused
        if sch.get(blocks[0]).name_hint != KERNEL:
            return None
        block = blocks[0]
        kinds = [v.iter_type for v in sch.get(block).iter_vars]
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or len(loops) < 3 or kinds[-1] != tirx.IterVar.CommReduce \
                or any(kind != tirx.IterVar.DataPar for kind in kinds[:-1]):
            return None
        *batch, i, j, k = loops
        if extent(sch, j) > MAX_SPAN:
            return None
        macs = math.prod(extent(sch, loop) for loop in loops)
        sch.pad_einsum(block, [1] * len(batch) + [ROWS, LANES, 1])
        *batch, i, j, k = sch.get_loops(block)
        if batch and macs >= PARALLEL_MACS:
            sch.parallel(sch.fuse(*batch))
        row_group, row = sch.split(i, [None, ROWS])
        vectors, lane = sch.split(j, [None, LANES])
        sch.reorder(row_group, k, row, vectors, lane)
        sch.unroll(row)
        sch.unroll(vectors)
        sch.vectorize(lane)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))  # pad_einsum added the padding and unpadding
        epilogue_at(sch, blocks[[sch.get(b).name_hint for b in blocks].index(KERNEL) + 1:], row_group)
        sch.decompose_reduction(block, k)
        return sch
