"""erf (in GELU) and softmax's exp as polynomials the CPU can vectorize.

TVM lowers `erf` and `exp` to one libm call per element, which LLVM cannot vectorize: in a segment step GELU's
erf cost more than the matrix product feeding it. TVM's own polynomial forms (`topi.fast_erf`, and
`topi.nn.fast_softmax` with `fast_exp`) are plain arithmetic, within 3e-7 of erf and 2.5e-7 (relative) of exp
here. fast_exp clamps its input to +-88.4 (values under e^-88 become 0, masked scores e^-1e9 included): harmless
for softmax, whose inputs are shifted to <= 0, so bare `exp` ops (Aaren's scan, with its -inf guards) keep libm.
"""
from __future__ import annotations

import tvm
from tvm import relax, topi


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == tvm.ir.Op.get("relax.erf"):
            return self.builder_.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="fast_erf")
        if call.op == tvm.ir.Op.get("relax.nn.softmax"):
            return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis),
                                         primfunc_name_hint="fast_softmax")
        return call


@tvm.transform.module_pass(opt_level=0, name="FastErfSoftmax")
def FastErfSoftmax(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    """Rewrite `erf` and `softmax` into TVM's vectorizable fast_erf and fast_softmax."""
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
