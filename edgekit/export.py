"""Export stage: the entry points a model's unit lists (a frame model's step, chunks and flush; a segment LM's
segment and decode steps) as ONNX graphs with the state as explicit inputs and outputs, each checked with
onnx.checker and against ONNX Runtime before anything else uses it."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from edgekit.errors import CompileError
from edgekit.units import Unit

OPSET = 17


def export_module(module, inputs: dict[str, np.ndarray], out_names: list[str], path: Path, doc: str,
                  rtol: float = 1e-4, atol: float = 1e-5, steps: float | None = None) -> Path:
    """Any flat-tensor module as checked ONNX: inputs named and ordered as `inputs` (example values), outputs
    named `out_names`; onnx.checker, then ONNX Runtime against eager on the examples (a quantized module: within
    `steps` of each output row's int8 step, since an activation code on a rounding boundary may flip)."""
    import onnx
    import torch

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(v) for v in inputs.values()), buf,
                          input_names=list(inputs), output_names=out_names, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = doc
    onnx.checker.check_model(proto, full_check=True)
    check_against_onnxruntime(proto, module, inputs, out_names, rtol, atol, path.stem, steps)
    onnx.save(proto, path)
    return path


def check_against_onnxruntime(proto, wrapper, inputs: dict[str, np.ndarray], out_names: list[str], rtol: float,
                              atol: float, entry: str, steps: float | None = None) -> None:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(out_names, inputs)
    with torch.no_grad():
        want = [t.numpy() for t in wrapper(*[torch.from_numpy(v) for v in inputs.values()])]
    (names, got), (_, want) = wrapper.named(out_names, got), wrapper.named(out_names, want)
    got, want = _compensated(names, got), _compensated(names, want)
    for name, g, w in zip(names, got, want):
        if steps is not None and g.shape == w.shape:  # tolerance: `steps` of each row's int8 step (max|row| / 127)
            atol, rtol = steps * np.abs(w).max(axis=-1, keepdims=True) / 127 + 1e-30, 0
        if g.shape != w.shape or not np.all(np.abs(g - w) <= atol + rtol * np.abs(w)):
            err = float(np.abs(g - w).max()) if g.shape == w.shape else float("nan")
            raise CompileError(f"ONNX Runtime disagrees with PyTorch on {entry}/{name} (max abs error {err:.3g})",
                               "this is an exporter bug for an op in the model; report it with the model config")


def _compensated(names: list[str], values: list[np.ndarray]) -> list[np.ndarray]:
    """A Kahan pair (`sum.X`, `carry.X`) means sum - carry; the carry alone is rounding residue that legitimately
    differs between engines, so it is compared as part of its sum and otherwise as zero."""
    by_name = dict(zip(names, values))

    def meaning(name: str, v: np.ndarray) -> np.ndarray:
        if name.startswith("state_out.carry."):
            return np.zeros_like(v)
        if name.startswith("state_out.sum."):
            return v - by_name[name.replace(".sum.", ".carry.", 1)]
        return v

    return [meaning(n, v) for n, v in zip(names, values)]


def export(model, unit: Unit, out_dir: Path, options, quantization: str = "none") -> dict[str, Path]:
    """Every entry point the unit lists for the model, as a checked ONNX file in out_dir: {entry: path}.
    `options` are the unit's export options (e.g. a frame model's chunk sizes); `quantization` how its products
    compute (edgekit.quantize: the int8 graph is checked against the same quantized model in PyTorch)."""
    from edgekit.quantize import products

    out_dir.mkdir(parents=True, exist_ok=True)
    with products(quantization):
        return {name: export_module(module, inputs, outs, out_dir / f"{name}.onnx",
                                    f"edgekit {model.family} {name}: state as explicit inputs/outputs", 1e-4,
                                    unit.export_atol, None if quantization == "none" else 2.0)
                for name, module, inputs, outs in unit.export_entries(model, options)}
