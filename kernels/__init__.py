"""Hand-scheduled TVM kernels (TVMScript/TIR), one module per op and target."""
from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax, s_tir, tirx


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


def epilogue_at(sch: s_tir.Schedule, steps: list, loop):
    """The elementwise steps after a product (bias, GELU; scale, mask) as one block computed under `loop`, so they
    run on each tile while it is in cache; returns that block (None without steps)."""
    for step in steps[:-1]:
        sch.compute_inline(step)
    if not steps:
        return None
    sch.reverse_compute_at(steps[-1], loop)
    return steps[-1]


def call_rewrite_pass(name: str, rewrite: Callable[..., relax.Expr], bindings: bool = False) -> tvm.transform.Pass:
    """A module pass applying rewrite(builder, call) -> expr to every call of every Relax function, inner calls
    first (the rewrite returns the call itself to keep it). `bindings`: the rewrite also gets a lookup from a
    dataflow variable to the expression bound to it (to see where an argument comes from)."""

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            return rewrite(self.builder_, call, self.lookup_binding) if bindings else rewrite(self.builder_, call)

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = Rewriter(mod)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return run
