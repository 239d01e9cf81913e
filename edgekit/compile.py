"""Compile stage: model -> ONNX entries -> one TVM Relax module -> the target's library -> a published bundle."""
from __future__ import annotations

import datetime
import importlib.metadata as md
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import onnx

from edgekit.artifact import LIBRARY, SCHEMA, Bundle, check_destination, file_sha256, load, publish, staging_dir
from edgekit.errors import CompileError
from edgekit.export import entry_frames, export
from edgekit.validate import GOLDEN, write_golden

Progress = Callable[[str], None]


def unsupported_ops(graph: onnx.ModelProto) -> list[str]:
    """ONNX op types in the graph that TVM's Relax importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    return sorted({n.op_type for n in graph.graph.node if n.op_type not in known})


def import_entries(onnx_paths: dict[str, Path]):
    """One Relax IRModule with a public function per entry; helper PrimFuncs get entry-prefixed names."""
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
        mapping = {gv.name_hint: bb.add_func(f.with_attr("global_symbol", f"{entry}_{gv.name_hint}"),
                                             f"{entry}_{gv.name_hint}")
                   for gv, f in mod.functions.items() if gv.name_hint != "main"}
        bb.add_func(Rename(mapping).visit_expr(mod["main"]).with_attr("global_symbol", entry), entry)
    return bb.get()


def frame_fields(net, batch: int, onnx_paths: dict[str, Path]) -> dict:
    """The manifest's interface fields for a frame-level StreamingModel (a model may supply its own:
    `manifest_fields(batch)`, e.g. a segment-level LM with unit, entries and state of its own)."""
    return {
        "unit": "frame",
        "delay": net.delay,
        "horizon": net.horizon,
        "input": net.input_spec(batch).to_json(),
        "outputs": [s.to_json() for s in net.output_spec(batch)],
        "running_means": net.running_means,
        "state": [s.to_json() for s in net.state_spec(batch)],
        "state_bytes": sum(4 * math.prod(s.shape) for s in net.state_spec(batch)),
        "entries": {e: {"frames": entry_frames(e), "onnx": f"onnx/{e}.onnx"} for e in onnx_paths},
    }


def versions() -> dict[str, str]:
    def v(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    return {p: v(p) for p in ("edgekit", "apache-tvm", "apache-tvm-ffi", "torch", "onnx", "onnxruntime")}


def compile(model: str, target: str, out: Path, config: str | None = None, checkpoint: Path | None = None,
            chunks: tuple[int, ...] = (1, 16), batch: int = 1, force: bool = False,
            progress: Progress = lambda msg: None) -> Bundle:
    """Build a bundle for `target` from a checkpoint (or a named config with seeded random weights)."""
    import torch

    from edgekit import models, targets

    out = Path(out)
    tgt = targets.get(target)
    check_destination(out, force)
    tgt.check_tools()
    if 1 not in chunks or any(k < 1 for k in chunks):
        raise CompileError(f"chunk sizes must be positive and include 1, got {chunks}", "e.g. --chunk 1 --chunk 16")
    t0 = time.perf_counter()
    progress(f"loading {model}" + (f" from {checkpoint}" if checkpoint else f" ({config or 'default'} config)"))
    net = models.build(model, config, checkpoint)
    stage = staging_dir(out)
    try:
        progress("exporting the entry points to ONNX (checked against ONNX Runtime)")
        onnx_paths = export(net, stage / "onnx", tuple(sorted(set(chunks))), batch)
        progress(f"importing into TVM Relax and building for {tgt.name}")
        from edgekit.pipeline import build

        tvm_target = tgt.tvm_target()
        cuda = build(import_entries(onnx_paths), tvm_target, stage / LIBRARY, tgt.cc)
        torch.save(net.state_dict(), stage / "weights.pt")
        golden = write_golden(net, stage / GOLDEN)
        own = hasattr(net, "manifest_fields")  # a model with its own interface (segment-level)
        manifest = {
            "schema": SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "model": {"family": net.family, "config": net.config(), "config_name": None if checkpoint else config,
                      "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint)}
                      if checkpoint else None, "weights": "weights.pt"},
            "target": {"name": tgt.name, "tvm": str(tvm_target), "arch": tgt.arch, "runs": tgt.runs},
            "cuda": cuda,
            "precision": "float32",
            "quantization": None,
            "batch": batch,
            **(net.manifest_fields(batch) if own else frame_fields(net, batch, onnx_paths)),
            "library": LIBRARY,
            "golden": golden,
            "compile_seconds": round(time.perf_counter() - t0, 2),
        }
        progress("writing the bundle")
        publish(stage, manifest, out, force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return load(out, check_machine=False)

