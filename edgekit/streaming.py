"""The StreamingModel contract and the pieces every streaming model shares.

A model implements `forward` (parallel, the reference) and `advance` (one frame through the streaming
pipeline). Everything else a deployment needs (step, chunked step, flush, state specs, the running mean
of the outputs) is built here once, so that model families differ only in their maths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

State = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor crossing the model boundary (batch dimension included)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


class StreamingModel(nn.Module):
    """Parallel forward as the reference, plus a fixed-shape step that reproduces it frame by frame.

    A family sets `family`, `delay`, `horizon`, `input_size`, `output_sizes`, `running_means` and implements:
    - `forward_frames(x [B, T, F]) -> {name: [B, T, ...]}`: the per-frame reference over any length T;
    - `frame_state_shapes() -> {name: (shape without batch, dtype)}`: the state its own maths carries;
    - `advance_frame(x_t [B, F], state, drained, frames) -> (outputs, state)`: one frame; `frames` counts
      the frames seen before this one (saturating at `delay`) and `drained` the pipeline stages whose input
      has ended (0 while streaming, 1..delay inside `flush`).
    The counter, running means of outputs, step, chunked step, flush and whole-stream helpers live here.
    """

    family: str = ""
    delay: int = 0
    horizon: int | None = None  # frames after which an input stops affecting outputs (float64); None: never
    input_size: int = 0
    output_sizes: dict[str, tuple[int, ...]] = {}
    running_means: dict[str, str] = {}  # output name -> per-frame output it averages over the stream so far

    def frame_state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        raise NotImplementedError

    def forward_frames(self, x: torch.Tensor) -> Outputs:
        raise NotImplementedError

    def advance_frame(self, x_t: torch.Tensor, state: State, drained: int, frames: torch.Tensor
                      ) -> tuple[Outputs, State]:
        raise NotImplementedError

    def config(self) -> dict:
        """The constructor arguments that rebuild this model (recorded in the manifest)."""
        raise NotImplementedError

    def init_random(self, seed: int) -> None:
        """Adjust freshly initialised random weights so the model behaves like a trained one where it matters
        (used for named configs without a checkpoint); most families need nothing."""

    def forward(self, x: torch.Tensor) -> Outputs:
        """The reference: per-frame outputs over the whole sequence, running means included."""
        y = self.forward_frames(x)
        count = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        return {**y, **{name: torch.cumsum(y[src], dim=1) / count for name, src in self.running_means.items()}}

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The family's state plus the frame counter and, per running mean, a compensated (Kahan) sum and
        count: a plain float32 mean drifts by about eps * sqrt(frames), and a float32 count stops at 2^24."""
        sizes = {name: self.output_sizes[src] for name, src in self.running_means.items()}
        sums = {f"{part}.{name}": (size, "float32") for name, size in {**sizes, **({"count": (1,)} if sizes else {})}.items()
                for part in ("sum", "carry")}
        return {"frames": ((1,), "float32"), **self.frame_state_shapes(), **sums}

    def state_spec(self, batch: int = 1) -> list[TensorSpec]:
        return [TensorSpec(name, (batch, *shape), dtype) for name, (shape, dtype) in self.state_shapes().items()]

    def input_spec(self, batch: int = 1, frames: int = 1) -> TensorSpec:
        return TensorSpec("x", (batch, frames, self.input_size))

    def output_spec(self, batch: int = 1, frames: int = 1) -> list[TensorSpec]:
        sizes = {**self.output_sizes, **{n: self.output_sizes[s] for n, s in self.running_means.items()}}
        return [TensorSpec(name, (batch, frames, *shape)) for name, shape in sizes.items()]

    def init_state(self, batch: int = 1) -> State:
        return {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in self.state_spec(batch)}

    def advance(self, x_t: torch.Tensor, state: State, drained: int) -> tuple[Outputs, State]:
        frames = state["frames"]
        y, state = self.advance_frame(x_t, dict(state), drained, frames)
        valid = started(frames, self.delay)
        count = _kahan_add(state, "count", valid) if self.running_means else None
        for name, src in self.running_means.items():
            y[name] = _kahan_add(state, name, y[src] * valid) / torch.clamp(count, min=1.0)
        state["frames"] = torch.clamp(frames + 1, max=float(self.delay))
        return y, state

    def step(self, x_t: torch.Tensor, state: State) -> tuple[Outputs, State]:
        """One frame in; the output of frame t - delay out (meaningless for the first `delay` calls)."""
        return self.advance(x_t, state, drained=0)

    def advance_chunk(self, x: torch.Tensor, state: State) -> tuple[Outputs, State] | None:
        """K frames [B, K, F] through the family's maths at once (a scan, or a batched pipeline), leaving the
        counter and running means to the caller; None, the default, makes `step_chunk` unroll `step` instead."""
        return None

    def step_chunk(self, x: torch.Tensor, state: State) -> tuple[Outputs, State]:
        """K frames [B, K, F] in one call; outputs [B, K, ...]. Fixed shapes for export: the family's chunk
        form where it has one, else the step unrolled."""
        chunk = self.advance_chunk(x, dict(state))
        if chunk is not None:
            return self._chunk_means(x.shape[1], *chunk)
        outs = []
        for k in range(x.shape[1]):
            y, state = self.step(x[:, k:k + 1].squeeze(1), state)  # a slice, not a Gather, in ONNX
            outs.append(y)
        return _stack(outs), state

    def chunk_offsets(self, state: State, frames: int) -> torch.Tensor:
        """[B, K]: how many frames were seen before each frame of a chunk (saturating like the counter)."""
        return state["frames"] + torch.arange(frames, dtype=state["frames"].dtype)

    def _chunk_means(self, frames: int, y: Outputs, state: State) -> tuple[Outputs, State]:
        """Counter and running means after a chunk; the first `delay` frames of a stream emit nothing valid."""
        valid = started(self.chunk_offsets(state, frames), self.delay)
        if self.running_means:
            ones = [1] * (next(iter(y.values())).dim() - 2)
            before = (state["sum.count"] - state["carry.count"]).unsqueeze(1)
            count = (before + torch.cumsum(valid, dim=1).unsqueeze(-1)).view(*valid.shape, *ones)
            weight = valid.view(*valid.shape, *ones)
            for name, src in self.running_means.items():
                partial = torch.cumsum(y[src] * weight, dim=1)
                before = (state[f"sum.{name}"] - state[f"carry.{name}"]).unsqueeze(1)
                y[name] = (before + partial) / torch.clamp(count, min=1.0)
                _kahan_add(state, name, partial[:, -1])
            _kahan_add(state, "count", valid.sum(dim=1, keepdim=True))
        state["frames"] = torch.clamp(state["frames"] + frames, max=float(self.delay))
        return y, state

    def flush(self, state: State) -> tuple[Outputs, State]:
        """Emit the last `delay` frames of a finished stream, as if the stream were zero-padded offline."""
        outs = []
        batch = state["frames"].shape[0]
        for k in range(self.delay):
            y, state = self.advance(torch.zeros(batch, self.input_size), state, drained=k + 1)
            outs.append(y)
        return _stack(outs), state

    @torch.no_grad()
    def stream(self, x: torch.Tensor, chunk: int = 1) -> Outputs:
        """Stream a whole sequence through step_chunk and flush, aligned to `forward`'s frames."""
        state, outs = self.init_state(x.shape[0]), []
        for t in range(0, x.shape[1], chunk):
            y, state = self.step_chunk(x[:, t:t + chunk], state)
            outs.append(y)
        if self.delay:
            outs.append(self.flush(state)[0])
        return {k: torch.cat([o[k] for o in outs], dim=1)[:, self.delay:] for k in outs[0]}


def kahan_add(total: torch.Tensor, carry: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """total + value with the low-order part rounding drops kept in the carry: the pair (sum, carry) means
    sum - carry. Sums that grow with the stream stay exact in fp32 past 2^24 terms this way."""
    v = value - carry
    t = total + v
    return t, (t - total) - v


def _kahan_add(state: State, name: str, value: torch.Tensor) -> torch.Tensor:
    """Add value to the running sum `sum.<name>`, keeping the lost low-order part in `carry.<name>`."""
    state[f"sum.{name}"], state[f"carry.{name}"] = kahan_add(state[f"sum.{name}"], state[f"carry.{name}"], value)
    return state[f"sum.{name}"]


def _stack(outs: list[Outputs]) -> Outputs:
    return {k: torch.stack([o[k] for o in outs], dim=1) for k in outs[0]}


def bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as a per-channel (scale, shift)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm1d
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a layer (BN(W x + b)) into its weight [out, ...] and bias."""
    scale, shift = bn_affine(bn)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias * scale + shift


class CenteredConvStream:
    """Streaming form of a centred Conv1d (kernel k, padding k//2, stride 1): one frame of delay per k//2.

    The stage keeps its last k-1 inputs. A stage whose input has not started yet (the counter says so) or
    has ended (drained) sees zeros: exactly the zero padding of the offline convolution.
    """

    def __init__(self, name: str, channels: int, kernel: int = 3):
        self.name, self.channels, self.kernel = name, channels, kernel

    @property
    def lag(self) -> int:
        return self.kernel // 2

    def state_shape(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {self.name: ((self.channels, self.kernel - 1), "float32")}

    def push(self, x: torch.Tensor, state: State, ended: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append input frames x [B, K, C]; return for each of the K output frames (each `lag` frames behind its
        input) the window it convolves, flattened channel-major like `weight.flatten(1)`: [B, K, C * k].

        `valid` ([B, K] of 0/1) zeroes input frames that lie before the start of the stream.
        """
        if ended:
            x = torch.zeros_like(x)
        elif valid is not None:
            x = x * valid.unsqueeze(-1)
        seq = torch.cat([state[self.name], x.transpose(1, 2)], dim=-1)
        state[self.name] = seq[:, :, seq.shape[-1] - (self.kernel - 1):]
        k = x.shape[1]
        return torch.stack([seq[:, :, j:j + k] for j in range(self.kernel)], dim=-1).transpose(1, 2).flatten(2)

    def centre(self, windows: torch.Tensor) -> torch.Tensor:
        """The input frame each window is centred on, [B, K, C] (what a residual around the conv adds)."""
        return windows.unflatten(-1, (self.channels, self.kernel))[..., self.lag:self.lag + 1].squeeze(-1)

    @staticmethod
    def apply(windows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution's output frames [B, K, out] from their windows: one matrix product."""
        return frame_linear(windows, weight.flatten(1), bias)


def frame_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer over frames [B, K, in] as one 2-D product, the form kernels/cpu_gemv.py repacks."""
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def started(counter: torch.Tensor, lag: int) -> torch.Tensor:
    """1.0 where at least `lag` frames have arrived before this one (counter counts frames seen, saturating)."""
    return (counter >= lag).to(torch.float32)
