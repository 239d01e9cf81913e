"""The Relax pass list per kind of target, in one visible place (MLC-LLM style): legalize to TIR, fuse,
schedule (our kernels/ rules on CPUs, dlight's GPU rules on CUDA), lower the dataflow, plan memory. `build`
runs it and writes the target's library."""
from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.relax.backend.cuda import pipeline as cuda
from tvm.s_tir import dlight

from edgekit import cuda as offline_cuda
from edgekit.kernels import call_rewrite_pass
from edgekit.kernels.cpu_cumsum import ShortCumsum
from edgekit.kernels.cpu_fastmath import FastErfSoftmax
from edgekit.kernels.cpu_gemv import PackedGEMVSchedule, PackGEMVWeights
from edgekit.kernels.cpu_injective import InlineInjective, SplitAsSlices
from edgekit.kernels.cpu_int8 import Int8DotKernels
from edgekit.kernels.cpu_matmul import BatchMatmulSchedule
from edgekit.kernels.fp_mode import add_pool_function, flush_denormals
from edgekit.kernels.nan_semantics import NaNPropagatingReLU
from edgekit.kernels.cpu_reduction import RowReductionSchedule


def _clip_take(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if call.op != tvm.ir.Op.get("relax.take") or call.attrs.mode != "fast":
        return call
    return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")


# Gathers (embeddings, ONNX Gather) clamp their indices instead of reading out of bounds: a bad id in a user's
# input cannot crash the process or read foreign memory (and TVM stops warning, at every build, that it could).
ClipTakeIndices = call_rewrite_pass("ClipTakeIndices", _clip_take)


def cpu_passes(target: tvm.target.Target) -> list:
    """TVM's CPU pipeline plus edgekit.kernels: int8 products onto the target's dot-product kernels, constant fp32
    weights packed, erf/softmax made vectorizable and short cumulative sums plain reductions before legalization;
    after fusion each kernel takes the first rule that matches it (products with constant weights, products of two
    tensors, row reductions, data movement); the rest keep TVM's default loops. NaN propagates as in PyTorch
    (ReLU, erf), and every kernel runs with denormals flushed (kernels/fp_mode.py)."""
    return [
        ShortCumsum,  # before DispatchSortScan turns every cumsum into TVM's parallel scan
        *cpu.library_dispatch_passes(target),
        ClipTakeIndices,
        NaNPropagatingReLU,
        Int8DotKernels,
        relax.transform.DeadCodeElimination(),
        relax.transform.FoldConstant(),
        PackGEMVWeights,
        FastErfSoftmax,
        SplitAsSlices,
        relax.transform.CanonicalizeBindings(),  # a slice's reader takes it directly, not through the tuple
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dlight.ApplyDefaultSchedule(PackedGEMVSchedule(), BatchMatmulSchedule(), RowReductionSchedule(),
                                    InlineInjective()),
        add_pool_function(target),  # after every FoldConstant: folding would run it at compile time
        flush_denormals(target),
        *cpu.dataflow_lower_passes(target),
        *cpu.finalize_passes(target),
    ]


def cuda_passes(target: tvm.target.Target) -> list:
    """TVM's CUDA default pipeline: every fused kernel gets a dlight GPU schedule, Fallback last, so each one
    is bound to blocks and threads (a kernel left unbound would run as one GPU thread, or fail to build)."""
    return [
        *cuda.library_dispatch_passes(target),
        ClipTakeIndices,
        NaNPropagatingReLU,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dlight.ApplyDefaultSchedule(
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        ),
        *cuda.dataflow_lower_passes(target),
        *cuda.finalize_passes(target),
    ]


def passes(target: tvm.target.Target) -> list:
    """Every pass a build runs, in order, for this target."""
    kind = target.kind.name
    if kind == "cuda":
        return cuda_passes(target)
    if kind == "llvm":
        return cpu_passes(target)
    raise ValueError(f"no edgekit pipeline for TVM target kind {kind!r}")


def pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="edgekit_pipeline")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes(target))(mod)

    return run


# LLVM's debug sections are a quarter to a third of a CPU library and nothing at run time reads them: a board gets
# the code and constants only (the symbol table stays, for profilers).
LINK_OPTIONS = ["-Wl,--strip-debug"]


def build(mod: tvm.IRModule, target: tvm.target.Target, path: Path, cc: str) -> dict | None:
    """Compile `mod` for `target` and write the library to `path`, linked by `cc`. CUDA kernels are compiled
    here to a cubin (edgekit.cuda); the returned record of that goes to the manifest (None on CPU targets)."""
    if target.kind.name != "cuda":
        tvm.compile(mod, target=target, relax_pipeline=pipeline(target)).export_library(str(path), cc=cc,
                                                                                        options=LINK_OPTIONS)
        return None
    with offline_cuda.kernels_as_source():
        executable = tvm.compile(mod, target=target, relax_pipeline=pipeline(target))
    return offline_cuda.export_library(executable, path, str(target.arch), cc)
