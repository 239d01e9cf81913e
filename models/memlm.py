"""A small byte LM over a hierarchical parametric memory bank (Pouransari, Grangier, Thomas, Kirchhof, Tuzel,
"Pretraining with hierarchical memories: separating long-tail and common knowledge", arXiv 2510.02375).

A small anchor Transformer (HMT's backbone, `hmt.ByteBackbone`) keeps common knowledge; long-tail knowledge lives
in feed-forward memories owned by the nodes of a hierarchical clustering of the training documents: a tree of
`depth` levels, `branching` children per node, every node (root excluded) owning `node_units` extra FFN hidden
units in every layer. For a document the retriever walks the tree (at each level the child whose centroid is most
similar to the document's embedding); the block fetched is the path's nodes, one per level, and the FFN of every
layer is widened by their units (the concatenation along the path).

The retriever's embedding (`edgekit.units.memory.embed`): counts of the document's byte 2-, 3- and 4-grams hashed
into `buckets` bins, log-scaled and L2-normalised, then a fixed random projection to `embed_dim` (cosines kept,
Johnson-Lindenstrauss) normalised again. It needs no vocabulary, no network and no torch: a few numpy lines on
the device, integer-exact up to the projection; and lexical overlap is what separates documents by topic and by
the rare names they mention, which is what the memories are for.

Streaming (the `memory` unit): segments of L bytes, each seeing the last `context` bytes before it (a right-aligned
buffer of ids and a count), and a decode step over the segment's KV cache of context + L slots; the block is a
per-document input of both steps, [depth, layers, node_units, 2d + 1] with a node's memory contiguous (per unit:
input weights, bias, output weights): the layout of a node in the bank file.

Configs: `tiny` (tests), `small` (the size to train), `bigbank` (seeded random weights; its 1.15 GiB bank is
generated node by node from its seed, never held in memory: for the memory check).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from edgekit.errors import CheckpointError
from edgekit.models.hmt import VOCAB, ByteBackbone
from edgekit.streaming import SegmentModel, TensorSpec
from edgekit.units.memory import embed, walk

# small: a 0.84 M-parameter anchor, 20 nodes of 33 K parameters (a fetched block of 2 nodes is 8 % of the anchor).
# bigbank: a 3.3 M anchor (HMT small's backbone), 12 + 144 + 1,728 = 1,884 nodes of 657 KB: a 1.24 GB bank, 2 MB
# (3 nodes, 240 extra units per layer) fetched per document.
CONFIGS = {
    "small": dict(d_model=128, layers=4, heads=4, ffn=512, segment=64, context=64, branching=4, depth=2,
                  node_units=32, buckets=4093, embed_dim=64),
    "tiny": dict(d_model=32, layers=2, heads=2, ffn=64, segment=8, context=4, branching=2, depth=2, node_units=4,
                 buckets=257, embed_dim=16),
    "bigbank": dict(d_model=256, layers=4, heads=4, ffn=1024, segment=64, context=64, branching=12, depth=3,
                    node_units=80, buckets=4093, embed_dim=64, seeded_bank=1),
}
CONFIG_KEYS = ("vocab", "d_model", "layers", "heads", "ffn", "segment", "context", "branching", "depth", "node_units",
               "buckets", "embed_dim", "seeded_bank", "seed")


class MemLM(ByteBackbone, SegmentModel):
    family = "memlm"
    unit = "memory"

    def __init__(self, vocab: int = VOCAB, d_model: int = 128, layers: int = 4, heads: int = 4, ffn: int = 512,
                 segment: int = 64, context: int = 64, branching: int = 4, depth: int = 2, node_units: int = 32,
                 buckets: int = 4093, embed_dim: int = 64, seeded_bank: int = 0, seed: int = 0):
        super().__init__()
        if not (1 <= context and 1 <= segment and branching >= 2 and depth >= 1 and node_units >= 1):
            raise ValueError("need context, segment, node_units >= 1, branching >= 2 and depth >= 1")
        self._config = dict(vocab=vocab, d_model=d_model, layers=layers, heads=heads, ffn=ffn, segment=segment,
                            context=context, branching=branching, depth=depth, node_units=node_units,
                            buckets=buckets, embed_dim=embed_dim, seeded_bank=int(seeded_bank), seed=seed)
        self.L, self.k = segment, context
        self.build_backbone(vocab, d_model, layers, heads, ffn, context + segment)
        self.nodes = sum(branching ** level for level in range(1, depth + 1))
        self.node_shape = (layers, node_units, 2 * d_model + 1)
        # The retriever: a fixed projection of hashed n-gram counts, and one centroid per node (unit vectors).
        self.register_buffer("projection", torch.zeros(buckets, embed_dim))
        self.register_buffer("centroids", torch.zeros(self.nodes, embed_dim))
        # A trained bank is a parameter (it is in the checkpoint); a seeded one is generated node by node.
        self.bank = None if seeded_bank else nn.Parameter(torch.zeros(self.nodes, *self.node_shape))
        self.register_buffer("memlm_config", torch.tensor([self._config[k] for k in CONFIG_KEYS]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual projections by 1/sqrt(2 layers); the retriever random unit vectors."""
        g = torch.Generator().manual_seed(self._config["seed"])
        for name, p in self.named_parameters():
            if name == "bank":
                with torch.no_grad():
                    p.copy_(torch.from_numpy(np.stack([self.seeded_node(i) for i in range(self.nodes)])))
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * len(self.blocks)) if name.endswith(("proj.weight", "ffn.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        self.projection.copy_(torch.randn(self.projection.shape, generator=g) / math.sqrt(self.projection.shape[1]))
        c = torch.randn(self.centroids.shape, generator=g)
        self.centroids.copy_(c / c.norm(dim=1, keepdim=True))

    def seeded_node(self, node: int) -> np.ndarray:
        """Node `node`'s memory drawn from default_rng([seed, node]) at initialisation scale: w1 0.02, bias 0,
        w2 0.02 / sqrt(2 layers)."""
        d = self.d
        block = np.random.default_rng([self._config["seed"], node]).standard_normal(self.node_shape, np.float32)
        block[..., :d] *= 0.02
        block[..., d] = 0.0
        block[..., d + 1:] *= 0.02 / math.sqrt(2 * len(self.blocks))
        return block

    @property
    def summary_length(self) -> int:
        return 1  # causal within a segment: from its first token on, decode steps continue the segment step

    @property
    def warm_segments(self) -> int:
        return -(-self.k // self.L)

    # ---- the retriever and the bank -----------------------------------------------------------------------------

    def memory_layout(self) -> dict:
        c = self._config
        return {"nodes": self.nodes, "branching": c["branching"], "depth": c["depth"],
                "node_shape": list(self.node_shape),
                "buckets": c["buckets"], "embed_dim": c["embed_dim"]}

    def node_block(self, node: int) -> np.ndarray:
        """Node `node`'s memory [layers, node_units, 2d + 1], float32."""
        if self.bank is None:
            return self.seeded_node(node)
        return self.bank[node].detach().float().numpy()

    def retriever_arrays(self) -> dict[str, np.ndarray]:
        return {"projection": self.projection.double().numpy(), "centroids": self.centroids.double().numpy()}

    def path(self, tokens: np.ndarray) -> list[int]:
        """The nodes (one per level, root excluded) the document's bytes retrieve, in float64."""
        c, r = self._config, self.retriever_arrays()
        e = embed(np.asarray(tokens), r["projection"], c["buckets"])
        return walk(e, r["centroids"], c["branching"], c["depth"])

    def fetch(self, path: list[int]) -> torch.Tensor:
        """The block of a path: [depth, layers, node_units, 2d + 1] (differentiable for a trained bank)."""
        if self.bank is None:
            return torch.from_numpy(np.stack([self.seeded_node(i) for i in path])).to(self.embed.weight.dtype)
        return self.bank[torch.tensor(path)]

    def memory(self, block: torch.Tensor | None) -> torch.Tensor | None:
        """A block as each layer's extra hidden units: [layers, depth * node_units, 2d + 1]."""
        if block is None:
            return None
        depth, layers, units, width = block.shape
        return block.permute(1, 0, 2, 3).reshape(layers, depth * units, width)

    def fetched_examples(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """A real block (a random document's path): every row of a batch reads the same document's block."""
        doc = np.random.default_rng(0).integers(0, 256, 256)
        return {"memory_block": self.fetch(self.path(doc)).detach().float()}

    def block_spec(self) -> TensorSpec:
        return TensorSpec("memory_block", (self._config["depth"], *self.node_shape))

    # ---- the reference: the algorithm as written -----------------------------------------------------------------

    def reference_carry(self, tokens: torch.Tensor, carry: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """Logits [B, T, V] of a byte stream [B, T] segment by segment, each segment after the last `context`
        bytes before it; carry = (those bytes [B, <=k] or None, the document's block or None: the anchor alone).
        Differentiable: training runs it."""
        ctx, block = carry if carry is not None else (None, None)
        memory, out = self.memory(block), []
        for start in range(0, tokens.shape[1], self.L):
            seg = tokens[:, start:start + self.L]
            pre = [] if ctx is None else [self.embed(ctx)]
            h = self.run_compact(torch.cat([*pre, self.embed(seg)], dim=1), memory)
            out.append(self.logits(h[:, h.shape[1] - seg.shape[1]:]))
            ctx = (seg if ctx is None else torch.cat([ctx, seg], dim=1))[:, -self.k:]
        return torch.cat(out, dim=1), (ctx, block)

    def reference_outputs(self, tokens: torch.Tensor, carry: tuple | None = None) -> tuple[dict, tuple]:
        logits, carry = self.reference_carry(tokens, carry)
        return {"logits": logits}, carry

    # ---- the deployable form: fixed shapes ----------------------------------------------------------------------

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"context": ((self.k,), "int64"), "context_len": ((), "int64")}

    def kv_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        blk = self.blocks[0]
        return {"kv": ((len(self.blocks), 2, blk.heads, self.slots, blk.d_head), "float32"),
                "kv_mask": ((self.slots,), "float32"), "slot": ((), "int64")}

    def output_spec(self, batch: int = 1) -> list[TensorSpec]:
        return [TensorSpec("logits", (batch, self.L, self._config["vocab"]))]

    def kv_spec(self, batch: int = 1) -> list[TensorSpec]:
        return [TensorSpec(n, (s[0], s[1], batch, *s[2:]) if n == "kv" else (batch, *s), t)
                for n, (s, t) in self.kv_shapes().items()]

    def segment_step(self, tokens: torch.Tensor, length: torch.Tensor, state: dict[str, torch.Tensor],
                     block: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One segment, fixed shapes: tokens [B, L] of which the first `length` [B] are real, over [k context
        slots (right-aligned, context_len real) | L segment slots]. Returns ({logits, kv, kv_mask, slot}, state)."""
        b, L, k = tokens.shape[0], self.L, self.k
        n, cl = length.view(b, 1), state["context_len"].view(b, 1)
        ar_k, ar_l = torch.arange(k).view(1, -1), torch.arange(L).view(1, -1)
        valid = torch.cat([ar_k >= k - cl, ar_l < n], dim=1)
        pos = torch.where(valid, torch.cat([ar_k - (k - cl), cl + ar_l], dim=1), 0)
        x = torch.cat([self.embed(state["context"]), self.embed(tokens)], dim=1)
        h, kv = self.backbone(x, pos, self._allowed(valid), keep_kv=True, memory=self.memory(block))
        new_state = {"context": torch.gather(torch.cat([state["context"], tokens], dim=1), 1, n + ar_k),
                     "context_len": torch.minimum(cl + n, torch.full_like(cl, k)).view(b)}
        outs = {"logits": self.logits(h[:, k:]), "kv": torch.stack([torch.stack(p) for p in kv]),
                "kv_mask": valid.to(self.embed.weight.dtype), "slot": (k + n).view(b)}
        return outs, new_state

    def decode_step(self, token: torch.Tensor, cache: dict[str, torch.Tensor], block: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return super().decode_step(token, cache, self.memory(block))


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    if "memlm_config" not in sd:
        raise CheckpointError("not a memlm state dict: key 'memlm_config' is missing")
    return dict(zip(CONFIG_KEYS, (int(v) for v in sd["memlm_config"].tolist())))
