"""Train memlm briefly on text that ships with this machine, its documents clustered hierarchically, and show what
the memories hold: held-out bits per byte with the right block, no memory and a wrong block, and a long-tail probe.

    nice -n 19 python examples/memlm/train.py --minutes 30 --out models/checkpoints/memlm_small.pt

Documents: the HMT training script's files (licences, READMEs, package docs under site-packages and /usr/share),
each cut to its first --doc-bytes bytes, split into training and validation the same way (sha256 % 20 == 0).
Retriever: the documents' embeddings (`edgekit.units.memory.embed`, the model's fixed random projection)
clustered by spherical k-means (scipy.cluster.vq.kmeans2 on unit vectors, k-means++ start), `branching` clusters
per node, level by level; the node centroids become the model's. Each document's path is the tree walk the device
runs.

Phase 1 (the first --joint fraction of the time): anchor and memories trained together. Every step picks a leaf
(in proportion to its documents) and reads --batch windows of --segments segments from its documents: one block
per step, the one those documents retrieve. Phase 2: the long-tail facts. --facts synthetic sentences ("The
registry code of <name> is <6 digits>.") are planted into 3 training documents of one leaf each; with the anchor
frozen, the memories train on windows holding a fact (a quarter of the rows) and on the leaf's text (the rest).
So the facts can only live in the memories of the leaves they were planted in, which is what the probe checks.

Probe: per fact, a document of its leaf that did not hold it (its first 512 bytes) followed by the fact's prompt;
retrieval runs on that text; recall = all 6 digits the arg-max with the right block / no memory / a wrong block.
AdamW, warm-up then cosine decay per phase, one thread. Writes the state dict and a JSON record beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2

from edgekit.models.memlm import CONFIGS, MemLM
from edgekit.units.memory import embed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hmt"))
from train import documents as hmt_documents  # noqa: E402  (the HMT script's corpus)

SYLLABLES = ["ka", "lo", "mi", "ren", "ta", "vo", "shi", "dun", "pe", "qua", "ber", "zo", "nix", "el", "or", "us"]


def documents(cap: int) -> tuple[list[bytes], list[bytes]]:
    """The HMT script's documents (training, validation), each cut to its first `cap` bytes."""
    train, val = hmt_documents()
    return [d[:cap] for d in train], [d[:cap] for d in val]


def tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).astype(np.int64)


def cluster(model: MemLM, emb: np.ndarray, seed: int) -> None:
    """Hierarchical spherical k-means, level by level; writes the model's centroids (nodes numbered by level)."""
    b, depth = model.config()["branching"], model.config()["depth"]
    centroids, members, first = [], [np.arange(len(emb))], 0
    for level in range(1, depth + 1):
        next_members = []
        for idx in members:  # parents in order: children of parent p are p * b .. p * b + b - 1
            x = emb[idx] if len(idx) >= b else np.concatenate([emb[idx], emb[:b]])
            c, label = kmeans2(x, b, minit="++", seed=seed + level, iter=30)
            c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
            label = np.argmax(emb[idx] @ c.T, axis=1)  # the walk's assignment, not k-means' last one
            centroids.extend(c)
            next_members.extend(idx[label == j] for j in range(b))
        members, first = next_members, first + b ** level
    with torch.no_grad():
        model.centroids.copy_(torch.from_numpy(np.stack(centroids)))


def fact(rng: np.random.Generator) -> tuple[bytes, bytes]:
    name = "".join(rng.choice(SYLLABLES, 3)).capitalize() + " " + "".join(rng.choice(SYLLABLES, 2)).capitalize()
    return f"The registry code of {name} is ".encode(), "".join(map(str, rng.integers(0, 10, 6))).encode()


@torch.no_grad()
def bits_per_byte(model: MemLM, data: bytes, block: torch.Tensor | None) -> tuple[float, int]:
    x = torch.from_numpy(tokens(data)).view(1, -1)
    logits, _ = model.reference_carry(x[:, :-1], (None, block))
    return float(F.cross_entropy(logits[0], x[0, 1:], reduction="sum")) / math.log(2), x.shape[1] - 1


def wrong_path(model: MemLM, data: bytes) -> list[int]:
    """The path from the top-level cluster least similar to the document (then its most similar children)."""
    c = model.config()
    e = embed(tokens(data), model.projection.double().numpy(), c["buckets"])
    cent, b = model.centroids.double().numpy(), c["branching"]
    parent = int(np.argmin(cent[:b] @ e))
    path, first = [parent], b
    for level in range(2, c["depth"] + 1):
        children = parent * b + np.arange(b)
        parent = int(children[np.argmax(cent[first + children] @ e)])
        path.append(first + parent)
        first += b ** level
    return path


def train_phase(model: MemLM, params: list, seconds: float, steps_log: list, name: str, lr: float, warmup: int,
                batch_fn) -> int:
    """AdamW over `params` for `seconds`, warm-up then cosine decay; batches (windows, path) from batch_fn."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        frac = (time.time() - t0) / seconds
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        x, path = batch_fn()
        logits, _ = model.reference_carry(x[:, :-1], (None, model.fetch(path)))
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            bpb = float(loss.detach()) / math.log(2)
            steps_log.append({"phase": name, "step": step, "seconds": round(time.time() - t0),
                              "train_bpb": round(bpb, 4)})
            print(f"{name} step {step:5d} {time.time() - t0:6.0f} s  train {bpb:.3f} bits/byte", flush=True)
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=[c for c in CONFIGS if c != "bigbank"])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--joint", type=float, default=0.7, help="fraction of the time for phase 1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--doc-bytes", type=int, default=4096)
    ap.add_argument("--max-docs", type=int, default=4000)
    ap.add_argument("--facts", type=int, default=48)
    ap.add_argument("--val-docs", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("models/checkpoints/memlm_small.pt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    t0 = time.time()
    train, val = documents(args.doc_bytes)
    train = [train[i] for i in sorted(rng.choice(len(train), min(args.max_docs, len(train)), replace=False))]
    model = MemLM(**CONFIGS[args.config], seed=args.seed)
    proj, buckets = model.projection.double().numpy(), model.config()["buckets"]
    emb = np.stack([embed(tokens(d), proj, buckets) for d in train])
    cluster(model, emb, args.seed)
    paths = [tuple(model.path(tokens(d))) for d in train]
    leaves = sorted(set(paths))
    by_leaf = {p: [i for i, q in enumerate(paths) if q == p] for p in leaves}
    print(f"{len(train)} training documents, {len(val)} validation; {len(leaves)} leaves used; "
          f"{time.time() - t0:.0f} s", flush=True)
    L, span = model.L, args.segments * model.L

    def window(doc: bytes, at: int | None = None) -> torch.Tensor:
        x = tokens(doc)
        if len(x) <= span + 1:
            x = np.concatenate([x, np.full(span + 1 - len(x) + 1, 10)])
        s = int(rng.integers(0, len(x) - span)) if at is None else min(max(0, at), len(x) - span - 1)
        return torch.from_numpy(x[s:s + span + 1])

    weights = np.array([len(by_leaf[p]) for p in leaves], float)

    def corpus_batch():
        leaf = leaves[rng.choice(len(leaves), p=weights / weights.sum())]
        docs = rng.choice(by_leaf[leaf], args.batch)
        return torch.stack([window(train[i]) for i in docs]), list(leaf)

    log = []
    model.train()
    total = args.minutes * 60
    steps1 = train_phase(model, list(model.parameters()), args.joint * total, log, "joint", args.lr, 50,
                         corpus_batch)

    # Phase 2: plant the facts (3 documents of one leaf each, leaves with >= 4 documents), anchor frozen.
    facts, eligible = [], [p for p in leaves if len(by_leaf[p]) >= 4]
    for f in range(args.facts):
        prompt, value = fact(rng)
        leaf = eligible[f % len(eligible)]
        docs = [int(i) for i in rng.choice(by_leaf[leaf], 4, replace=False)]
        holders, probe_doc = docs[:3], docs[3]
        where = []
        for i in holders:
            d = train[i]
            cut = int(rng.integers(0, max(1, len(d) - 1)))
            cut = d.rfind(b"\n", 0, cut) + 1
            train[i] = d[:cut] + prompt + value + b".\n" + d[cut:]
            where.append((i, cut))
        facts.append({"prompt": prompt.decode(), "value": value.decode(), "leaf": list(leaf), "documents": holders,
                      "probe_document": probe_doc, "where": where})

    def fact_batch():
        f = facts[int(rng.integers(len(facts)))]
        leaf = f["leaf"]
        rows = []
        for _ in range(args.batch):
            if rng.random() < 0.25:
                i, cut = f["where"][int(rng.integers(3))]
                rows.append(window(train[i], cut - int(rng.integers(L, span - 48))))
            else:
                rows.append(window(train[int(rng.choice(by_leaf[tuple(leaf)]))]))
        return torch.stack(rows), leaf

    for name, p in model.named_parameters():
        p.requires_grad_(name == "bank")
    steps2 = train_phase(model, [model.bank], (1 - args.joint) * total, log, "facts", args.lr, 20, fact_batch)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()

    # Held-out bits per byte: right block, no memory, a wrong block.
    rows = {"right": [0.0, 0], "none": [0.0, 0], "wrong": [0.0, 0]}
    for d in val[:args.val_docs]:
        x = tokens(d)
        for name, block in (("right", model.fetch(model.path(x))), ("none", None),
                            ("wrong", model.fetch(wrong_path(model, d)))):
            bits, n = bits_per_byte(model, d, None if block is None else block.detach())
            rows[name][0] += bits
            rows[name][1] += n
    heldout = {k: round(v[0] / v[1], 4) for k, v in rows.items()}
    print("held-out bits/byte:", heldout, flush=True)

    # Long-tail probe.
    recall = {"right": 0, "none": 0, "wrong": 0}
    retrieved_leaf = 0
    for f in facts:
        text = train[f["probe_document"]][:512] + b"\n" + f["prompt"].encode()
        x = torch.from_numpy(tokens(text + f["value"].encode())).view(1, -1)
        path = model.path(tokens(text))
        retrieved_leaf += path == f["leaf"]
        for name, block in (("right", model.fetch(path)), ("none", None),
                            ("wrong", model.fetch(wrong_path(model, text)))):
            with torch.no_grad():
                logits, _ = model.reference_carry(x[:, :-1], (None, None if block is None else block.detach()))
            n = len(f["value"])
            guess = logits[0, -n:].argmax(-1)
            recall[name] += bool(torch.equal(guess, x[0, -n:]))
    probe = {k: round(v / len(facts), 4) for k, v in recall.items()}
    print("long-tail probe recall:", probe, f"(probe text retrieved the fact's leaf for {retrieved_leaf}/{len(facts)})")

    anchor = sum(p.numel() for n, p in model.named_parameters() if n != "bank")
    block = model.config()["depth"] * math.prod(model.node_shape)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    record = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "config": model.config(), "parameters": {"anchor": anchor, "block": block, "bank": model.bank.numel()},
              "documents": {"train": len(train), "validation_used": min(args.val_docs, len(val)),
                            "leaves_used": len(leaves), "doc_bytes": args.doc_bytes},
              "steps": {"joint": steps1, "facts": steps2}, "args": {k: str(v) for k, v in vars(args).items()},
              "heldout_bits_per_byte": heldout, "probe_recall": probe,
              "probe_retrieved_fact_leaf": retrieved_leaf / len(facts), "facts": facts, "log": log}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
