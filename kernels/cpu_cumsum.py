"""Cumulative sums over a short axis (a streaming model's running means over a chunk) without the thread pool.

TVM legalizes cumsum as a hand-written scan whose outer loop is parallel over the other axes: at chunk 1 that
woke the thread pool for 35 additions, 2.4 us of LMUFormer-SCv2's 60 us int8 step with two threads. Over an
axis of up to SHORT values each output is instead the sum of its prefix, added in the scan's order: a plain
reduction the other rules schedule (serial below their size thresholds), fused with its neighbours.
"""
from __future__ import annotations

import tvm
from tvm import relax, te

from edgekit.kernels import call_rewrite_pass

SHORT = 64  # the prefix sums cost SHORT^2 / 2 additions per column: beyond this the scan is the better form


def prefix_sums(data: te.Tensor, axis: int, exclusive: bool) -> te.Tensor:
    k = te.reduce_axis((0, data.shape[axis]), "k")

    def value(*i):
        at = [*i[:axis], k, *i[axis + 1:]]
        inside = k < i[axis] if exclusive else k <= i[axis]
        return te.sum(tvm.tirx.Select(inside, data(*at), tvm.tirx.const(0, data.dtype)), axis=k)

    return te.compute(data.shape, value, name="cumsum")


def _short_cumsum(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if call.op != tvm.ir.Op.get("relax.cumsum") or call.attrs.axis is None:
        return call
    data = call.args[0]
    shape = data.ty.shape
    if shape is None or (call.attrs.dtype is not None and str(call.attrs.dtype) != data.ty.dtype):
        return call
    axis = int(call.attrs.axis) % len(shape)
    if not isinstance(shape[axis], tvm.tirx.IntImm) or int(shape[axis]) > SHORT:
        return call
    return bb.call_te(prefix_sums, data, axis, bool(call.attrs.exclusive), primfunc_name_hint="cumsum")


ShortCumsum = call_rewrite_pass("ShortCumsum", _short_cumsum)  # cumsum over <= SHORT values -> a prefix reduction
