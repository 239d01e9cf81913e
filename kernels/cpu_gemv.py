"""CPU kernel for the matrix-vector products with constant weights that dominate a streaming step at batch 1.

A step at batch 1 reads every weight once per frame, so it is bound by how fast weights stream from memory.
TVM's default lowering of y = x @ W (W [K, N] after constant folding) walks k innermost, striding through W
column by column (about 1 GFLOP/s here). Instead:
- `PackGEMVWeights` (a Relax pass) rewrites `matmul(x, constant W)` into a `packed_gemv` kernel that reads W
  repacked at compile time as P[N/16, K, 16]: panels of 16 output columns, each stored row after row;
- `PackedGEMVSchedule` (a dlight rule, applied after fusion with the epilogue) orders the loops
  (panel, i, k, lane) with the 16 lanes unrolled: 16 accumulators in registers, weights read front to back.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import dlight

LANES = 16
KERNEL = "packed_gemv"


def _packed_gemv(x: te.Tensor, panels: te.Tensor) -> te.Tensor:
    (m, k), (p, _, lanes) = x.shape, panels.shape
    r = te.reduce_axis((0, k), name="k")
    return te.compute((m, p * lanes), lambda i, j: te.sum(x[i, r] * panels[j // lanes, r, j % lanes], axis=r),
                      name=KERNEL)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.matmul") or not isinstance(call.args[1], tvm.ir.expr.Constant):
            return call
        x, w = call.args[0], call.args[1].value.numpy()
        shape = x.ty.shape
        if w.ndim != 2 or w.shape[1] % LANES or shape is None or len(shape) != 2 or str(x.ty.dtype) != str(w.dtype):
            return call
        k, n = w.shape
        panels = np.ascontiguousarray(w.reshape(k, n // LANES, LANES).transpose(1, 0, 2))
        return self.builder_.call_te(_packed_gemv, x, relax.const(panels), primfunc_name_hint=KERNEL)


@tvm.transform.module_pass(opt_level=0, name="PackGEMVWeights")
def PackGEMVWeights(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    """Rewrite 2-D `matmul(x, constant W)` with N a multiple of 16 into the packed-panel kernel."""
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


class PackedGEMVSchedule(dlight.ScheduleRule):
    """Loops (panel, i, k, lane) for every packed_gemv block, lanes unrolled into register accumulators."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool) -> s_tir.Schedule | None:
        body = getattr(func, "body", None)
        if not isinstance(body, s_tir.SBlockRealize) or body.block.name_hint != "root":
            return None  # hand-written TIR (scans, sorts) has no root block and is scheduled already
        sch = s_tir.Schedule(func)
        blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == KERNEL]
        for block in blocks:
            i, j, k = sch.get_loops(block)
            panel, lane = sch.split(j, [None, LANES])
            sch.reorder(panel, i, k, lane)  # a panel stays in cache across the frames of a chunk
            sch.decompose_reduction(block, k)
            sch.unroll(lane)
        return sch if blocks else None
