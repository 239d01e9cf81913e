"""Train the HMT byte LM briefly on text that ships with this machine (licences, READMEs, package docs).

    python examples/hmt/train.py --minutes 15 --out models/checkpoints/hmt_small.pt

Corpus: LICENSE/README/COPYING/*.md/*.rst/*.txt/METADATA files under site-packages, /usr/share/common-licenses
and /usr/share/doc (gzipped ones decompressed), mostly-printable, deduplicated by content, each capped at 64 KB,
ordered by sha256(content) (a fixed shuffle); a file goes to the validation split when that hash % 20 == 0 (5 %).

Training: every batch row reads its own contiguous stretch of the training stream, `--segments` segments per
step, and the HMT state (the cache of memory embeddings and the sensory tokens) carries over between steps,
detached (truncated back-propagation through `--segments` segments): the recall learns over full caches.
AdamW, warm-up then cosine decay over the time budget, one thread. Writes the state dict (float32) and a JSON
record beside it: command, corpus, steps, and validation bits per byte with and without memory recall.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import site
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgekit.models.hmt import CONFIGS, HMT

ROOTS = [*site.getsitepackages(), "/usr/share/common-licenses", "/usr/share/doc"]
PATTERNS = ("LICENSE*", "LICENCE*", "README*", "COPYING*", "NOTICE*", "AUTHORS*", "CHANGELOG*", "*.md", "*.rst",
            "*.txt", "METADATA", "copyright", "changelog*")
CAP = 64 * 1024


def read_text(path: Path) -> bytes | None:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    data = data[:CAP]
    if len(data) < 200:
        return None
    printable = sum(32 <= c < 127 or c in (9, 10, 13) for c in data)
    return data if printable >= 0.97 * len(data) else None


def documents(roots: list[str] = ROOTS) -> tuple[list[bytes], list[bytes]]:
    """Every distinct text under `roots` (training, validation): one in 20 goes to validation by its content hash,
    and each side is ordered by that hash (a fixed shuffle: every stretch of the stream mixes packages and kinds
    of text)."""
    seen, train, val = set(), [], []
    files = sorted({p for r in roots if Path(r).is_dir() for pat in (*PATTERNS, "*.gz") for p in Path(r).rglob(pat)
                    if p.is_file()})
    for p in files:
        data = read_text(p)
        if data is None:
            continue
        h = hashlib.sha256(data).digest()
        if h in seen:
            continue
        seen.add(h)
        (val if int.from_bytes(h[:4], "little") % 20 == 0 else train).append((h, data))
    return [d for _, d in sorted(train)], [d for _, d in sorted(val)]


def corpus(roots: list[str] = ROOTS) -> tuple[bytes, bytes, dict]:
    train, val = documents(roots)
    sep = b"\n\n"
    info = {"roots": roots, "files_train": len(train), "files_val": len(val)}
    return sep.join(train), sep.join(val), info


@torch.no_grad()
def evaluate(model: HMT, data: bytes, max_bytes: int, recall: bool = True, sensory: bool = True,
             chunk_segments: int = 64) -> float:
    """Bits per byte of the first max_bytes of `data`, streamed as one sequence from an empty memory."""
    x = torch.from_numpy(np.frombuffer(data[:max_bytes + 1], dtype=np.uint8).astype(np.int64)).view(1, -1)
    carry, total, count = None, 0.0, 0
    span = chunk_segments * model.L
    for s in range(0, x.shape[1] - 1, span):
        inp = x[:, s:s + span]
        tgt = x[:, s + 1:s + span + 1]
        inp = inp[:, :tgt.shape[1]]
        logits, _, carry = model.reference_carry(inp, recall, sensory, carry)
        total += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum"))
        count += tgt.numel()
    return total / count / math.log(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=list(CONFIGS))
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--segments", type=int, default=4, help="segments per step (truncated BPTT length)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--val-bytes", type=int, default=32 * 1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("models/checkpoints/hmt_small.pt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.time()
    train, val, info = corpus()
    print(f"corpus: {len(train):,} train bytes ({info['files_train']} files), {len(val):,} validation bytes "
          f"({info['files_val']} files), read in {time.time() - t0:.0f} s", flush=True)
    model = HMT(**CONFIGS[args.config])
    params = sum(p.numel() for p in model.parameters())
    own = ("prompt", "first_memory", "wq", "wk")
    hmt_params = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in own)
    print(f"{args.config}: {params:,} parameters ({hmt_params:,} of them HMT's: T, P_0, W_q, W_k)", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    data = torch.from_numpy(np.frombuffer(train, dtype=np.uint8).astype(np.int64))
    span = args.segments * model.L
    starts = [i * (len(data) // args.batch) for i in range(args.batch)]
    offset, carry, step, budget = 0, None, 0, args.minutes * 60
    t_start, log = time.time(), []
    model.train()
    while time.time() - t_start < budget:
        if starts[0] + offset + span + 1 > len(data) // args.batch:
            offset, carry = 0, None  # wrapped around: new streams
        x = torch.stack([data[s + offset:s + offset + span + 1] for s in starts])
        frac = (time.time() - t_start) / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        logits, _, carry = model.reference_carry(x[:, :-1], carry=carry)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        carry = ([c.detach() for c in carry[0]], carry[1])
        offset += span
        step += 1
        if step % 20 == 0:
            elapsed = time.time() - t_start
            bpb = float(loss.detach()) / math.log(2)
            log.append({"step": step, "seconds": round(elapsed), "train_bpb": round(bpb, 4), "lr": lr})
            print(f"step {step:5d}  {elapsed:6.0f} s  train {bpb:.3f} bits/byte  lr {lr:.2e}  "
                  f"{step * args.batch * span / elapsed:,.0f} bytes/s", flush=True)
    train_seconds = time.time() - t_start
    model.eval()
    results = {}
    ablations = {"hmt": {}, "no_recall": {"recall": False}, "no_memory": {"recall": False, "sensory": False}}
    for name, kw in ablations.items():
        bpb = evaluate(model, val, args.val_bytes, **kw)
        results[name] = {"bits_per_byte": round(bpb, 4), "perplexity_per_byte": round(2 ** bpb, 4)}
        print(f"validation ({args.val_bytes:,} bytes) {name}: {bpb:.4f} bits/byte, perplexity {2 ** bpb:.3f}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    record = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "config": model.config(), "parameters": params, "hmt_parameters": hmt_params, "corpus": info,
              "train_bytes": len(train), "val_bytes_used": args.val_bytes, "steps": step,
              "bytes_seen": step * args.batch * span, "train_seconds": round(train_seconds),
              "args": {k: str(v) for k, v in vars(args).items()}, "validation": results, "log": log}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
