"""A small byte-level language model with HMT's hierarchical memory ("Hierarchical Memory Transformer",
He et al. 2024; reference code OswaldHe/HMT-pytorch), in two forms that must agree.

The stream is cut into segments of L byte tokens. For segment n (j = L/2 summary tokens, N cached memories,
k sensory tokens):
1. summary: the backbone over [T, first j tokens of segment n, T]; S_n = final hidden state of the last position;
2. recall: P_n = softmax((S_n W_q)(M W_k)^T / sqrt(r)) M over the cache M of the last N memory embeddings
   (no value or output projection); an empty cache (the first segment) gives the learned vector P_0;
3. main pass: the backbone over [P_n, last k tokens of segment n-1, segment n, P_n]; the segment positions give
   the logits, the last position's final hidden state is the memory embedding M_n, appended to the cache.

`HMT.reference` is that algorithm as written (a growing-then-truncated Python list as the cache, compact
sequences of whatever length each segment has). `HMT.segment_step` is the deployable form with fixed shapes:
the cache as N slots + a validity mask + a write index (recall attention ignores slot order), the sensory
tokens as a right-aligned buffer of k ids + a count, the segment padded to L with a length; padded slots are
masked out of attention and position ids are recomputed, so every real position sees exactly what the
reference shows it. `HMT.decode_step` continues a segment token by token over the segment step's KV cache
(bounded by 1 + k + L slots), which is what generation uses between segment boundaries.

The backbone is our own compact pre-norm causal Transformer (learned absolute positions, tied byte embedding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import CheckpointError
from edgekit.streaming import SegmentModel, TensorSpec

VOCAB = 256  # bytes; padded slots are masked, so no pad token is needed

# "small" (the default): d 256, 4 layers of 4 heads (d_head 64), FFN 1024: 3.3 M parameters. L = 64 bytes is about
# a dozen words, so one main pass is 1 + 8 + 64 + 1 = 74 positions (cheap attention on a CPU, a 600 KB KV cache);
# N = 16 memories reach 1,024 bytes back beyond the sensory window and cost 16 KB of state; k = 8 bytes carries
# the word that straddles a segment boundary. "tiny" is for tests.
CONFIGS = {
    "small": dict(d_model=256, layers=4, heads=4, ffn=1024, segment=64, memory=16, sensory=8, summary=32),
    "tiny": dict(d_model=32, layers=2, heads=2, ffn=64, segment=8, memory=3, sensory=2, summary=4),
}
CONFIG_KEYS = ("vocab", "d_model", "layers", "heads", "ffn", "segment", "memory", "sensory", "summary", "recall_dim")

NEG = -1e9  # masked attention scores: e^(NEG - max) is exactly 0, and no row is ever fully masked


def flat(layer, x: torch.Tensor) -> torch.Tensor:
    """A position-wise layer applied to x [..., d] as one 2-D matrix product [rows, d]: the form edgekit's CPU
    pipeline turns into its packed-weight kernel (a 3-D matmul with a constant would be left unscheduled)."""
    y = layer(x.reshape(-1, x.shape[-1]))
    return y.view(*x.shape[:-1], y.shape[-1])


class Block(nn.Module):
    """Pre-norm block: x + proj(attn(norm1(x))), then x + ffn(norm2(x))."""

    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.d_head = heads, d_model // heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, T, D] of the block input x [B, T, d]."""
        b, t, _ = x.shape
        qkv = flat(self.qkv, self.norm1(x)).view(b, t, 3, self.heads, self.d_head)
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    def finish(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
               memory: torch.Tensor | None = None) -> torch.Tensor:
        """Masked softmax attention of q over (k, v) (allowed: bool, broadcast to [B, H, Tq, Tk]), then the FFN,
        widened by the hidden units of `memory` [U, 2d + 1] (rows: input weights, bias, output weights) if given."""
        s = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        a = torch.softmax(torch.where(allowed, s, torch.full_like(s, NEG)), dim=-1)
        o = (a @ v).transpose(1, 2).flatten(2)
        x = x + flat(self.proj, o)
        h = self.norm2(x)
        y = flat(self.ffn, h)
        if memory is not None:  # extra hidden units [U, w1 | b1 | w2]: the FFN widened by U units
            d = h.shape[-1]
            y = y + flat(lambda r: F.gelu(r @ memory[:, :d].t() + memory[:, d]) @ memory[:, d + 1:], h)
        return x + y


class ByteBackbone:
    """The backbone a byte LM family builds on (HMT, memlm): byte embedding, learned absolute positions over
    `slots` positions, pre-norm blocks, tied output; the compact and masked passes and the decode step over a KV
    cache. A mixin for an nn.Module: `build_backbone` makes its parameters."""

    def config(self) -> dict:
        """The constructor arguments (a family sets `_config`)."""
        return dict(self._config)

    @property
    def segment_length(self) -> int:
        return self.L

    def build_backbone(self, vocab: int, d_model: int, layers: int, heads: int, ffn: int, slots: int) -> None:
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.slots, self.d = slots, d_model
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(slots, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def backbone(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, keep_kv: bool = False,
                 memory: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Final normed hidden states [B, T, d] of input embeddings x [B, T, d] at position ids pos ([B, T] or [T]);
        allowed [B, 1, T, T] (bool) says which keys each query sees. Also each layer's (k, v) if keep_kv. `memory`
        [layers, U, 2d + 1]: extra FFN hidden units per layer (see `Block.finish`)."""
        x = x + self.pos(pos)
        kv = []
        for j, blk in enumerate(self.blocks):
            q, k, v = blk.qkv_heads(x)
            if keep_kv:
                kv.append((k, v))
            x = blk.finish(x, q, k, v, allowed, None if memory is None else memory[j])
        return self.norm(x), kv

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return flat(lambda x: x @ self.embed.weight.t(), h)

    def causal(self, t: int) -> torch.Tensor:
        return torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)

    def run_compact(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone over a compact sequence of embeddings (every position real): positions 0..T-1."""
        t = x.shape[1]
        return self.backbone(x, torch.arange(t), self.causal(t), memory=memory)[0]

    def _allowed(self, valid: torch.Tensor) -> torch.Tensor:
        """Causal in slot order, and only real keys: [B, 1, S, S] (slot order is the order of the real tokens)."""
        return self.causal(valid.shape[1]) & valid.view(valid.shape[0], 1, 1, -1)

    def decode_step(self, token: torch.Tensor, cache: dict[str, torch.Tensor], memory: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next token [B] of the current segment over its KV cache: logits [B, V] and the cache with the token
        in slot `slot`. The caller runs the segment step once the segment holds L tokens (slot = S)."""
        kv, mask, slot = cache["kv"], cache["kv_mask"], cache["slot"]
        b, s = mask.shape
        dtype = self.embed.weight.dtype
        oh = (torch.arange(s).view(1, -1) == slot.view(b, 1)).to(dtype)  # [B, S]
        pos = mask.sum(dim=1).to(torch.int64)  # real tokens before this one
        mask = torch.maximum(mask, oh)
        allowed = (mask > 0).view(b, 1, 1, s)
        ohk = oh.view(b, 1, s, 1)
        x = (self.embed(token) + self.pos(pos)).unsqueeze(1)
        new_kv = []
        for j, blk in enumerate(self.blocks):
            q, k, v = blk.qkv_heads(x)
            kc = kv[j, 0] * (1 - ohk) + k * ohk
            vc = kv[j, 1] * (1 - ohk) + v * ohk
            new_kv.append(torch.stack([kc, vc]))
            x = blk.finish(x, q, kc, vc, allowed, None if memory is None else memory[j])
        logits = self.logits(self.norm(x))[:, 0]
        return logits, {"kv": torch.stack(new_kv), "kv_mask": mask, "slot": slot + 1}


class HMT(ByteBackbone, SegmentModel):
    family = "hmt"

    def __init__(self, vocab: int = VOCAB, d_model: int = 256, layers: int = 4, heads: int = 4, ffn: int = 1024,
                 segment: int = 64, memory: int = 16, sensory: int = 8, summary: int | None = None,
                 recall_dim: int | None = None):
        super().__init__()
        summary = segment // 2 if summary is None else summary
        recall_dim = d_model if recall_dim is None else recall_dim
        if not (1 <= sensory <= segment and 1 <= summary <= segment and memory >= 1):
            raise ValueError("need 1 <= sensory <= segment, 1 <= summary <= segment and memory >= 1")
        self._config = dict(vocab=vocab, d_model=d_model, layers=layers, heads=heads, ffn=ffn, segment=segment,
                            memory=memory, sensory=sensory, summary=summary, recall_dim=recall_dim)
        self.L, self.N, self.k, self.j = segment, memory, sensory, summary
        self.build_backbone(vocab, d_model, layers, heads, ffn, 1 + sensory + segment + 1)  # [P, sensory, segment, P]
        # HMT's own parameters: summary prompt T, first-segment memory P_0, recall projections W_q, W_k.
        self.prompt = nn.Parameter(torch.zeros(d_model))
        self.first_memory = nn.Parameter(torch.zeros(d_model))
        self.wq = nn.Linear(d_model, recall_dim, bias=False)
        self.wk = nn.Linear(d_model, recall_dim, bias=False)
        # The configuration travels inside the state dict: N, k, j and the head count are not readable off shapes.
        self.register_buffer("hmt_config", torch.tensor([self._config[k] for k in CONFIG_KEYS]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2 layers); T and P_0 like embeddings."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * len(self.blocks)) if name.endswith(("proj.weight", "ffn.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.prompt.normal_(std=0.02)
            self.first_memory.normal_(std=0.02)

    @property
    def summary_length(self) -> int:
        return self.j

    @property
    def warm_segments(self) -> int:
        return self.N

    def recall(self, s: torch.Tensor, mem: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """P = softmax((s W_q)(M W_k)^T / sqrt(r)) M for summaries s [B, d] over memories mem [B, n, d]; slots with
        valid == 0 take no part."""
        q, k = self.wq(s).unsqueeze(1), self.wk(mem)
        scores = (q @ k.transpose(1, 2))[:, 0] / math.sqrt(q.shape[-1])  # [B, n]
        if valid is not None:
            scores = torch.where(valid > 0, scores, torch.full_like(scores, NEG))
        return (torch.softmax(scores, dim=-1).unsqueeze(1) @ mem)[:, 0]

    # ---- the reference: the algorithm as written ----------------------------------------------------------------

    def reference(self, tokens: torch.Tensor, recall: bool = True, sensory: bool = True, carry: tuple | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] of every position and the memory embeddings [B, segments, d] of a byte stream [B, T],
        segment by segment from the start of a stream. recall=False always uses P_0 (no long-term memory),
        sensory=False drops the sensory tokens (the ablations). Differentiable: training runs it."""
        logits, memories, _ = self.reference_carry(tokens, recall, sensory, carry)
        return logits, memories

    def reference_carry(self, tokens: torch.Tensor, recall: bool = True, sensory: bool = True,
                        carry: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """`reference` continuing a stream: carry = (cache: list of [B, d], sensory ids [B, <=k] or None) as
        returned by the previous call (None: a new stream); tokens should be whole segments except at the end."""
        b = tokens.shape[0]
        cache, sens = ([], None) if carry is None else (list(carry[0]), carry[1])
        out, memories = [], []
        for start in range(0, tokens.shape[1], self.L):
            seg = tokens[:, start:start + self.L]
            if recall and cache:
                t = self.prompt.expand(b, 1, -1)
                s = self.run_compact(torch.cat([t, self.embed(seg[:, :self.j]), t], dim=1))[:, -1]
                p = self.recall(s, torch.stack(cache, dim=1))
            else:
                p = self.first_memory.expand(b, -1)
            p = p.unsqueeze(1)
            pre = [p] + ([self.embed(sens)] if sens is not None else [])
            h = self.run_compact(torch.cat([*pre, self.embed(seg), p], dim=1))
            n_pre = 1 + (sens.shape[1] if sens is not None else 0)
            out.append(self.logits(h[:, n_pre:n_pre + seg.shape[1]]))
            memories.append(h[:, -1])
            cache = (cache + [h[:, -1]])[-self.N:]  # grows to N, then drops the oldest
            sens = seg[:, -self.k:] if sensory else None
        return torch.cat(out, dim=1), torch.stack(memories, dim=1), (cache, sens)

    def reference_outputs(self, tokens: torch.Tensor, carry: tuple | None = None) -> tuple[dict, tuple]:
        logits, memories, carry = self.reference_carry(tokens, carry=carry)
        return {"logits": logits, "memory_embedding": memories}, carry

    # ---- the deployable form: fixed shapes ----------------------------------------------------------------------

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """State carried between segments (batch dimension excluded); all zeros is the start of a stream."""
        return {"memory": ((self.N, self.d), "float32"), "memory_valid": ((self.N,), "float32"),
                "write": ((), "int64"), "sensory": ((self.k,), "int64"), "sensory_len": ((), "int64")}

    def kv_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The in-segment KV cache the decode step carries (batch excluded; kv is [layers, 2, B, H, S, D])."""
        blk = self.blocks[0]
        s = self.slots - 1  # the closing P of the segment step never enters the decode cache
        return {"kv": ((len(self.blocks), 2, blk.heads, s, blk.d_head), "float32"), "kv_mask": ((s,), "float32"),
                "slot": ((), "int64")}

    def output_spec(self, batch: int = 1) -> list[TensorSpec]:
        return [TensorSpec("logits", (batch, self.L, self._config["vocab"])),
                TensorSpec("memory_embedding", (batch, self.d))]

    def kv_spec(self, batch: int = 1) -> list[TensorSpec]:
        return [TensorSpec(n, (s[0], s[1], batch, *s[2:]) if n == "kv" else (batch, *s), t)
                for n, (s, t) in self.kv_shapes().items()]

    def segment_step(self, tokens: torch.Tensor, length: torch.Tensor, state: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One segment, fixed shapes: tokens [B, L] int64 of which the first `length` [B] (0..L) are real.

        Returns ({logits [B, L, V], memory_embedding [B, d] (M_n), kv, kv_mask, slot: the decode cache after the
        real tokens}, state after the segment). A length-0 call leaves the state as it was.
        """
        b, L, k, N = tokens.shape[0], self.L, self.k, self.N
        dtype = self.embed.weight.dtype
        n = length.view(b, 1)
        sl = state["sensory_len"].view(b, 1)
        one = torch.ones(b, 1, dtype=torch.bool)

        # Summary over [T, first min(n, j) tokens, T] (padding masked, the closing T placed right after them).
        ar_j = torch.arange(self.j).view(1, -1)
        sum_valid = torch.cat([one, ar_j < n, one], dim=1)
        sum_pos = torch.cat([torch.zeros(b, 1, dtype=torch.int64), 1 + ar_j.expand(b, -1),
                             1 + torch.minimum(n, torch.full_like(n, self.j))], dim=1)
        t = self.prompt.expand(b, 1, -1)
        x = torch.cat([t, self.embed(tokens[:, :self.j]), t], dim=1)
        h, _ = self.backbone(x, torch.where(sum_valid, sum_pos, 0), self._allowed(sum_valid))
        s = h[:, -1]

        # Recall over the valid slots; the guarded empty cache gives P_0.
        mem, mem_valid = state["memory"], state["memory_valid"]
        p = self.recall(s, mem, mem_valid)
        p = torch.where(mem_valid.sum(dim=1, keepdim=True) > 0, p, self.first_memory.to(dtype).expand(b, -1))

        # Main pass over [P | k sensory slots (right-aligned, sl valid) | L segment slots (n valid) | P].
        ar_k, ar_l = torch.arange(k).view(1, -1), torch.arange(L).view(1, -1)
        valid = torch.cat([one, ar_k >= k - sl, ar_l < n, one], dim=1)
        pos = torch.cat([torch.zeros(b, 1, dtype=torch.int64), 1 + ar_k - (k - sl), 1 + sl + ar_l, 1 + sl + n], dim=1)
        pos = torch.where(valid, pos, 0)
        p1 = p.unsqueeze(1)
        x = torch.cat([p1, self.embed(state["sensory"]), self.embed(tokens), p1], dim=1)
        h, kv = self.backbone(x, pos, self._allowed(valid), keep_kv=True)
        logits = self.logits(h[:, 1 + k:1 + k + L])
        m = h[:, -1]

        # Commit: M_n into the write slot (unless the segment was empty), the last k real tokens as sensory memory.
        filled = n > 0
        oh = ((torch.arange(N).view(1, -1) == state["write"].view(b, 1)) & filled).to(dtype)
        nxt = state["write"] + 1
        new_state = {
            "memory": mem * (1 - oh).unsqueeze(-1) + oh.unsqueeze(-1) * m.unsqueeze(1),
            "memory_valid": torch.maximum(mem_valid, oh),
            "write": torch.where(filled.view(b), torch.where(nxt >= N, torch.zeros_like(nxt), nxt), state["write"]),
            "sensory": torch.gather(torch.cat([state["sensory"], tokens], dim=1), 1, n + ar_k),
            "sensory_len": torch.minimum(sl + n, torch.full_like(sl, k)).view(b),
        }
        kv = torch.stack([torch.stack([kk[:, :, :-1], vv[:, :, :-1]]) for kk, vv in kv])
        outs = {"logits": logits, "memory_embedding": m, "kv": kv, "kv_mask": valid[:, :-1].to(dtype),
                "slot": (1 + k + n).view(b)}
        return outs, new_state


class KVCacheLM:
    """The baseline: the same backbone as a plain Transformer LM whose KV cache holds every token so far.
    Only its memory is measured here (2 x layers x d floats per token)."""

    @staticmethod
    def cache_bytes(model: HMT, tokens: int, dtype_bytes: int = 4) -> int:
        return 2 * len(model.blocks) * model.d * tokens * dtype_bytes


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    if "hmt_config" not in sd:
        raise CheckpointError("not an HMT state dict: key 'hmt_config' is missing")
    return dict(zip(CONFIG_KEYS, (int(v) for v in sd["hmt_config"].tolist())))
