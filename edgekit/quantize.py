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

The reference (`QuantizedModel`, not the export) also computes the fp32 parts that feed products the way a CPU
artifact does, term for term: GELU and erf with TVM's fast_erf polynomial, softmax as TVM's fast_softmax,
layer norm as TVM's two-pass form, row sums in the partial-sum order of kernels/cpu_reduction.py, and the
multiply-adds LLVM fuses as fused multiply-adds. Why: an activation code on a rounding boundary flips on an fp32
difference of one ulp, and in a Transformer one flipped code moves every later layer of its row; with torch's own
forms a 4-layer byte LM's kernel check found 0.5 % of its logit codes differing, nearly all from such flips.
"""
from __future__ import annotations

import contextlib
import copy
import math
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
        """Inside this mode every F.linear runs `int8_linear`; with `artifact_forms`, fp32 GELU, erf, softmax and
        layer norm run as the artifact computes them (`_artifact_forms`)."""

        def __init__(self, artifact_forms: bool = False):
            super().__init__()
            self.forms = _artifact_forms() if artifact_forms else {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                x, weight, bias = (*args, None, None)[:3]
                return int8_linear(x, weight, kwargs.get("bias", bias))
            form = self.forms.get(func)
            if form is not None and args[0].dtype == torch.float32:
                return form(*args, **kwargs)
            return func(*args, **kwargs)

    return MatMulInteger, Int8Products


# TVM's fast_erf (topi, from Eigen): erf(x) ~ x P(x^2) / Q(x^2) on x clamped to [-4, 4], Horner from the highest
# power; fast_exp (topi, from Cephes): 2^n (1 + f + f^2 R(f)), n = floor(x log2 e + 1/2), f = x - n ln 2.
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)
EXP_R = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_CLAMP, LOG2E, LN2 = (-88.3762626647949, 88.3762626647950), 1.44269504088896341, 0.6931471805599453


@cache
def _artifact_forms() -> dict:
    """{torch function: the same function as a CPU artifact computes it in fp32}: see the module docstring."""
    import torch
    import torch.nn.functional as F

    from edgekit.kernels.cpu_reduction import lanes

    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731

    def fma(a, b, c):
        """a * b + c rounded once from float64, where a * b is exact: LLVM's fused multiply-add (a double rounding
        can differ from it in about one case in 2^29). a and b may come in float64 already (exact copies)."""
        return torch.addcmul(c.double(), a.double(), b.double()).float()

    def horner(x, coefficients):
        x = x.double()
        acc = fma(x, f32(coefficients[0]), f32(coefficients[1]))
        for c in coefficients[2:]:
            acc = fma(x, acc, f32(c))
        return acc

    def fast_erf(x):
        x = x.clamp(-4.0, 4.0)
        return x * horner(x * x, ERF_P) / horner(x * x, ERF_Q)

    def fast_exp(d):
        x = d.clamp(*EXP_CLAMP)
        n = torch.floor(fma(x, f32(LOG2E), f32(0.5)))
        f = fma(-n, f32(LN2), x)
        r = torch.full_like(f, EXP_R[0])
        for c in EXP_R[1:]:
            r = fma(r, f, f32(c))
        two_n = ((n + 127).to(torch.int32) << 23).view(torch.float32)
        return torch.maximum(two_n * (fma(r * f, f, f) + 1), d)

    def row_sum(x, square: bool = False):
        """Sums over the last axis in kernels/cpu_reduction.py's order: `lanes` interleaved partial sums, then
        those in turn (squares: fused into the accumulation)."""
        parts = x.reshape(*x.shape[:-1], -1, lanes(x.shape[-1]))
        wide = parts.double() if square else None
        acc = torch.zeros_like(parts[..., 0, :])
        for i in range(parts.shape[-2]):
            acc = fma(wide[..., i, :], wide[..., i, :], acc) if square else acc + parts[..., i, :]
        total = torch.zeros_like(acc[..., 0])
        for lane in range(acc.shape[-1]):
            total = total + acc[..., lane]
        return total[..., None]

    def softmax(x, dim=None, *_, dtype=None, **__):
        x = x.movedim(dim, -1)
        e = fast_exp(x - x.amax(-1, keepdim=True))
        return (e / row_sum(e)).movedim(-1, dim)

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if len(shape) != 1:
            return F.layer_norm(x, shape, weight, bias, eps)
        centred = x - row_sum(x) / x.shape[-1]
        y = centred * torch.rsqrt(row_sum(centred, square=True) / x.shape[-1] + eps)
        if weight is None:
            return y if bias is None else y + bias
        return fma(y, weight, bias) if bias is not None else y * weight

    def matmul(a, b):
        """k in order, one fused multiply-add per term (kernels/cpu_matmul.py: the default lowering's sums)."""
        if a.dim() < 2 or b.dim() < 2:
            return torch.matmul(a, b)
        acc = torch.zeros(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]))
        a, b = a.double(), b.double()
        for k in range(a.shape[-1]):
            acc = fma(a[..., k:k + 1], b[..., k:k + 1, :], acc)
        return acc

    def gelu(x, approximate="none"):
        if approximate != "none":
            return F.gelu(x, approximate=approximate)
        return x * (fast_erf(x / f32(math.sqrt(2))) + 1) * 0.5  # as ONNX spells GELU: x * (erf(x / sqrt 2) + 1) / 2

    return {F.gelu: gelu, torch.erf: fast_erf, torch.Tensor.erf: fast_erf, F.softmax: softmax,
            torch.softmax: softmax, torch.Tensor.softmax: softmax, F.layer_norm: layer_norm, torch.matmul: matmul,
            torch.Tensor.matmul: matmul}


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
def products(scheme: str, artifact_forms: bool = False) -> Iterator[None]:
    """Run the model's products in `scheme` ("none": unchanged, fp32; "int8": the module docstring's), with
    `artifact_forms` also its fp32 GELU, erf, softmax and layer norm as the artifact computes them."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    if scheme == "none":
        yield
        return
    with _torch_side()[1](artifact_forms):
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

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # thousands of small ops: a second thread only adds synchronisation
            try:
                with torch.no_grad(), products(self.scheme, artifact_forms=True):
                    return attr(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args],
                                **kwargs)
            finally:
                torch.set_num_threads(threads)

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
