"""The Relax pass list per kind of target, in one visible place (MLC-LLM style): legalize to TIR, schedule
with our kernels/ rules, lower the dataflow, plan memory."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu

from edgekit.kernels.cpu_gemv import PackedGEMVSchedule, PackGEMVWeights
from tvm.s_tir import dlight


def passes(target: tvm.target.Target) -> list:
    """Every pass a build runs, in order, for this target."""
    return [
        *cpu.library_dispatch_passes(target),
        relax.transform.FoldConstant(),
        PackGEMVWeights,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dlight.ApplyDefaultSchedule(PackedGEMVSchedule()),
        *cpu.dataflow_lower_passes(target),
        *cpu.finalize_passes(target),
    ]


def pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="edgekit_pipeline")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes(target))(mod)

    return run
