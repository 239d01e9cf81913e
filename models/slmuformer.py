"""Spiking LMUFormer (public `slmu_rnn_ms_conv1d`): spiking conv patch embedding, spiking LMU mixer, spiking MLP.

Module names and buffers follow the public code so its checkpoints load unchanged; neurons have no state-dict
entries. The maths is written once (`SLMUFormer._run`) and driven either over a whole sequence (the reference)
or one frame at a time through the streaming pipeline, so both round every sum the same way and spike alike.
The patch embedding is centred: streaming runs with one frame of delay per k=3 conv (5) and flushes at the end.
"""
from __future__ import annotations

import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import CheckpointError
from edgekit.models.lmuformer import LMUCell, _infer_theta, lmu_matrices, memory_horizon
from edgekit.streaming import CenteredConvStream, State, StreamingModel, bn_affine, fold_batchnorm, started

TAU = 2.0
CONFIGS = {
    "scv2": dict(input_size=128, dim=256, depth=1, mlp_ratio=4, num_classes=35, order=512, theta=128.0, seq_len=128),
    "tiny": dict(input_size=40, dim=32, depth=1, mlp_ratio=2, num_classes=12, order=64, theta=64.0, seq_len=64),
}


def lif_step(x: torch.Tensor, v: torch.Tensor, threshold: float, tau: float = TAU
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of spikingjelly's LIF (decay_input, hard reset to 0) with a plain comparison, so it exports."""
    h = v + (x - v) / tau
    s = (h >= threshold).to(h.dtype)
    return s, h * (1.0 - s)


def _fire_at_or_above(mem_minus_threshold: torch.Tensor) -> torch.Tensor:
    # snntorch fires on mem - threshold > 0; the reference fires on H >= threshold
    return (mem_minus_threshold >= 0).to(mem_minus_threshold.dtype)


class LIF(nn.Module):
    """spikingjelly's MultiStepLIFNode(tau=2, decay_input, v_reset=0) over frames (dim 1), built on snntorch.Leaky.

    Equal to `lif_step` bit for bit. No parameters and no state-dict entries, like the public neurons.
    """

    def __init__(self, size: int, threshold: float = 1.0, tau: float = TAU):
        super().__init__()
        self.size, self.threshold, self.tau, self.layer = size, threshold, tau, ""
        # beta=1 fed (X - V)/tau: beta=1-1/tau fed X/tau rounds differently from V + (X - V)/tau (1 ulp, 1/3 of steps)
        self.neuron = snn.Leaky(beta=1.0, threshold=threshold, spike_grad=_fire_at_or_above,
                                reset_mechanism="zero", reset_delay=False)
        for name, buf in list(self.neuron.named_buffers(recurse=False)):
            self.neuron.register_buffer(name, buf, persistent=False)  # snntorch saves its constants as buffers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spikes and membranes after reset, both [B, T, ...], from membranes at 0."""
        v, spikes, membranes = torch.zeros_like(x[:, 0]), [], []
        for t in range(x.shape[1]):
            s, v = self.neuron((x[:, t] - v) / self.tau, v)
            spikes.append(s)
            membranes.append(v)
        return torch.stack(spikes, 1), torch.stack(membranes, 1)


class PatchEmbed(nn.Module):
    """`patch_embed` (public Conv1d4EBMs): 3 x (conv k3 -> BN -> LIF), proj_conv3, then x + rpe_conv(LIF(BN(x)))."""

    def __init__(self, input_size: int, dim: int):
        super().__init__()
        self.proj_conv, self.proj_bn, self.proj_lif = _conv3(input_size, dim), nn.BatchNorm1d(dim), LIF(dim)
        self.proj_conv1, self.proj_bn1, self.proj_lif1 = _conv3(dim, dim), nn.BatchNorm1d(dim), LIF(dim)
        self.proj_conv2, self.proj_bn2, self.proj_lif2 = _conv3(dim, dim), nn.BatchNorm1d(dim), LIF(dim)
        self.proj_conv3, self.proj_bn3, self.proj_lif3 = _conv3(dim, dim), nn.BatchNorm1d(dim), LIF(dim)
        self.rpe_conv = _conv3(dim, dim)


def _conv3(cin: int, cout: int) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, kernel_size=3, padding=1, bias=False)


class SpikingLMUCell(LMUCell):
    """`lmu` (public SpikingLMUFFTCell): the LMU buffers and FFT memory, with u, m and h spiking after a BN."""

    def __init__(self, dim: int, order: int, theta: float, seq_len: int):
        super().__init__(dim, order, theta, seq_len)
        self.bn_u, self.f_u = nn.BatchNorm1d(1), LIF(1)
        self.bn_m, self.f_m = nn.BatchNorm1d(order), LIF(order)
        self.bn_h, self.f_h = nn.BatchNorm1d(dim), LIF(dim)
        self.layer = ""

    def memory_step(self, m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """m_t = A m_{t-1} + B u_t for one frame (m [B, order], u [B, 1])."""
        return m @ self.A.T + u @ self.B.T


class SLMUMixer(nn.Module):
    """`attn` (public SLMUMs): prev_bn -> prev_lif (threshold 0.5) -> spiking LMU cell -> proj_conv -> proj_bn."""

    def __init__(self, dim: int, order: int, theta: float, seq_len: int):
        super().__init__()
        self.prev_bn, self.prev_lif = nn.BatchNorm1d(dim), LIF(dim, threshold=0.5)
        self.lmu = SpikingLMUCell(dim, order, theta, seq_len)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1)
        self.proj_bn = nn.BatchNorm1d(dim)


class SpikingConvFFN(nn.Module):
    """`mlp` (public ConvFFNMs): fc1_bn -> LIF -> fc1_conv -> fc2_bn -> LIF -> fc2_conv."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_bn, self.fc1_lif = nn.BatchNorm1d(dim), LIF(dim)
        self.fc1_conv = nn.Conv1d(dim, hidden, kernel_size=1)
        self.fc2_bn, self.fc2_lif = nn.BatchNorm1d(hidden), LIF(hidden)
        self.fc2_conv = nn.Conv1d(hidden, dim, kernel_size=1)


class Block(nn.Module):
    def __init__(self, dim: int, order: int, theta: float, seq_len: int, hidden: int):
        super().__init__()
        self.attn = SLMUMixer(dim, order, theta, seq_len)
        self.mlp = SpikingConvFFN(dim, hidden)


class _Sequence:
    """Drives the maths over whole sequences [B, T, C]: layer after layer, each LIF over all frames."""

    def __init__(self, parallel: bool):
        self.parallel = parallel
        self.spikes: dict[str, torch.Tensor] = {}

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.parallel:
            return F.linear(x, w, b)
        # frame by frame as in the step: one GEMM over all frames sums in another order, and 1 ulp flips a spike
        return torch.stack([F.linear(x[:, t].contiguous(), w, b) for t in range(x.shape[1])], dim=1)

    def conv(self, stream: CenteredConvStream, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
             ) -> torch.Tensor:
        pad = stream.lag
        windows = F.pad(x, (0, 0, pad, pad)).unfold(1, stream.kernel, 1)  # [B, T, C, k], zero padded
        return self.linear(windows.flatten(2), w.flatten(1), b)  # as CenteredConvStream.apply, per frame

    def residual_conv(self, stream: CenteredConvStream, x: torch.Tensor, s: torch.Tensor, w: torch.Tensor
                      ) -> torch.Tensor:
        return x + self.conv(stream, s, w)

    def lif(self, lif: LIF, x: torch.Tensor) -> torch.Tensor:
        self.spikes[lif.layer] = s = lif(x)[0]
        return s

    def memory(self, cell: SpikingLMUCell, u: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return cell.memory(u)
        m, out = u.new_zeros(u.shape[0], cell.order), []
        for t in range(u.shape[1]):
            m = cell.memory_step(m, u[:, t])
            out.append(m)
        return torch.stack(out, dim=1)


class _Frame:
    """Drives the maths on one frame [B, C] through the pipeline: conv windows, membranes and memory in `state`.

    `lag` counts the frames of delay accumulated so far: a stage computes frame t - lag, which exists once
    `frames >= lag`; before that its neurons stay at rest, and a conv input frame past the end is zero padding.
    """

    def __init__(self, state: State, drained: int, frames: torch.Tensor):
        self.state, self.drained, self.frames, self.lag = state, drained, frames, 0
        self.spikes: dict[str, torch.Tensor] = {}

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, b)

    def _push(self, stream: CenteredConvStream, x: torch.Tensor) -> torch.Tensor:
        """The frame's window [B, 1, C * k] (channel-major, like weight.flatten(1))."""
        window = stream.push(x.unsqueeze(1), self.state, ended=self.lag < self.drained,
                             valid=started(self.frames, self.lag))
        self.lag += stream.lag
        return window

    def conv(self, stream: CenteredConvStream, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
             ) -> torch.Tensor:
        return stream.apply(self._push(stream, x), w, b)[:, 0]

    def residual_conv(self, stream: CenteredConvStream, x: torch.Tensor, s: torch.Tensor, w: torch.Tensor
                      ) -> torch.Tensor:
        # x rides in the window with its spikes, so the residual leaves aligned with the centred conv
        window, c = self._push(stream, torch.cat([x, s], dim=-1)), x.shape[-1]
        return stream.centre(window)[:, 0, :c] + stream.apply(window[..., c * stream.kernel:], w)[:, 0]

    def lif(self, lif: LIF, x: torch.Tensor) -> torch.Tensor:
        valid, name = started(self.frames, self.lag), f"v.{lif.layer}"
        s, v = lif_step(x, self.state[name], lif.threshold, lif.tau)
        self.state[name] = v * valid
        self.spikes[lif.layer] = s = s * valid
        return s

    def memory(self, cell: SpikingLMUCell, u: torch.Tensor) -> torch.Tensor:
        name = f"m.{cell.layer}"
        self.state[name] = m = cell.memory_step(self.state[name], u)
        return m


def _affine(x: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    scale, shift = bn_affine(bn)
    return x * scale + shift


def _fold_1x1(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    return fold_batchnorm(conv.weight[:, :, 0], conv.bias, bn)


# the BatchNorm that feeds each LIF layer (leaf names of the public modules)
BN_BEFORE = {"proj_lif": "proj_bn", "proj_lif1": "proj_bn1", "proj_lif2": "proj_bn2", "proj_lif3": "proj_bn3",
             "prev_lif": "prev_bn", "f_u": "bn_u", "f_m": "bn_m", "f_h": "bn_h", "fc1_lif": "fc1_bn",
             "fc2_lif": "fc2_bn", "head_lif": "head_bn"}


class SLMUFormer(StreamingModel):
    """Spiking LMUFormer for per-frame classification; outputs `logits`, `mean_logits` (the public output is the
    last frame's mean) and, with `spikes=True` or `emit_spikes()`, `spikes.<layer>` for every LIF layer."""

    family = "slmuformer"

    def __init__(self, input_size: int = 128, dim: int = 256, depth: int = 1, mlp_ratio: float = 4,
                 num_classes: int = 35, order: int | None = None, theta: float = 128.0, seq_len: int = 128,
                 spikes: bool = True):
        super().__init__()
        order = order or 2 * dim
        self._config = dict(input_size=input_size, dim=dim, depth=depth, mlp_ratio=mlp_ratio,
                            num_classes=num_classes, order=order, theta=float(theta), seq_len=seq_len)
        self.input_size = input_size
        self.patch_embed = PatchEmbed(input_size, dim)
        self.block = nn.ModuleList(Block(dim, order, theta, seq_len, int(dim * mlp_ratio)) for _ in range(depth))
        self.head_bn, self.head_lif = nn.BatchNorm1d(dim), LIF(dim)
        self.head = nn.Linear(dim, num_classes)
        for name, module in self.named_modules():
            if isinstance(module, (LIF, SpikingLMUCell)):
                module.layer = name
        self.streams = [CenteredConvStream(f"conv{i}", c) for i, c in enumerate([input_size, dim, dim, dim, 2 * dim])]
        self.delay = sum(s.lag for s in self.streams)
        # the patch LIFs run 1..4 frames ahead of the output; the step emits their spikes through a FIFO that long
        p = self.patch_embed
        self.ahead = {lif.layer: self.delay - i - 1 for i, lif in
                      enumerate((p.proj_lif, p.proj_lif1, p.proj_lif2, p.proj_lif3))}
        self.running_means = {"mean_logits": "logits"}
        self.emit_spikes(spikes)
        # a membrane forgets half its value per frame (tau 2): 2^-64 is below float64 resolution, per LIF layer
        self.horizon = self.delay + memory_horizon(*lmu_matrices(order, theta)) + 64 * len(self.spike_layers())

    def config(self) -> dict:
        return {**self._config, "spikes": self.spike_outputs}

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Random weights leave a spiking model silent; set every BN from the statistics of what it sees on
        random input so each LIF layer fires at a realistic rate, and spike checks mean something."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 32, self.input_size, generator=g)
        for name, lif in [(n, m) for n, m in self.named_modules() if isinstance(m, LIF)]:
            parent, _, leaf = name.rpartition(".")
            bn = self.get_submodule(f"{parent}.{BN_BEFORE[leaf]}" if parent else BN_BEFORE[leaf])
            seen: list[torch.Tensor] = []
            hook = lif.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
            bn.reset_parameters()
            bn.running_var.fill_(1 - bn.eps)  # identity: the LIF sees the raw activation
            self.forward_frames(x, parallel=True)
            hook.remove()
            a = seen[0].flatten(0, -2)
            bn.running_mean.copy_(a.mean(0))
            bn.running_var.copy_(a.var(0) + 1e-3)
            bn.weight.copy_((0.5 + torch.rand(a.shape[1], generator=g)) * lif.threshold)
            bn.bias.copy_((0.2 + 0.7 * torch.rand(a.shape[1], generator=g)) * lif.threshold)

    def spike_layers(self) -> dict[str, tuple[int, ...]]:
        """Every LIF layer (public module path) and its size, in the order the model runs them."""
        return {m.layer: (m.size,) for m in self.modules() if isinstance(m, LIF)}

    def spike_fanout(self) -> dict[str, int]:
        """Per LIF layer, the multiply-adds per frame of the weights its spikes feed: the work an event-driven
        engine skips for every zero. (The memory's A m and the first conv see real values: never skippable.)"""
        p, fan = self.patch_embed, {}
        for lif, conv in ((p.proj_lif, p.proj_conv1), (p.proj_lif1, p.proj_conv2), (p.proj_lif2, p.proj_conv3),
                          (p.proj_lif3, p.rpe_conv)):
            fan[lif.layer] = conv.weight.numel()
        for blk in self.block:
            attn, cell, mlp = blk.attn, blk.attn.lmu, blk.mlp
            fan[attn.prev_lif.layer] = cell.W_u.weight.numel() + cell.W_h.weight.shape[0] * cell.W_u.weight.shape[1]
            fan[cell.f_u.layer] = cell.order
            fan[cell.f_m.layer] = cell.W_h.weight.shape[0] * cell.order
            fan[cell.f_h.layer] = attn.proj_conv.weight.numel()
            fan[mlp.fc1_lif.layer] = mlp.fc1_conv.weight.numel()
            fan[mlp.fc2_lif.layer] = mlp.fc2_conv.weight.numel()
        fan[self.head_lif.layer] = self.head.weight.numel()
        return fan

    def macs_per_frame(self) -> int:
        """All multiply-adds of one frame: what the spikes feed, plus the first conv and the memory recurrence."""
        return sum(self.spike_fanout().values()) + self.patch_embed.proj_conv.weight.numel() + \
            sum(blk.attn.lmu.A.numel() for blk in self.block)

    def emit_spikes(self, on: bool = True) -> "SLMUFormer":
        """Also output each LIF layer's spikes as `spikes.<layer>` from forward, step and the exported graphs."""
        self.spike_outputs = on
        spikes = {f"spikes.{k}": v for k, v in self.spike_layers().items()} if on else {}
        self.output_sizes = {"logits": (self.head.out_features,), **spikes}
        return self

    def _run(self, x: torch.Tensor, ops: _Sequence | _Frame) -> torch.Tensor:
        """The model, once: logits from input frames; `ops` decides whether over a sequence or one frame."""
        p = self.patch_embed
        s = x
        for stream, conv, bn, lif in zip(self.streams, (p.proj_conv, p.proj_conv1, p.proj_conv2),
                                         (p.proj_bn, p.proj_bn1, p.proj_bn2), (p.proj_lif, p.proj_lif1, p.proj_lif2)):
            s = ops.lif(lif, ops.conv(stream, s, *fold_batchnorm(conv.weight, None, bn)))
        x3 = ops.conv(self.streams[3], s, p.proj_conv3.weight)
        x = ops.residual_conv(self.streams[4], x3, ops.lif(p.proj_lif3, _affine(x3, p.proj_bn3)), p.rpe_conv.weight)
        for blk in self.block:
            attn, cell, mlp = blk.attn, blk.attn.lmu, blk.mlp
            xs = ops.lif(attn.prev_lif, _affine(x, attn.prev_bn))
            u = ops.lif(cell.f_u, ops.linear(xs, *fold_batchnorm(cell.W_u.weight, cell.W_u.bias, cell.bn_u)))
            ms = ops.lif(cell.f_m, _affine(ops.memory(cell, u), cell.bn_m))
            h = ops.lif(cell.f_h, ops.linear(torch.cat([ms, xs], dim=-1),
                                             *fold_batchnorm(cell.W_h.weight, cell.W_h.bias, cell.bn_h)))
            x = x + ops.linear(h, *_fold_1x1(attn.proj_conv, attn.proj_bn))
            f = ops.lif(mlp.fc1_lif, _affine(x, mlp.fc1_bn))
            f = ops.lif(mlp.fc2_lif, ops.linear(f, *_fold_1x1(mlp.fc1_conv, mlp.fc2_bn)))
            x = x + ops.linear(f, mlp.fc2_conv.weight[:, :, 0], mlp.fc2_conv.bias)
        return ops.linear(ops.lif(self.head_lif, _affine(x, self.head_bn)), self.head.weight, self.head.bias)

    def _outputs(self, logits: torch.Tensor, spikes: dict[str, torch.Tensor], with_spikes: bool
                 ) -> dict[str, torch.Tensor]:
        return {"logits": logits, **({f"spikes.{k}": v for k, v in spikes.items()} if with_spikes else {})}

    def forward_frames(self, x: torch.Tensor, return_spikes: bool | None = None, parallel: bool | None = None
                       ) -> dict[str, torch.Tensor]:
        """Per-frame outputs over any length T. `parallel=True` computes like the public code (one GEMM over all
        frames, FFT memory): faster, but rounded differently from the step, so a spike may flip at a threshold."""
        if parallel is None:  # float64 is the validation reference: its rounding is far below the artifact's
            parallel = x.dtype == torch.float64
        ops = _Sequence(parallel)
        logits = self._run(x, ops)
        return self._outputs(logits, ops.spikes, self.spike_outputs if return_spikes is None else return_spikes)

    def frame_state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for stream in self.streams:
            shapes.update(stream.state_shape())
        shapes.update({f"m.{blk.attn.lmu.layer}": ((blk.attn.lmu.order,), "float32") for blk in self.block})
        shapes.update({f"v.{k}": (size, "float32") for k, size in self.spike_layers().items()})
        if self.spike_outputs:
            shapes.update({f"s.{k}": ((self.spike_layers()[k][0], n), "float32") for k, n in self.ahead.items()})
        return shapes

    def advance_frame(self, x_t: torch.Tensor, state: State, drained: int, frames: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], State]:
        ops = _Frame(state, drained, frames)
        logits = self._run(x_t, ops)
        if self.spike_outputs:
            for layer, n in self.ahead.items():  # delay spikes to frame t - delay, like every other output
                fifo = torch.cat([state[f"s.{layer}"], ops.spikes[layer].unsqueeze(-1)], dim=-1)
                ops.spikes[layer], state[f"s.{layer}"] = fifo[..., 0], fifo[..., 1:]
        return self._outputs(logits, ops.spikes, self.spike_outputs), state


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Read the configuration off a state dict's shapes (theta is checked against A, B later)."""
    try:
        dim, input_size = sd["patch_embed.proj_conv.weight"].shape[:2]
        a, b = sd["block.0.attn.lmu.A"], sd["block.0.attn.lmu.B"]
        return dict(input_size=input_size, dim=dim, depth=len({k.split(".")[1] for k in sd if k.startswith("block.")}),
                    mlp_ratio=sd["block.0.mlp.fc1_conv.weight"].shape[0] / dim, num_classes=sd["head.weight"].shape[0],
                    order=a.shape[0], theta=_infer_theta(a, b), seq_len=sd["block.0.attn.lmu.H"].shape[1])
    except KeyError as e:
        raise CheckpointError(f"not a spiking LMUFormer (slmu_rnn_ms_conv1d) state dict: key {e} is missing") from None
