"""The contracts models implement, one per unit, and the pieces every streaming model shares.

`StreamingModel` (frame unit): a model implements `forward` (parallel, the reference) and `advance` (one frame
through the streaming pipeline); everything else a deployment needs (step, chunked step, flush, state specs, the
running mean of the outputs, its exported entries) is built here once, so that families differ only in their
maths. `SegmentModel` (segment unit): a segment-level LM implements its segment step, decode step and reference;
its specs, entries, eager engine and scoring are built here.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.artifact import TensorSpec

State = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]


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
    unit = "frame"
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

    def spike_fanout(self) -> dict[str, int]:
        """Spiking models: per spike layer, the multiply-adds per frame its spikes feed (none by default)."""
        return {}

    def forward(self, x: torch.Tensor) -> Outputs:
        """The reference: per-frame outputs over the whole sequence, running means included."""
        y = self.forward_frames(x)
        count = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        return {**y, **{name: torch.cumsum(y[src], dim=1) / count for name, src in self.running_means.items()}}

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The family's state plus the frame counter and, per running mean, a compensated (Kahan) sum and
        count: a plain float32 mean drifts by about eps * sqrt(frames), and a float32 count stops at 2^24."""
        sizes = {name: self.output_sizes[src] for name, src in self.running_means.items()}
        sums = {f"{part}.{name}": (size, "float32")
                for name, size in {**sizes, **({"count": (1,)} if sizes else {})}.items()
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

    def entry(self, frames: int, batch: int = 1, packed: bool = False
              ) -> tuple[nn.Module, dict[str, np.ndarray], list[str]]:
        """An entry point over flat tensors for export: step_chunk over `frames` frames (0: flush), its example
        inputs (random frames, a mid-stream state) and its output names (outputs, then the state after it).
        `packed`: the state as one flat vector in, the outputs and the state as two flat vectors out (what the
        compiled library runs: two tensors cross each call, whatever the number of state tensors)."""
        inputs = self.example_inputs(frames, batch)
        if packed:
            state = np.concatenate([v.reshape(-1) for k, v in inputs.items() if k != "x"])
            return (PackedStepEntry(self, frames, batch).eval(), {**({"x": inputs["x"]} if frames else {}),
                                                                 "state": state}, ["outputs", "state_out"])
        wrapper = StepEntry(self, frames).eval()
        return wrapper, inputs, [*wrapper.output_names, *[f"state_out.{n}" for n in wrapper.state_names]]

    def example_inputs(self, frames: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random input frames and a mid-stream state (the model stepped over a few frames), as numpy."""
        g = torch.Generator().manual_seed(seed)
        state = self.init_state(batch)
        with torch.no_grad():
            for _ in range(self.delay + 2):
                _, state = self.step(torch.randn(batch, self.input_size, generator=g), state)
        x = {"x": torch.randn(batch, frames, self.input_size, generator=g)} if frames else {}
        return {k: v.numpy() for k, v in {**x, **{f"state.{k}": v for k, v in state.items()}}.items()}

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


class Entry(nn.Module):
    """An exported entry point: a module over flat tensors. `named` says what its outputs mean, tensor by
    tensor, for the export check against ONNX Runtime (by default: the outputs as they are)."""

    def named(self, names: list[str], values: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
        return names, values


class StepEntry(Entry):
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


class PackedStepEntry(StepEntry):
    """StepEntry over one flat float32 state vector: (x?, state [S]) -> (outputs [O], state [S]), the outputs
    flattened in order and concatenated, the state tensors likewise."""

    def __init__(self, model: StreamingModel, frames: int, batch: int):
        super().__init__(model, frames)
        self.shapes = [s.shape for s in model.state_spec(batch)]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *x, flat = args
        state = [p.reshape(s) for p, s in zip(torch.split(flat, [math.prod(s) for s in self.shapes]), self.shapes)]
        out = super().forward(*x, *state)
        n = len(self.output_names)
        return torch.cat([o.reshape(-1) for o in out[:n]]), torch.cat([s.reshape(-1) for s in out[n:]])

    def named(self, names: list[str], values: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
        """The packed state split back into its tensors (`state_out.<name>`), so that a Kahan pair is checked as
        the value it stands for; the outputs stay one vector."""
        sizes = np.cumsum([math.prod(s) for s in self.shapes])[:-1]
        state = np.split(values[1], sizes)
        return [names[0], *[f"state_out.{n}" for n in self.state_names]], [values[0], *state]


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


class SegmentModel(nn.Module):
    """A language model that streams tokens in segments of `segment_length` with a fixed-shape state between
    segments (the segment unit). A family sets `family` and implements:
    - `segment_step(tokens [B, L], length [B], state) -> ({outputs (logits [B, L, V] first), decode cache}, state)`:
      one padded segment of which the first `length` tokens are real;
    - `decode_step(token [B], cache) -> (logits [B, V], cache)`: one more token inside the current segment;
    - `reference_outputs(tokens [B, T], carry) -> ({logits [B, T, V], other outputs [B, segments, ...]}, carry)`:
      its algorithm as written, continuing a stream (carry None: a new one);
    - `segment_length`, `summary_length` (segment positions whose context is rebuilt with every token; from then
      on decode steps continue it), `warm_segments` (segments after which every slot of the state was written),
      `state_shapes()`, `output_spec(batch)`, `kv_spec(batch)`, `config()`;
    - optionally `fetched_examples(batch)`: tensors fetched once per document (not state: no call changes them)
      that both steps take as extra trailing arguments, e.g. a memory block; none by default.
    Specs, exported entries, the eager engine and scoring over the fixed-shape step are built here.
    """

    family: str = ""
    unit = "segment"
    segment_length: int
    summary_length: int
    warm_segments: int

    def init_random(self, seed: int) -> None:
        """Named configs use the family's own initialisation as it is."""

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        raise NotImplementedError

    def output_spec(self, batch: int = 1) -> list[TensorSpec]:
        raise NotImplementedError

    def kv_spec(self, batch: int = 1) -> list[TensorSpec]:
        raise NotImplementedError

    def state_spec(self, batch: int = 1) -> list[TensorSpec]:
        return [TensorSpec(n, (batch, *s), t) for n, (s, t) in self.state_shapes().items()]

    def fetched_examples(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """Example values of the per-document inputs both steps take after the state or cache (none here)."""
        return {}

    def state_bytes(self, batch: int = 1) -> int:
        return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in self.state_spec(batch))

    def init_state(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> State:
        return {s.name: torch.zeros(s.shape, dtype=dtype if s.dtype == "float32" else getattr(torch, s.dtype))
                for s in self.state_spec(batch)}

    @torch.no_grad()
    def entries(self, batch: int = 1, seed: int = 0) -> list[tuple[str, nn.Module, dict, list[str]]]:
        """[(entry, module, example inputs {name: ndarray}, output names)] for `segment` and `decode`. The examples
        are mid-stream: the state has wrapped, the segment is padded, the decode cache is partly full."""
        g = torch.Generator().manual_seed(seed)
        L, vocab = self.segment_length, self.output_spec(batch)[0].shape[-1]
        state = self.init_state(batch)
        for _ in range(self.warm_segments + 1):
            _, state = self.segment_step(torch.randint(0, vocab, (batch, L), generator=g), torch.full((batch,), L),
                                         state)
        tokens = torch.randint(0, vocab, (batch, L), generator=g)
        out, _ = self.segment_step(tokens, torch.full((batch,), min(self.summary_length, L - 1)), state)
        cache = [s.name for s in self.kv_spec(batch)]
        np_ = lambda d: {k: v.numpy() for k, v in d.items()}  # noqa: E731
        fetched = self.fetched_examples(batch)
        seg_inputs = {"tokens": tokens, "length": torch.full((batch,), max(L - 3, 1)), **state, **fetched}
        dec_inputs = {"token": torch.randint(0, vocab, (batch,), generator=g), **{n: out[n] for n in cache},
                      **fetched}
        outputs = [s.name for s in self.output_spec(batch)]
        return [("segment", SegmentEntry(self, outputs + cache).eval(), np_(seg_inputs),
                 [*outputs, *cache, *[f"state_out.{n}" for n in self.state_shapes()]]),
                ("decode", DecodeEntry(self, cache).eval(), np_(dec_inputs), ["logits", *[f"{n}_out" for n in cache]])]

    def numpy_engine(self) -> "TorchEngine":
        """The fixed-shape steps in eager PyTorch behind the numpy engine interface of the segment unit."""
        return TorchEngine(self)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of the fixed-shape step over a stream [B, T] from its start: logits [B, T, V], the others
        [B, segments, ...]."""
        b, total = tokens.shape
        state, outs = self.init_state(b, next(self.parameters()).dtype), []
        names = [s.name for s in self.output_spec(b)]
        for start in range(0, total, self.segment_length):
            seg = tokens[:, start:start + self.segment_length]
            n = seg.shape[1]
            out, state = self.segment_step(F.pad(seg, (0, self.segment_length - n)), torch.full((b,), n), state)
            outs.append({k: out[k][:, :n] if k == "logits" else out[k] for k in names})
        return {k: torch.cat([o[k] for o in outs], 1) if k == "logits" else torch.stack([o[k] for o in outs], 1)
                for k in names}


class SegmentEntry(Entry):
    """(tokens, length, *state, *fetched) -> (*outputs, *decode cache, *state)."""

    def __init__(self, model: SegmentModel, names: list[str]):
        super().__init__()
        self.model, self.names, self.state_names = model, names, list(model.state_shapes())

    def forward(self, tokens, length, *args):
        cut = len(self.state_names)
        out, new = self.model.segment_step(tokens, length, dict(zip(self.state_names, args[:cut])), *args[cut:])
        return (*[out[n] for n in self.names], *[new[n] for n in self.state_names])


class DecodeEntry(Entry):
    """(token, *decode cache, *fetched) -> (logits, *decode cache)."""

    def __init__(self, model: SegmentModel, cache: list[str]):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, token, *args):
        cut = len(self.cache)
        logits, new = self.model.decode_step(token, dict(zip(self.cache, args[:cut])), *args[cut:])
        return (logits, *[new[n] for n in self.cache])


class TorchEngine:
    """A SegmentModel's steps in eager PyTorch, numpy in and out, behind the segment unit's engine interface;
    `fetched` holds the per-document inputs of models that take them."""

    def __init__(self, model: SegmentModel):
        self.model, self.fetched = model.eval(), []
        self.segment_length, self.summary_length = model.segment_length, model.summary_length
        self.outputs, self.cache = [s.name for s in model.output_spec()], [s.name for s in model.kv_spec()]
        self.vocab = model.output_spec()[0].shape[-1]

    def init_state(self) -> State:
        return self.model.init_state(1, next(self.model.parameters()).dtype)

    def begin(self, document: np.ndarray) -> None:
        """A new document starts (the per-document inputs, if any, are set in `fetched` by the caller)."""

    @torch.no_grad()
    def segment(self, tokens: np.ndarray, length: int, state: State) -> tuple[dict[str, np.ndarray], State, State]:
        out, new = self.model.segment_step(torch.from_numpy(tokens).view(1, -1), torch.tensor([length]), state,
                                           *self.fetched)
        return {n: out[n][0].numpy() for n in self.outputs}, {n: out[n] for n in self.cache}, new

    @torch.no_grad()
    def decode(self, token: int, cache: State) -> tuple[np.ndarray, State]:
        logits, cache = self.model.decode_step(torch.tensor([token]), cache, *self.fetched)
        return logits[0].numpy(), cache
