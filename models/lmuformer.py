"""LMUFormer (public `lmu_rnn_conv1d`): conv patch embedding, LMU token mixer, conv MLP, per-frame head.

Module names and buffers follow the public code so its checkpoints load unchanged. The patch embedding is
centred (not causal): streaming runs it with a fixed delay of one frame per conv and flushes at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import CheckpointError
from edgekit.streaming import (CenteredConvStream, State, StreamingModel, bn_affine, fold_batchnorm, frame_linear,
                               started)

CONFIGS = {
    "scv2": dict(input_size=128, dim=256, depth=1, mlp_ratio=4, num_classes=35, theta=128.0, seq_len=128),
    "tiny": dict(input_size=40, dim=64, depth=1, mlp_ratio=2, num_classes=12, theta=64.0, seq_len=64),
}


def lmu_matrices(order: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order-hold discretised LMU (A, B) with dt = 1, in float64 (Legendre delay, Voelker et al.)."""
    q = torch.arange(order, dtype=torch.float64)
    r = ((2 * q + 1) / theta).view(-1, 1)
    i, j = torch.meshgrid(q, q, indexing="ij")
    a = r * torch.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    b = r * ((-1.0) ** q).view(-1, 1)
    m = torch.zeros(order + 1, order + 1, dtype=torch.float64)
    m[:order, :order], m[:order, order:] = a, b
    e = torch.linalg.matrix_exp(m)
    return e[:order, :order], e[:order, order:]


def impulse_response(a: torch.Tensor, b: torch.Tensor, length: int, start: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """H[:, t] = A^t B for t < length ([order, length]), optionally continuing from a given column."""
    cols, h = [], (b[:, 0] if start is None else a @ start)
    for _ in range(length):
        cols.append(h)
        h = a @ h
    return torch.stack(cols, dim=1)


def memory_horizon(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-17, limit: int = 1_000_000) -> int:
    """Frames after which A^t B has decayed below `rel` of B: past that, an input no longer moves the memory."""
    h, floor = b[:, 0], rel * float(b.abs().max())
    for t in range(limit):
        if float(h.abs().max()) < floor:
            return t
        h = a @ h
    return limit


class LMUCell(nn.Module):
    """The LMU memory cell: u = ReLU(W_u x), m_t = A m_{t-1} + B u_t, h = ReLU(W_h [m; x])."""

    def __init__(self, dim: int, order: int, theta: float, seq_len: int):
        super().__init__()
        self.order, self.theta = order, theta
        self.W_u = nn.Linear(dim, 1)
        self.W_h = nn.Linear(order + dim, dim)
        a, b = lmu_matrices(order, theta)
        self.register_buffer("A", a.float())
        self.register_buffer("B", b.float())
        h = impulse_response(self.A, self.B, seq_len)
        self.register_buffer("H", h)
        self.register_buffer("fft_H", torch.fft.rfft(h, n=2 * seq_len, dim=-1))

    def impulse(self, length: int) -> torch.Tensor:
        """A^t B for t < length: the stored H where it reaches, extended by the recurrence beyond it."""
        if self.A.dtype == torch.float64:
            return impulse_response(self.A, self.B, length)
        stored = self.H[:, :length]
        if length <= stored.shape[1]:
            return stored
        return torch.cat([stored, impulse_response(self.A, self.B, length - stored.shape[1], stored[:, -1])], 1)

    def memory(self, u: torch.Tensor) -> torch.Tensor:
        """Parallel memory [B, T, order] of u [B, T, 1]: causal convolution with H by FFT of length 2T."""
        t = u.shape[1]
        fft_h = self.fft_H if t == self.H.shape[1] and u.dtype == self.fft_H.real.dtype else \
            torch.fft.rfft(self.impulse(t), n=2 * t, dim=-1)
        fft_u = torch.fft.rfft(u.transpose(1, 2), n=2 * t, dim=-1)
        return torch.fft.irfft(fft_u * fft_h.unsqueeze(0), n=2 * t, dim=-1)[:, :, :t].transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.relu(self.W_u(x))
        return F.relu(self.W_h(torch.cat([self.memory(u), x], dim=-1)))

    def step(self, x: torch.Tensor, m: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames x [B, K, dim] from memory m [B, order]; `valid` [B, K] keeps frames before the stream out."""
        u = F.relu(frame_linear(x, self.W_u.weight, self.W_u.bias)) * valid.unsqueeze(-1)
        memory = []
        for k in range(x.shape[1]):  # the recurrence is sequential and cheap; everything around it is batched
            m = m @ self.A.T + u[:, k] @ self.B.T
            memory.append(m)
        return F.relu(frame_linear(torch.cat([torch.stack(memory, 1), x], dim=-1), self.W_h.weight, self.W_h.bias)), m


class LMUMixer(nn.Module):
    """`attn` of the public block: the LMU cell over time, then a 1x1 conv and BatchNorm."""

    def __init__(self, dim: int, order: int, theta: float, seq_len: int):
        super().__init__()
        self.lmu = LMUCell(dim, order, theta, seq_len)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1)
        self.proj_bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lmu(x.transpose(1, 2)).transpose(1, 2)
        return self.proj_bn(self.proj_conv(h))


class ConvMLP(nn.Module):
    """`mlp` of the public block: 1x1 conv, BN, GELU, 1x1 conv, BN, ReLU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_conv = nn.Conv1d(dim, hidden, kernel_size=1)
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc2_conv = nn.Conv1d(hidden, dim, kernel_size=1)
        self.fc2_bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2_bn(self.fc2_conv(F.gelu(self.fc1_bn(self.fc1_conv(x))))))


class Block(nn.Module):
    def __init__(self, dim: int, order: int, theta: float, seq_len: int, hidden: int):
        super().__init__()
        self.attn = LMUMixer(dim, order, theta, seq_len)
        self.mlp = ConvMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class PatchEmbed(nn.Module):
    """`patch_embed` (public `Tokenizer`): n x (conv k3 -> ReLU -> Identity -> BN), then x + rpe_conv(x)."""

    def __init__(self, input_size: int, dim: int, layers: int = 4):
        super().__init__()
        chans = [input_size] + [dim] * layers
        self.conv_layers = nn.Sequential(*[nn.Sequential(
            nn.Conv1d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.ReLU(), nn.Identity(),
            nn.BatchNorm1d(chans[i + 1])) for i in range(layers)])
        self.rpe_conv = nn.Conv1d(dim, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(x)
        return x + self.rpe_conv(x)


class LMUFormer(StreamingModel):
    """LMUFormer for per-frame classification; outputs `logits` and `mean_logits` (the prefix average)."""

    family = "lmuformer"

    def __init__(self, input_size: int = 128, dim: int = 256, depth: int = 1, mlp_ratio: float = 4,
                 num_classes: int = 35, theta: float = 128.0, seq_len: int = 128, order: int | None = None,
                 embed_layers: int = 4):
        super().__init__()
        self._config = dict(input_size=input_size, dim=dim, depth=depth, mlp_ratio=mlp_ratio,
                            num_classes=num_classes, theta=float(theta), seq_len=seq_len,
                            order=order or dim, embed_layers=embed_layers)
        self.input_size, self.dim, self.order = input_size, dim, order or dim
        self.patch_embed = PatchEmbed(input_size, dim, embed_layers)
        self.block = nn.ModuleList(Block(dim, self.order, theta, seq_len, int(dim * mlp_ratio)) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)
        self.output_sizes = {"logits": (num_classes,)}
        self.running_means = {"mean_logits": "logits"}
        self.convs = [CenteredConvStream(f"conv{i}", c.shape[1]) for i, c in
                      enumerate([layer[0].weight for layer in self.patch_embed.conv_layers] +
                                [self.patch_embed.rpe_conv.weight])]
        self.delay = sum(c.lag for c in self.convs)
        self.horizon = self.delay + memory_horizon(*lmu_matrices(self.order, theta))

    def config(self) -> dict:
        return dict(self._config)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame features before the head, [B, T, dim]."""
        x = self.patch_embed(x.transpose(1, 2))
        for blk in self.block:
            x = blk(x)
        return x.transpose(1, 2)

    def forward_frames(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.features(x))}

    def frame_state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        shapes = {}
        for conv in self.convs:
            shapes.update(conv.state_shape())
        return {**shapes, **{f"memory{j}": ((self.order,), "float32") for j in range(len(self.block))}}

    def advance_frame(self, x_t: torch.Tensor, state: State, drained: int, frames: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], State]:
        y, state = self._advance(x_t.unsqueeze(1), state, drained, frames)
        return {k: v[:, 0] for k, v in y.items()}, state

    def advance_chunk(self, x: torch.Tensor, state: State) -> tuple[dict[str, torch.Tensor], State]:
        return self._advance(x, state, 0, self.chunk_offsets(state, x.shape[1]))

    def _advance(self, x: torch.Tensor, state: State, drained: int, seen: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], State]:
        """Frames x [B, K, F] through the pipeline; seen [B, K] counts the frames before each one."""
        h, last = x, len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            windows = conv.push(h, state, ended=i < drained, valid=started(seen, i))
            if i == last:
                h = conv.centre(windows) + conv.apply(windows, self.patch_embed.rpe_conv.weight)
            else:
                layer = self.patch_embed.conv_layers[i]
                scale, shift = bn_affine(layer[3])
                h = F.relu(conv.apply(windows, layer[0].weight)) * scale + shift
        x, valid = h, started(seen, self.delay)
        for j, blk in enumerate(self.block):
            h, state[f"memory{j}"] = blk.attn.lmu.step(x, state[f"memory{j}"], valid)
            w, b = fold_batchnorm(blk.attn.proj_conv.weight, blk.attn.proj_conv.bias, blk.attn.proj_bn)
            x = x + frame_linear(h, w[:, :, 0], b)
            w1, b1 = fold_batchnorm(blk.mlp.fc1_conv.weight, blk.mlp.fc1_conv.bias, blk.mlp.fc1_bn)
            w2, b2 = fold_batchnorm(blk.mlp.fc2_conv.weight, blk.mlp.fc2_conv.bias, blk.mlp.fc2_bn)
            x = x + F.relu(frame_linear(F.gelu(frame_linear(x, w1[:, :, 0], b1)), w2[:, :, 0], b2))
        return {"logits": frame_linear(x, self.head.weight, self.head.bias)}, state


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Read the configuration off a state dict's shapes (theta is checked against A, B later)."""
    try:
        embed_layers = len({k.split(".")[2] for k in sd if k.startswith("patch_embed.conv_layers.")})
        depth = len({k.split(".")[1] for k in sd if k.startswith("block.")})
        a, b = sd["block.0.attn.lmu.A"], sd["block.0.attn.lmu.B"]
        return dict(input_size=sd["patch_embed.conv_layers.0.0.weight"].shape[1],
                    dim=sd["patch_embed.rpe_conv.weight"].shape[0], depth=depth,
                    mlp_ratio=sd["block.0.mlp.fc1_conv.weight"].shape[0] / sd["patch_embed.rpe_conv.weight"].shape[0],
                    num_classes=sd["head.weight"].shape[0], order=a.shape[0], embed_layers=embed_layers,
                    seq_len=sd["block.0.attn.lmu.H"].shape[1], theta=_infer_theta(a, b))
    except KeyError as e:
        raise CheckpointError(f"not an LMUFormer (lmu_rnn_conv1d) state dict: key {e} is missing") from None


def _infer_theta(a: torch.Tensor, b: torch.Tensor) -> float:
    """theta (>= 1, any real: the public code takes any) of ZOH LMU matrices; check_buffers refuses other matrices.

    B[0] is the memory's step response at tau = 1/theta: smooth and increasing from 0 up to about 1 at theta = 1
    (under one frame it rings near 1, so theta is not identifiable there), with slope (A B_c)[0], B_c the continuous
    B at theta = 1. Newton's method on it finds theta to float32 precision at any order in a few steps, starting from
    1/B[0], which is only theta's large-order limit: a few frames off at small orders (order 16, theta 128: 126.6).
    The shortest rounding that reproduces A and B to float32 rounding is returned, so configs read 128.
    """
    order, b0 = a.shape[0], float(b[0, 0])
    if not b0 > 0:
        raise CheckpointError(f"block.0.attn.lmu.B[0] is {b0:g}: not a zero-order-hold LMU matrix for any theta")
    q = torch.arange(order, dtype=torch.float64)
    b_c, tau = (2 * q + 1) * (-1.0) ** q, b0
    for _ in range(20):
        ad, bd = lmu_matrices(order, 1 / tau)
        step = (float(bd[0, 0]) - b0) / float(ad[0] @ b_c)
        new = min(max(tau - step, b0 / 2), 1.0)  # stays where B[0] is monotone in tau
        if abs(new - tau) < 1e-12 * tau:
            break
        tau = new
    for digits in range(7):
        theta = round(1 / tau, digits)
        if _reproduces(a, b, theta):
            return theta
    return 1 / tau


def _reproduces(a: torch.Tensor, b: torch.Tensor, theta: float) -> bool:
    """Whether A, B are the ZOH matrices of theta up to float32 rounding (one ulp of each matrix's largest entry)."""
    eps = torch.finfo(torch.float32).eps
    return all(float((want - got.double()).abs().max()) <= eps * float(got.abs().max())
               for want, got in zip(lmu_matrices(a.shape[0], theta), (a, b)))


def check_buffers(model: LMUFormer, tol: float = 1e-4) -> None:
    """The stored LMU buffers must be the ZOH matrices of the model's (order, theta): else refuse the checkpoint."""
    for j, blk in enumerate(model.block):
        cell = blk.attn.lmu
        a, b = lmu_matrices(cell.order, cell.theta)
        h = impulse_response(a, b, cell.H.shape[1])
        expected = {"A": a, "B": b, "H": h, "fft_H": torch.fft.rfft(h, n=2 * h.shape[1], dim=-1)}
        for name, want in expected.items():
            got = getattr(cell, name).to(want.dtype)
            err = float((got - want).abs().max())
            scale = max(1.0, float(want.abs().max()))
            if err > tol * scale:
                raise CheckpointError(
                    f"block.{j}.attn.lmu.{name} is not the zero-order-hold LMU matrix for order {cell.order}, "
                    f"theta {cell.theta:g} (max difference {err:.3g}); the checkpoint was built with other LMU "
                    f"matrices (Euler discretisation, or another theta) and cannot be reproduced exactly")
