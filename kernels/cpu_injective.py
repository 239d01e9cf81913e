"""CPU schedule for fused data movement (reshape, transpose, slice, concatenate, masked updates of a cache).

TVM's default lowering writes every step of a fused group to its own intermediate tensor and reads it back:
stacking the HMT's per-layer K/V into one cache took five passes over 600 KB. Here each step that feeds
exactly one other is inlined into it, so the group reads its inputs and writes its outputs once (4-5x faster
here). A step read by several others stays, so no arithmetic (e.g. an exp) is repeated.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight

from edgekit.kernels import fused_blocks


class InlineInjective(dlight.ScheduleRule):
    """For a function of spatial blocks only: inline every block that has a single consumer."""

    def apply(self, func: tirx.PrimFunc, target, tunable: bool) -> s_tir.Schedule | None:
        if (fused := fused_blocks(func)) is None:
            return None
        sch, blocks = fused
        if any(v.iter_type != tirx.IterVar.DataPar for b in blocks for v in sch.get(b).iter_vars):
            return None
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
        inlined = [b for b in blocks if sch.get(b).name_hint not in outputs and len(sch.get_consumers(b)) == 1]
        for block in inlined:
            sch.compute_inline(block)
        return sch if inlined else None
