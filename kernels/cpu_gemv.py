"""CPU schedule for the matrix-vector products that dominate a streaming step at batch 1.

After constant folding, an ONNX Gemm becomes y[i, j] = sum_k x[i, k] * W[k, j] with W stored [K, N].
TVM's default CPU lowering walks k innermost, striding through W column by column (about 1 GFLOP/s here).
This schedule keeps 16 outputs in registers and streams W row by row: loops (i, j_outer, k, j_inner),
j_inner unrolled so LLVM emits vector FMAs over contiguous weights.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight

LANES = 16
REDUCE = 2  # tirx.IterVar.CommReduce


class OuterReductionGEMV(dlight.ScheduleRule):
    """Reorders every single-reduction matmul block whose output width is a multiple of LANES."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        scheduled = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            stmt = sch.get(block)
            kinds = [iv.iter_type for iv in stmt.iter_vars]
            if not stmt.name_hint.startswith("matmul") or kinds.count(REDUCE) != 1 or kinds[-1] != REDUCE:
                continue
            *spatial, k = sch.get_loops(block)
            if len(spatial) != len(kinds) - 1 or int(sch.get(spatial[-1]).extent) % LANES:
                continue
            j_outer, j_inner = sch.split(spatial[-1], [None, LANES])
            sch.reorder(*spatial[:-1], j_outer, k, j_inner)
            sch.decompose_reduction(block, k)
            sch.unroll(j_inner)
            scheduled = True
        return sch if scheduled else None
