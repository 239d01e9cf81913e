"""Export stage: a StreamingModel's step, chunked step and flush as ONNX graphs with the state as explicit
inputs and outputs, each checked with onnx.checker and against ONNX Runtime before anything else uses it."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgekit.errors import CompileError
from edgekit.streaming import StreamingModel

OPSET = 17


def entry_names(chunks: tuple[int, ...], delay: int) -> list[str]:
    """Entry points of a bundle: `step` (1 frame), `chunk<K>` per extra chunk size, `flush` if delayed."""
    return [("step" if k == 1 else f"chunk{k}") for k in chunks] + (["flush"] if delay else [])


def entry_frames(entry: str) -> int:
    return 1 if entry == "step" else int(entry.removeprefix("chunk")) if entry.startswith("chunk") else 0


class _Entry(nn.Module):
    """Flat-tensor signature around step_chunk/flush: (x?, *state) -> (*outputs, *state)."""

    def __init__(self, model: StreamingModel, frames: int):
        super().__init__()
        self.model, self.frames = model, frames
        self.state_names = [s.name for s in model.state_spec()]
        self.output_names = [s.name for s in model.output_spec()]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.frames:
            y, state = self.model.step_chunk(args[0], dict(zip(self.state_names, args[1:])))
        else:
            y, state = self.model.flush(dict(zip(self.state_names, args)))
        return (*[y[n] for n in self.output_names], *[state[n] for n in self.state_names])


def example_inputs(model: StreamingModel, frames: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random input frames and a mid-stream state (the model stepped over a few frames), as numpy."""
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(batch)
    with torch.no_grad():
        for _ in range(model.delay + 2):
            _, state = model.step(torch.randn(batch, model.input_size, generator=g), state)
    x = {"x": torch.randn(batch, frames, model.input_size, generator=g)} if frames else {}
    return {k: v.numpy() for k, v in {**x, **{f"state.{k}": v for k, v in state.items()}}.items()}


def export_entry(model: StreamingModel, entry: str, path: Path, batch: int = 1, rtol: float = 1e-4,
                 atol: float = 1e-5) -> Path:
    """Write one entry point as ONNX (opset 17), then prove it: onnx.checker, and ONNX Runtime against eager."""
    frames = entry_frames(entry)
    wrapper = _Entry(model, frames).eval()
    inputs = example_inputs(model, frames, batch)
    out_names = wrapper.output_names + [f"state_out.{n}" for n in wrapper.state_names]
    return export_module(wrapper, inputs, out_names, path, f"edgekit {model.family} {entry}: state as explicit "
                         "inputs/outputs", rtol, atol)


def export_module(module: nn.Module, inputs: dict[str, np.ndarray], out_names: list[str], path: Path, doc: str,
                  rtol: float = 1e-4, atol: float = 1e-5) -> Path:
    """Any flat-tensor module as checked ONNX: inputs named and ordered as `inputs` (example values), outputs
    named `out_names`; onnx.checker, then ONNX Runtime against eager on the examples."""
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


def check_against_onnxruntime(proto: onnx.ModelProto, wrapper: nn.Module, inputs: dict[str, np.ndarray],
                              out_names: list[str], rtol: float, atol: float, entry: str) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(out_names, inputs)
    with torch.no_grad():
        want = [t.numpy() for t in wrapper(*[torch.from_numpy(v) for v in inputs.values()])]
    got, want = _compensated(out_names, got), _compensated(out_names, want)
    for name, g, w in zip(out_names, got, want):
        if g.shape != w.shape or not np.allclose(g, w, rtol=rtol, atol=atol):
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


def export(model: StreamingModel, out_dir: Path, chunks: tuple[int, ...] = (1, 16), batch: int = 1
           ) -> dict[str, Path]:
    """Every entry point of the model as a checked ONNX file in out_dir: {entry: path}. A model whose unit is not
    a frame (a segment-level LM) lists its own entries: `export_entries(batch)` -> [(name, module, example
    inputs, output names)]; `chunks` does not apply to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "export_entries"):
        return {name: export_module(module, inputs, outs, out_dir / f"{name}.onnx",
                                    f"edgekit {model.family} {name}: state as explicit inputs/outputs", 1e-4, 1e-4)
                for name, module, inputs, outs in model.export_entries(batch)}
    return {e: export_entry(model, e, out_dir / f"{e}.onnx", batch) for e in entry_names(chunks, model.delay)}
