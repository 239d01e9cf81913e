"""Quantization: how a model's products with constant weights compute, for every family and unit at once.

Every family routes its products with constant weights (linear layers, 1x1 and windowed convolutions, attention
projections, heads) through `torch.nn.functional.linear`, and only those: what is numerically delicate stays
fp32 because it is written as plain tensor maths (memory recurrences, norms, softmax, attention scores and their
running max and sums, Kahan accumulators, running means). Inside `products("int8")` (a torch function mode, like
autocast) each such product becomes:

    weights   int8, symmetric, per output channel: s_w = max|W[n, :]| / 127, codes round(W / s_w)  (constants)
    input     int8, symmetric, per row at run time: s_x = max|x[m, :]| / 127, codes round(x / s_x)
    product   int32 accumulation (ONNX MatMulInteger over codes + 128 with zero point 128; edgekit's kernels
              use vpdpbusd / sdot)
    epilogue  y = (acc * s_w) * s_x + b in fp32

Rounding is half to even everywhere (torch.round, ONNX Round and TVM's round agree). The same module is the
export (the ONNX graph that TVM compiles and ONNX Runtime runs in integers) and the quantized reference that
validation checks the artifact against (eager, in fp32 as the artifact computes it, the product exact in int32).
A row of zeros quantizes to zeros; a row holding NaN gives NaN outputs (its scale is NaN).
"""
from __future__ import annotations

import contextlib
import copy
from functools import cache
from typing import Iterator

import numpy as np

SCHEMES = ("none", "int8")
QMAX = 127
TINY = float(np.finfo(np.float32).tiny)  # divisor floor for an all-zero row (a normal float: FTZ keeps it)
KEPT_FP32 = "memory recurrences, norms, softmax and attention scores, running max/sums, Kahan accumulators, " \
            "running means, embeddings (gathers)"


@cache
def _torch_side() -> tuple[type, type]:
    """The torch classes (torch is imported only where a model is quantized, never by the compiled kernels):
    an exact int8 x int8 -> int32 product exported as ONNX MatMulInteger, and the function mode."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class MatMulInteger(torch.autograd.Function):
        """uint8 codes + 128 [M, K] x int8 weights [K, N] -> int32, exact, with zero point 128 (the form ONNX
        Runtime runs fast: its int8 x int8 kernel is ~10x slower here)."""

        @staticmethod
        def forward(ctx, shifted, weights):
            return (shifted.to(torch.int32) - 128) @ weights.to(torch.int32)

        @staticmethod
        def symbolic(g, shifted, weights):
            zero = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
            return g.op("MatMulInteger", shifted, weights, zero)

    class Int8Products(TorchFunctionMode):
        """Inside this mode every F.linear runs `int8_linear`."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                x, weight, bias = (*args, None, None)[:3]
                return int8_linear(x, weight, kwargs.get("bias", bias))
            return func(*args, **kwargs)

    return MatMulInteger, Int8Products


def weight_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel symmetric int8 codes of W [N, K] (transposed to [K, N], the product's layout) and the
    scales [N], in fp32; a channel of zeros gets scale 1."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1) / np.float32(QMAX)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(w / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return np.ascontiguousarray(codes.T), scale


def activation_codes(x):
    """Per row symmetric int8 codes of x [M, K] (a torch tensor; the codes as integral floats) and the scales
    [M, 1]."""
    import torch

    scale = x.abs().amax(dim=-1, keepdim=True) / QMAX
    return torch.round(x / torch.clamp(scale, min=TINY)).clamp(-QMAX, QMAX), scale


def int8_linear(x, weight, bias):
    """F.linear with int8 weights and activations (the module docstring's scheme), in x's float dtype. The weights
    become constants: they are read as values here, so a traced export stores their codes, not the fp32 maths."""
    import torch

    codes, scale = weight_codes(weight.detach().to(torch.float32).numpy())
    rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
    qx, sx = activation_codes(rows)
    acc = _torch_side()[0].apply((qx + 128).to(torch.uint8), torch.from_numpy(codes)).to(torch.float32)
    y = acc * torch.from_numpy(scale) * sx  # this order: ONNX Runtime's MatMulIntegerToFloat fusion mis-computes
    if bias is not None:                    # acc * (s_x * s_w) with per-row s_x (1.32.0)
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


@contextlib.contextmanager
def products(scheme: str) -> Iterator[None]:
    """Run the model's products in `scheme` ("none": unchanged, fp32; "int8": the module docstring's)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    if scheme == "none":
        yield
        return
    with _torch_side()[1]():
        yield


class QuantizedModel:
    """A model whose methods run with `scheme`'s products, in fp32 as the artifact computes them: the reference a
    quantized bundle is checked against (the float64 model it was built from is left as it was)."""

    def __init__(self, net, scheme: str):
        self.net, self.scheme = copy.deepcopy(net).float(), scheme

    def double(self) -> "QuantizedModel":
        return self

    def float(self) -> "QuantizedModel":
        return self

    def __getattr__(self, name: str):
        attr = getattr(self.net, name)
        if not callable(attr):
            return attr

        def quantized(*args, **kwargs):
            import torch

            with torch.no_grad(), products(self.scheme):
                return attr(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args],
                            **kwargs)

        return quantized


def scheme_of(manifest: dict) -> str:
    """The quantization scheme a bundle was compiled with ("none" for fp32)."""
    return (manifest.get("quantization") or {}).get("scheme", "none")


def products_of(graph) -> list[tuple[int, int]]:
    """[in, out] of every int8 product (MatMulInteger with a constant weight) in an exported ONNX graph."""
    from onnx import numpy_helper

    consts = {i.name: tuple(i.dims) for i in graph.graph.initializer}
    consts.update({n.output[0]: tuple(numpy_helper.to_array(a.t).shape) for n in graph.graph.node
                   if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    return [consts[n.input[1]] for n in graph.graph.node if n.op_type == "MatMulInteger" and n.input[1] in consts]


def manifest_record(scheme: str, graph, isa: str | None) -> dict | None:
    """The manifest's account of a quantized bundle (from its one-frame step graph): the scheme, the products it
    covers, what stays fp32 and the instruction set the target build uses for the int8 products."""
    if scheme == "none":
        return None
    shapes = products_of(graph)
    unique = sorted(set(shapes))
    return {"scheme": "int8", "weights": "int8, symmetric, per output channel, constants in the library",
            "activations": "int8, symmetric, per row, computed at run time", "accumulation": "int32",
            "rounding": "half to even", "epilogue": "(acc * s_w) * s_x + bias in fp32",
            "products": [{"in": i, "out": o, "count": shapes.count((i, o))} for i, o in unique],
            "weights_quantized": int(sum(i * o for i, o in shapes)), "kept_fp32": KEPT_FP32, "isa": isa}
