"""Export and build for segment-level models (HMT) until the generic stages take a model's own entry list.

`export_entries` writes each (name, module, example inputs, output names) a model lists as checked ONNX
(opset 17, onnx.checker, ONNX Runtime against eager): the same checks as `edgekit.export.export_entry`, for
an arbitrary signature. `build` imports them into one Relax module (`edgekit.compile.import_entries`), compiles
it with edgekit's pipeline for a target and writes the library, the ONNX files and a small manifest.
"""
from __future__ import annotations

import io
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgekit.export import OPSET, check_against_onnxruntime


def export_module(module: nn.Module, inputs: dict[str, np.ndarray], out_names: list[str], path: Path,
                  doc: str = "", rtol: float = 1e-4, atol: float = 1e-4) -> Path:
    """One entry as ONNX with the given input and output names, proved like every edgekit entry."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(v) for v in inputs.values()), buf,
                          input_names=list(inputs), output_names=out_names, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = doc
    onnx.checker.check_model(proto, full_check=True)
    check_against_onnxruntime(proto, module, inputs, out_names, rtol, atol, path.stem)
    onnx.save(proto, path)
    return path


def export_entries(entries: list, out_dir: Path, family: str = "") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: export_module(module, inputs, outs, out_dir / f"{name}.onnx",
                                f"edgekit {family} {name}: state as explicit inputs/outputs")
            for name, module, inputs, outs in entries}


def build(model, out_dir: Path, target: str = "host", batch: int = 1, progress=print) -> dict:
    """ONNX for both steps, one TVM library for `target`, and hmt.json describing them; returns that record."""
    from edgekit import targets
    from edgekit.compile import import_entries, versions
    from edgekit.models.hmt import export_entries as hmt_entries
    from edgekit.pipeline import build as build_library

    out_dir = Path(out_dir)
    tgt = targets.get(target)
    tgt.check_tools()
    t0 = time.perf_counter()
    entries = hmt_entries(model, batch)
    progress("exporting segment and decode steps to ONNX (checked against ONNX Runtime)")
    paths = export_entries(entries, out_dir / "onnx", model.family)
    t1 = time.perf_counter()
    progress(f"importing into TVM Relax and building for {tgt.name}")
    tvm_target = tgt.tvm_target()
    build_library(import_entries(paths), tvm_target, out_dir / "model.so", tgt.cc)
    t2 = time.perf_counter()
    meta = {
        "family": model.family, "config": model.config(), "target": {"name": tgt.name, "tvm": str(tvm_target)},
        "versions": versions(), "segment": model.L, "summary": model.j, "batch": batch,
        "state": [s.to_json() for s in model.state_spec(batch)], "state_bytes": model.state_bytes(batch),
        "decode_cache": [s.to_json() for s in model.kv_spec(batch)],
        "decode_cache_bytes": sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in model.kv_spec(batch)),
        "entries": {name: {"onnx": f"onnx/{name}.onnx", "inputs": list(inputs), "outputs": outs}
                    for name, _, inputs, outs in entries},
        "library": "model.so", "export_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2),
    }
    torch.save(model.state_dict(), out_dir / "weights.pt")
    (out_dir / "hmt.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_engine(out_dir: Path, device: str = "cpu"):
    from edgekit.hmt_runtime import TVMEngine

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "hmt.json").read_text())
    return TVMEngine(out_dir / meta["library"], meta, device)


def cached_build(model, key: str, target: str = "host", progress=print):
    """The model's library for `target`, built on first use under $EDGEKIT_CACHE/hmt/<key>-<target>-<version>
    (atomically: built in a sibling directory, then renamed), then its engine."""
    import os
    import shutil

    from edgekit import __version__
    from edgekit.stream import cache_dir

    out = cache_dir() / "hmt" / f"{key}-{target}-{__version__}"
    if not (out / "hmt.json").is_file():
        stage = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            progress(f"first use: compiling for {target} into {out} (cached for next time)")
            build(model, stage, target, progress=progress)
            if not out.exists():
                stage.rename(out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out
