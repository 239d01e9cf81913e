"""CPU schedule for fused data movement (reshape, transpose, slice, concatenate, masked updates of a cache).

TVM's default lowering writes every step of a fused group to its own intermediate tensor and reads it back:
stacking the HMT's per-layer K/V into one cache took five passes over 600 KB. Here each step that feeds
exactly one other is inlined into it, so the group reads its inputs and writes its outputs once (4-5x faster
here). A step read by several others stays, so no arithmetic (e.g. an exp) is repeated.

A concatenation computes each element as a chain of if_then_else over the inputs' offsets along its axis, and
LLVM evaluates the whole chain for every element (a select per input, with the index arithmetic of each): packing
a recurrent model's state of 2,633 values from 11 pieces took 6 us. Its loop over that axis is split at the
offsets, one loop per input, where the chain simplifies to that input's copy (1.3 us with the call).

Unpacking the state is the reverse: a split of the flat state vector is one kernel writing every piece, whose
outputs TVM cannot turn into views, so each piece's reshape was a kernel too (a tenth of an int8 chunk-1 step in
calls alone). As strided slices instead, each piece fuses into the kernel that reads it.
"""
from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight

from edgekit.kernels import call_rewrite_pass, extent, fused_blocks


def _split_as_slices(bb, call: relax.Call) -> relax.Expr:
    if call.op != tvm.ir.Op.get("relax.split") or call.args[0].ty.shape is None:
        return call
    x, at = call.args[0], call.attrs.indices_or_sections
    axis = int(call.attrs.axis) % len(x.ty.shape)
    size = x.ty.shape[axis]
    if not isinstance(size, tvm.ir.prim.expr.IntImm):
        return call
    size = int(size)
    if isinstance(at, tvm.ir.prim.expr.IntImm):
        if size % int(at):
            return call
        at = range(size // int(at), size, size // int(at))
    edges = [0, *(int(i) for i in at), size]
    return relax.Tuple([bb.emit(relax.op.strided_slice(x, [axis], [a], [b])) for a, b in zip(edges, edges[1:])])


SplitAsSlices = call_rewrite_pass("SplitAsSlices", _split_as_slices)  # split -> one strided slice per piece


class InlineInjective(dlight.ScheduleRule):
    """For a function of spatial blocks only: inline every block that has a single consumer, then give each piece
    of a concatenation its own loop."""

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
        split = [_split_at_pieces(sch, b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
        return sch if inlined or any(split) else None


def _split_at_pieces(sch: s_tir.Schedule, block) -> bool:
    """Split the loop of the axis a block's if_then_else chain tests against constants (a concatenation's) at
    those constants; whether it did."""
    stmt = sch.get(block)
    if not isinstance(stmt.body, tirx.BufferStore) or len(sch.get_loops(block)) != len(stmt.iter_vars):
        return False
    var, cuts = None, set()
    value = stmt.body.value
    while isinstance(value, tvm.ir.Call) and value.op.name.endswith("if_then_else"):
        test = value.args[0]
        if isinstance(test, tvm.ir.prim.expr.LE) and isinstance(test.a, tvm.ir.prim.expr.IntImm):
            edge, on = int(test.a.value), test.b  # c <= v: v's piece starts at c
        elif isinstance(test, tvm.ir.prim.expr.LT) and isinstance(test.b, tvm.ir.prim.expr.IntImm):
            edge, on = int(test.b.value), test.a  # v < c: the next piece starts at c
        else:
            break
        if not isinstance(on, tirx.Var) or (var is not None and not on.same_as(var)):
            break
        var = on
        cuts.add(edge)
        value = value.args[2]
    axis = next((i for i, v in enumerate(stmt.iter_vars) if var is not None and v.var.same_as(var)), None)
    if axis is None:
        return False
    loop = sch.get_loops(block)[axis]
    edges = [0, *sorted(c for c in cuts if 0 < c < extent(sch, loop))]
    if len(edges) < 2:
        return False
    sch.loop_partition(loop, [b - a for a, b in zip(edges, edges[1:])])  # the last piece: the rest of the loop
    return True
