"""Hand-scheduled TVM kernels (TVMScript/TIR), one module per op and target."""
from __future__ import annotations

from tvm import s_tir, tirx


def fused_blocks(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list] | None:
    """A schedule of a fused PrimFunc and the blocks under its root, for a rule to inspect; None for hand-written
    TIR (scans, sorts), which has no root block and is scheduled already, and for symbolic loop extents (a
    growing KV cache): the rules size their tiles from known extents."""
    body = getattr(func, "body", None)
    if not isinstance(body, s_tir.SBlockRealize) or body.block.name_hint != "root":
        return None
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if any(not isinstance(sch.get(loop).extent, tirx.IntImm) for b in blocks for loop in sch.get_loops(b)):
        return None
    return sch, blocks


def extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)
