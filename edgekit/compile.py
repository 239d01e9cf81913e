"""Compile stage: model -> ONNX entries -> one TVM Relax module -> the target's library -> a published bundle.
The model's unit says which entries it has, what the manifest says about them and what golden record it keeps."""
from __future__ import annotations

import datetime
import importlib.metadata as md
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit import units
from edgekit.artifact import (INTERFACE_FUNCTION, LIBRARY, SCHEMA, Bundle, check_destination, file_sha256,
                              interface_digest, load, publish, staging_dir)
from edgekit.errors import CompileError
from edgekit.export import export
from edgekit.quantize import SCHEMES, manifest_record

GOLDEN = "reference.npz"
Progress = Callable[[str], None]


def unsupported_ops(graph) -> list[str]:
    """ONNX op types in the graph that TVM's Relax importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    return sorted({n.op_type for n in graph.graph.node if n.op_type not in known})


def import_entries(onnx_paths: dict[str, Path], constants: dict[str, np.ndarray] | None = None):
    """One Relax IRModule with a public function per entry (helper PrimFuncs get entry-prefixed names), plus a
    function without arguments per entry of `constants` that returns that array."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def __init__(self, mapping: dict):
            super().__init__()
            self.mapping = mapping

        def visit_global_var_(self, op):
            return self.mapping.get(op.name_hint, op)

    bb = relax.BlockBuilder()
    for entry, path in onnx_paths.items():
        graph = onnx.load(path)
        if missing := unsupported_ops(graph):
            raise CompileError(f"TVM's ONNX importer does not support op(s) {', '.join(missing)} in {entry}",
                               "rewrite that part of the model with supported ops, or export a smaller step")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Renaming name")  # "state.x" -> "state_x": expected
            mod = from_onnx(graph, keep_params_in_input=False)
        # Helpers stay private (symbols come from their names at the end), so the helpers a rewrite leaves unused
        # (the clamps of an int8 product's quantization: a fifth of an int8 library's code) are dropped as dead.
        mapping = {gv.name_hint: bb.add_func(f.without_attr("global_symbol"), f"{entry}_{gv.name_hint}")
                   for gv, f in mod.functions.items() if gv.name_hint != "main"}
        bb.add_func(Rename(mapping).visit_expr(mod["main"]).with_attr("global_symbol", entry), entry)
    for name, value in (constants or {}).items():
        with bb.function(name, []):
            bb.emit_func_output(relax.const(value))
    return bb.get()


def check_quantization(scheme: str, target, unit: units.Unit) -> None:
    """Refuse what cannot be checked: a scheme edgekit does not know, one the model's unit has no reference for,
    int8 on a GPU target (no GPU here to validate its kernels against)."""
    if scheme not in SCHEMES:
        raise CompileError(f"unknown quantization {scheme!r}", f"choose from {', '.join(SCHEMES)}")
    if scheme not in unit.quantizations:
        raise CompileError(f"--quantize {scheme} is not available for {unit.name}-streaming models yet",
                           f"compile them with --quantize {' or '.join(unit.quantizations)}")
    if scheme != "none" and target.runs == "cuda":
        raise CompileError(f"--quantize {scheme} is not available for {target.name} (a CUDA target) yet: its "
                           "kernels have not been validated on a GPU",
                           "compile with --quantize none for the GPU, or for a CPU target (host, arm64, rpi4, rpi5)")


def versions() -> dict[str, str]:
    def v(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    return {p: v(p) for p in ("edgekit", "apache-tvm", "apache-tvm-ffi", "torch", "onnx", "onnxruntime")}


def compile(model: str, target: str, out: Path, *, config: str | None = None, checkpoint: Path | None = None,
            quantize: str = "none", force: bool = False, progress: Progress = lambda msg: None, **options) -> Bundle:
    """Build a bundle for `target` from a checkpoint (or a named config with seeded random weights). `quantize`
    says how its products compute ("none": fp32; "int8": edgekit.quantize). `options` are the export options of
    the family's unit (a frame model's `chunks`, `batch`)."""
    import torch

    from edgekit import models, targets

    out = Path(out)
    fam, tgt = models.family(model), targets.get(target)
    unit = units.get(fam.unit)
    opts = unit.export_options(**options)
    if checkpoint is not None and config is not None:
        raise CompileError("pass a checkpoint or a config, not both", "a checkpoint carries its own config")
    check_quantization(quantize, tgt, unit)
    check_destination(out, force)
    tgt.check_tools()
    t0 = time.perf_counter()
    progress(f"loading {model}" + (f" from {checkpoint}" if checkpoint else f" ({config or 'default'} config)"))
    net = models.build(model, config, checkpoint)
    try:
        stage = staging_dir(out)
    except OSError as e:
        raise CompileError(f"cannot write the bundle at {out}: {e.strerror or e}",
                           "choose an -o in a writable directory") from None
    try:
        progress("exporting the entry points to ONNX (checked against ONNX Runtime)")
        onnx_paths = export(net, unit, stage / "onnx", opts, quantize)
        progress(f"importing into TVM Relax and building for {tgt.name}")
        import onnx

        from edgekit.kernels.cpu_int8 import isa
        from edgekit.kernels.fp_mode import POOL_FUNCTION, flushes_denormals
        from edgekit.pipeline import build

        interface = {"batch": opts.batch, **unit.manifest_fields(net, opts)}
        digest = np.frombuffer(interface_digest(interface), np.uint8)
        tvm_target = tgt.tvm_target()
        cuda = build(import_entries(onnx_paths, {INTERFACE_FUNCTION: digest}), tvm_target, stage / LIBRARY, tgt.cc)
        progress("computing the golden record" + (" (the quantized model, fp32)" if quantize != "none" else
                                                  " (float64)"))
        torch.save(net.state_dict(), stage / "weights.pt")
        data = unit.write_data(net, stage)
        golden = unit.write_golden(unit.reference(net, quantize), stage / GOLDEN)
        manifest = {
            "schema": SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "model": {"family": net.family, "config": net.config(), "config_name": None if checkpoint else config,
                      "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint)}
                      if checkpoint else None, "weights": "weights.pt"},
            "target": {"name": tgt.name, "tvm": str(tvm_target), "arch": tgt.arch, "runs": tgt.runs,
                       "emulated_cpu": tgt.emulated_cpu},
            "cuda": cuda,
            "precision": "float32" if quantize == "none" else quantize,
            "fp_mode": {"flush_denormals": flushes_denormals(tvm_target),
                        "pool_function": POOL_FUNCTION if flushes_denormals(tvm_target) else None},
            "quantization": manifest_record(quantize, onnx.load(next(iter(onnx_paths.values()))),
                                            isa(tvm_target) if quantize != "none" else None),
            **interface,
            "library": LIBRARY,
            "golden": golden,
            **data,
            "compile_seconds": round(time.perf_counter() - t0, 2),
        }
        progress("writing the bundle")
        publish(stage, manifest, out, force)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a filesystem gone read-only: nothing was written
            raise CompileError(f"writing the bundle at {out} failed: {e.strerror or e}; nothing was written",
                               "free disk space, or choose an -o on another disk") from None
        raise
    return load(out, check_machine=False)
