"""Aaren ("Attention as an RNN", Feng et al. 2024, arXiv 2405.13956) for per-frame classification.

Each layer attends with a learned, input-independent query per head over every prefix of its input. That
softmax is an associative scan over (m, u, w) = (running max score, sum of e^{s-m}, sum of v e^{s-m}), so one
operator serves three forms that must agree: the parallel reference (a log-depth scan over time), the step
(the O(1)-memory recurrence: the carried state combined with one token) and the chunked step (a scan over
the chunk combined with the carried state). The carried u and w grow with the stream (u up to the token count),
so the step and the chunk add into them with Kahan compensation: a plain fp32 u stops counting at 2^24 tokens
while w goes on, and the output w / u drifts. `SoftmaxKVCache` runs the same weights as ordinary softmax
attention over a growing KV cache: the baseline Aaren's constant memory is measured against.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from edgekit.errors import CheckpointError
from edgekit.streaming import State, StreamingModel, kahan_add

CONFIGS = {
    "small": dict(input_size=16, d_model=64, layers=2, heads=4, ffn=128, num_classes=10),
    "base": dict(input_size=16, d_model=128, layers=4, heads=8, ffn=256, num_classes=10),
}

# Stands in for m = -inf, which ONNX/TVM handle poorly: e^{NEG - s} is exactly 0 for any real score, and
# NEG - NEG is 0 where -inf - -inf would be NaN.
NEG = -1e30

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # m [..., H], u [..., H], w [..., H, D]
# A triple plus the Kahan carries of u and w (u - du and w - dw are the sums): one layer's streamed state.
Carried = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # m, u, w, du, dw


def align(ma: torch.Tensor, ua: torch.Tensor, mb: torch.Tensor, ub: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The common max m of two sides and their factors e^{ma - m}, e^{mb - m}. A side with u == 0 is empty
    whatever its m holds (0 from a zero-initialised state, -inf, NEG): its m is replaced by NEG, so it neither
    sets the max nor makes NaN, and the first real token gets weight e^0 = 1 exactly."""
    ma, mb = torch.where(ua > 0, ma, NEG), torch.where(ub > 0, mb, NEG)
    m = torch.maximum(ma, mb)
    return m, torch.exp(ma - m), torch.exp(mb - m)


def combine(a: Triple, b: Triple) -> Triple:
    """(m, u, w) of token set A followed by token set B."""
    (ma, ua, wa), (mb, ub, wb) = a, b
    m, ea, eb = align(ma, ua, mb, ub)
    return m, ua * ea + ub * eb, wa * ea.unsqueeze(-1) + wb * eb.unsqueeze(-1)


def absorb(state: Carried, new: Triple) -> Carried:
    """combine(state, new) for the streamed state. u sums a weight e^{s-m} <= 1 per token, so while the max holds
    it grows with the stream (to the token count when scores are equal), and w with it; in fp32 a plain u + 1
    rounds back to u from 2^24 on. u and w are therefore Kahan-summed, the carries rescaled with their sums."""
    (m, u, w, du, dw), (mb, ub, wb) = state, new
    m, ea, eb = align(m, u, mb, ub)
    u, du = kahan_add(u * ea, du * ea, ub * eb)
    ea, eb = ea.unsqueeze(-1), eb.unsqueeze(-1)
    w, dw = kahan_add(w * ea, dw * ea, wb * eb)
    return m, u, w, du, dw


def start(summary: Triple) -> Carried:
    """A triple as streamed state: nothing lost to rounding yet."""
    m, u, w = summary
    return m, u, w, torch.zeros_like(u), torch.zeros_like(w)


def scan(s: torch.Tensor, v: torch.Tensor) -> Triple:
    """Inclusive prefix combine over dim 1 of leaves (s, 1, v): Hillis-Steele doubling, ceil(log2 T)
    sequential steps of whole-sequence tensor ops (no loop over time, no cummax: exportable, any T)."""
    m, u, w = s, torch.ones_like(s), v
    d = 1
    while d < s.shape[1]:
        mc, uc, wc = combine((m[:, :-d], u[:, :-d], w[:, :-d]), (m[:, d:], u[:, d:], w[:, d:]))
        m, u, w = (torch.cat([old[:, :d], new], dim=1) for old, new in ((m, mc), (u, uc), (w, wc)))
        d *= 2
    return m, u, w


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 weights (u counts tokens: fp16 overflows past 65,504), fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


class AarenAttention(nn.Module):
    """Multi-head Aaren: a learned query per head, keys and values projected from the input, output projection."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads, self.d_head = heads, d_model // heads
        self.query = nn.Parameter(torch.randn(heads, self.d_head))
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values [B, K, H, D] of normed inputs [B, K, d_model], in the weights' dtype."""
        shape = (*h.shape[:-1], self.heads, self.d_head)
        return self.key(h).view(shape), self.value(h).view(shape)

    def scores(self, k: torch.Tensor) -> torch.Tensor:
        """s = q . k / sqrt(D) per head, in the accumulator dtype."""
        acc = accumulator(k.dtype)
        s = k.to(acc).unsqueeze(-2) @ self.query.to(acc).unsqueeze(-1)  # [..., H, 1, D] @ [H, D, 1]
        return s[..., 0, 0] / math.sqrt(self.d_head)

    def mix(self, h: torch.Tensor, carry: Carried | None) -> tuple[torch.Tensor, Carried]:
        """Attention outputs [B, K, H*D] over every prefix of h (after the tokens `carry` summarises), and the
        state after the last token. With K = 1 this is the recurrence m_k = max(m_{k-1}, s_k) etc."""
        k, v = self.keys_values(h)
        m, u, w = scan(self.scores(k), v.to(accumulator(v.dtype)))
        if carry is None:
            last = start((m[:, -1], u[:, -1], w[:, -1]))
        else:
            m, u, w, du, dw = absorb(tuple(c.to(m.dtype).unsqueeze(1) for c in carry), (m, u, w))
            last = (m[:, -1], u[:, -1], w[:, -1], du[:, -1], dw[:, -1])
        return (w / u.unsqueeze(-1)).flatten(-2).to(h.dtype), last


class Block(nn.Module):
    """Pre-norm block: x + Aaren(norm(x)), then x + FFN(norm(x))."""

    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = AarenAttention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))


# (layer index, attention module, normed input [B, K, d_model]) -> per-head outputs [B, K, d_model]
Attend = Callable[[int, AarenAttention, torch.Tensor], torch.Tensor]


def carried_names(j: int) -> tuple[str, ...]:
    """State names of layer j's (m, u, w, du, dw)."""
    return f"m{j}", f"sum.c{j}", f"sum.a{j}", f"carry.c{j}", f"carry.a{j}"


class Aaren(StreamingModel):
    """Aaren encoder with a per-frame classification head; outputs `logits` and `mean_logits`.

    State per layer j: m{j} [H], the Kahan pairs sum.c{j}, carry.c{j} [H] (u) and sum.a{j}, carry.a{j} [H, D]
    (w), in fp32 (fp64 for a fp64 model); the pairs are named like the running means' so that the export check
    compares them by their compensated value. The all-zero state is the empty one (c == 0), so the base
    `init_state` and a runtime that zero-fills the state both start it.
    """

    family = "aaren"

    def __init__(self, input_size: int = 16, d_model: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128,
                 num_classes: int = 10):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self._config = dict(input_size=input_size, d_model=d_model, layers=layers, heads=heads, ffn=ffn,
                            num_classes=num_classes)
        self.input_size = input_size
        self.embed = nn.Linear(input_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.output_sizes = {"logits": (num_classes,)}
        self.running_means = {"mean_logits": "logits"}

    def config(self) -> dict:
        return dict(self._config)

    def network(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Logits [B, K, classes] of frames [B, K, F], with the token mixing of each layer supplied by `attend`."""
        x = self.embed(x)
        for j, blk in enumerate(self.blocks):
            x = x + blk.attn.out(attend(j, blk.attn, blk.norm1(x)))
            x = x + blk.ffn(blk.norm2(x))
        return self.head(self.norm(x))

    def forward_frames(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.network(x, lambda j, attn, h: attn.mix(h, None)[0])}

    def frame_state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        shapes = {}
        for j, blk in enumerate(self.blocks):
            head, vec = ((blk.attn.heads,), "float32"), ((blk.attn.heads, blk.attn.d_head), "float32")
            shapes.update(zip(carried_names(j), (head, head, vec, head, vec)))
        return shapes

    def advance_chunk(self, x: torch.Tensor, state: State) -> tuple[dict[str, torch.Tensor], State]:
        """K frames folded into the state: per layer, a scan over the chunk combined with the carried state."""
        def attend(j: int, attn: AarenAttention, h: torch.Tensor) -> torch.Tensor:
            names = carried_names(j)
            o, carried = attn.mix(h, tuple(state[n] for n in names))
            state.update(zip(names, carried))
            return o

        return {"logits": self.network(x, attend)}, state

    def advance_frame(self, x_t: torch.Tensor, state: State, drained: int, frames: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], State]:
        y, state = self.advance_chunk(x_t.unsqueeze(1), state)
        return {"logits": y["logits"][:, 0]}, state


def cached_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
    """Ordinary softmax attention of a query over t cached tokens and one new token, for one head or all at once:
    query [..., D], keys/values [B, ..., t, D] (a cache prefix, read in place), k/v [B, ..., D] of the new token;
    returns [B, ..., D]. softmax(s) v with s = q.k / sqrt(D) over the t+1 tokens, the max subtracted as usual; the
    cached part's scores and output are GEMVs over the cache, the new token is added to both sums, so nothing the
    size of the cache is copied (and no op slices the symbolic length t: it compiles with t dynamic)."""
    if keys.shape[-2] == 0:  # the first token attends to itself alone
        return v
    acc, scale = accumulator(k.dtype), math.sqrt(query.shape[-1])
    q = query.to(acc).unsqueeze(-1)  # [..., D, 1]
    s = (keys.to(acc) @ q) / scale  # [B, ..., t, 1]
    s_new = (k.to(acc).unsqueeze(-2) @ q) / scale  # [B, ..., 1, 1]
    top = torch.maximum(s.amax(-2, keepdim=True), s_new)
    e, e_new = torch.exp(s - top), torch.exp(s_new - top)
    o = (e.transpose(-1, -2) @ values.to(acc) + e_new * v.to(acc).unsqueeze(-2)) / (e.sum(-2, keepdim=True) + e_new)
    return o.squeeze(-2).to(k.dtype)


class SoftmaxKVCache:
    """The same network and weights with ordinary softmax attention of each fixed query over all keys so far,
    kept in a growing KV cache: the O(T)-memory baseline for Aaren's O(1) state.

    Per layer the cache holds keys and values [B, H, capacity, D] (capacity doubles when full; `reserve`
    preallocates). `step` attends over the cached prefix plus the new token, then appends it; `prefill` fills
    the cache for a whole prefix at once with the parallel form (exact softmax attention, as the scan)."""

    def __init__(self, model: Aaren, batch: int = 1, capacity: int = 256):
        self.model, self.length = model, 0
        dtype = model.embed.weight.dtype
        self.keys = [self.zeros((batch, b.attn.heads, capacity, b.attn.d_head), dtype) for b in model.blocks]
        self.values = [self.zeros(k.shape, dtype) for k in self.keys]

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed cache buffer [B, H, tokens, D] (a subclass may place it elsewhere)."""
        return torch.zeros(shape, dtype=dtype)

    def cache_bytes(self) -> int:
        """Bytes of keys and values held for the tokens seen so far."""
        return sum(2 * k[:, :, :self.length].numel() * k.element_size() for k in self.keys)

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` tokens in all, so no later step reallocates."""
        for j, k in enumerate(self.keys):
            if k.shape[2] < tokens:
                for buf in (self.keys, self.values):
                    grown = self.zeros((*k.shape[:2], tokens, k.shape[3]), k.dtype)
                    grown[:, :, :self.length] = buf[j][:, :, :self.length]
                    buf[j] = grown

    def _append(self, j: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values [B, n, H, D] of n new tokens into layer j's cache after the current length."""
        n = k.shape[1]
        if self.length + n > self.keys[j].shape[2]:
            self.reserve(max(2 * self.keys[j].shape[2], self.length + n))
        self.keys[j][:, :, self.length:self.length + n] = k.transpose(1, 2)
        self.values[j][:, :, self.length:self.length + n] = v.transpose(1, 2)

    def _attend(self, j: int, attn: AarenAttention, h: torch.Tensor) -> torch.Tensor:
        k, v = attn.keys_values(h)  # [B, 1, H, D]
        t = self.length
        o = cached_attention(attn.query, self.keys[j][:, :, :t], self.values[j][:, :, :t], k[:, 0], v[:, 0])
        self._append(j, k, v)
        return o.flatten(1).unsqueeze(1)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of one frame [B, F]; the cache grows by one token per layer."""
        logits = self.model.network(x_t.unsqueeze(1), self._attend)[:, 0]
        self.length += 1
        return logits

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Logits [B, T, classes] of frames [B, T, F] appended to the stream, computed in parallel per chunk
        (each layer's attention by the scan, carried across chunks), the cache filled with their keys and values.
        Exact softmax attention like `step`, without T sequential calls: how a long context is reached."""
        carry: list[Carried | None] = [None] * len(self.keys)
        outs = []

        def attend(j: int, attn: AarenAttention, h: torch.Tensor) -> torch.Tensor:
            if carry[j] is None and self.length:  # the cached prefix, summarised once as a triple
                keys = self.keys[j][:, :, :self.length].transpose(1, 2)  # [B, t, H, D]
                values = self.values[j][:, :, :self.length].transpose(1, 2)
                m, u, w = scan(attn.scores(keys), values.to(accumulator(values.dtype)))
                carry[j] = start((m[:, -1], u[:, -1], w[:, -1]))
            o, carry[j] = attn.mix(h, carry[j])
            self._append(j, *attn.keys_values(h))
            return o

        for t in range(0, x.shape[1], chunk):
            outs.append(self.model.network(x[:, t:t + chunk], attend))
            self.length += outs[-1].shape[1]
        return torch.cat(outs, dim=1)


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Read the configuration off a state dict's shapes."""
    try:
        embed, query = sd["embed.weight"], sd["blocks.0.attn.query"]
        return dict(input_size=embed.shape[1], d_model=embed.shape[0],
                    layers=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), heads=query.shape[0],
                    ffn=sd["blocks.0.ffn.0.weight"].shape[0], num_classes=sd["head.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"not an Aaren state dict: key {e} is missing") from None
