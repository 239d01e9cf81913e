"""NaN propagates through the compiled graph as it does in PyTorch and ONNX Runtime.

TVM lowers ReLU to max(x, 0), which LLVM and CUDA compute as "the larger of the two, ignoring a NaN": a NaN frame
then vanished into finite outputs. Here ReLU is `x < 0 ? 0 : x` (a NaN is not < 0, so it passes), and TVM's fast
erf, which clamps its input with min/max, passes a NaN input through unchanged.
"""
from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi

from edgekit.kernels import call_rewrite_pass


def relu(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < tirx.const(0, x.dtype), tirx.const(0, x.dtype), x(*i)),
                      name="relu", tag=topi.tag.ELEMWISE)


def fast_erf(x: te.Tensor) -> te.Tensor:
    approx = topi.fast_erf(x)
    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), approx(*i)), name="fast_erf",
                      tag=topi.tag.ELEMWISE)


def _rewrite(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if call.op == tvm.ir.Op.get("relax.nn.relu"):
        return bb.call_te(relu, call.args[0], primfunc_name_hint="relu")
    return call


NaNPropagatingReLU = call_rewrite_pass("NaNPropagatingReLU", _rewrite)
