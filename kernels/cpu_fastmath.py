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

from edgekit.kernels import call_rewrite_pass
from edgekit.kernels.nan_semantics import fast_erf


def _fast(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if call.op == tvm.ir.Op.get("relax.erf"):
        return bb.call_te(fast_erf, call.args[0], primfunc_name_hint="fast_erf")
    if call.op == tvm.ir.Op.get("relax.nn.softmax"):
        return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="fast_softmax")
    return call


FastErfSoftmax = call_rewrite_pass("FastErfSoftmax", _fast)  # erf, softmax -> TVM's vectorizable fast forms
