"""Export and build for segment-level models (HMT) until the generic stages take a model's own entry list.

`export_entries` writes each (name, module, example inputs, output names) a model lists as checked ONNX
(opset 17, onnx.checker, ONNX Runtime against eager): the same checks as `edgekit.export.export_entry`, for
an arbitrary signature. `build` imports them into one Relax module (`edgekit.compile.import_entries`), compiles
it with edgekit's pipeline for a target and writes the library, the ONNX files and a small manifest.
"""
from __future__ import annotations

import io
import json
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
    cuda = build_library(import_entries(paths), tvm_target, out_dir / "model.so", tgt.cc)
    t2 = time.perf_counter()
    meta = {
        "family": model.family, "config": model.config(), "target": {"name": tgt.name, "tvm": str(tvm_target)},
        "versions": versions(), "cuda": cuda, "batch": batch, **model.manifest_fields(batch),
        "library": "model.so", "export_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2),
    }
    torch.save(model.state_dict(), out_dir / "weights.pt")
    (out_dir / "hmt.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_engine(path: Path, device: str = "cpu"):
    """The engine of a built directory: this module's (hmt.json) or an `edgekit compile hmt` bundle (manifest.json,
    checksums verified)."""
    from edgekit.hmt_runtime import TVMEngine

    path = Path(path)
    if (path / "hmt.json").is_file():
        meta = json.loads((path / "hmt.json").read_text())
    else:
        from edgekit.artifact import load

        meta = load(path).manifest
    if meta.get("unit", "segment") != "segment" or "decode" not in meta.get("entries", {}):
        from edgekit.errors import BundleError

        raise BundleError(f"{path} holds no segment-level LM (no segment and decode entries)",
                          "build one with `edgekit compile hmt` or edgekit.hmt_build.build")
    return TVMEngine(path / meta["library"], meta, device)


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


_EMULATED_RUNNER = '''
import sys, numpy as np
from tvm_runtime import load_vm
lib, inputs, outputs = sys.argv[1:4]
f = np.load(inputs)
tokens, lengths = f["tokens"], f["lengths"]
vm = load_vm(lib)
seg = vm.raw("segment")
state = [vm.tensor(f[f"state_{i}"]) for i in range(int(f["n_state"]))]
logits, mems = [], []
for t, n in zip(tokens, lengths):
    out = seg(vm.tensor(t[None]), vm.tensor(np.array([n], dtype=np.int64)), *state)
    logits.append(vm.numpy(out[0])[0]); mems.append(vm.numpy(out[1])[0])
    state = list(out[5:])
np.savez(outputs, logits=np.stack(logits), memory_embedding=np.stack(mems))
'''


def run_emulated(out_dir: Path, tokens: np.ndarray, lengths: np.ndarray, timeout: float = 1800) -> dict:
    """Stream segments tokens [S, L] (real lengths [S]) through an aarch64 library under qemu-aarch64, in one
    emulated process from an empty state: {"logits": [S, L, V], "memory_embedding": [S, d]}."""
    import shutil
    import tempfile

    from edgekit import emulator

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "hmt.json").read_text())
    root = emulator.prepare()
    with tempfile.TemporaryDirectory(prefix="edgekit-hmt-emu-") as tmp:
        tmp = Path(tmp)
        (tmp / "run.py").write_text(_EMULATED_RUNNER)
        shutil.copy(Path(__file__).with_name("tvm_runtime.py"), tmp / "tvm_runtime.py")
        state = {f"state_{i}": np.zeros(s["shape"], dtype=s["dtype"]) for i, s in enumerate(meta["state"])}
        np.savez(tmp / "in.npz", tokens=tokens.astype(np.int64), lengths=lengths.astype(np.int64),
                 n_state=np.array(len(state)), **state)
        emulator._run([*emulator.python_command(root), str(tmp / "run.py"), str((out_dir / meta["library"]).resolve()),
                       str(tmp / "in.npz"), str(tmp / "out.npz")], "emulated HMT stream failed", timeout=timeout)
        with np.load(tmp / "out.npz") as f:
            return {k: f[k] for k in f.files}
