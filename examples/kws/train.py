"""Train the small LMUFormer keyword spotter shipped as edgekit's demo model, on one CPU thread.

Input: 1 s clips -> 98 frames of the published front end (edgekit.audio, 128 mel bins), no padding; the clip
prediction is the mean of the per-frame logits over the 98 frames (`mean_logits` at the last frame), so a
streaming session fed one 1 s window from a zero state and flushed computes exactly the training forward.

    python examples/kws/train.py --data data/kws-synth --out models/checkpoints/kws_demo.pt
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgekit.models.lmuformer import LMUFormer  # noqa: E402
from speech_commands import LABELS, UNKNOWN, load_split  # noqa: E402


def spec_augment(x: torch.Tensor, gen: torch.Generator, freq: int = 16, time_: int = 12) -> torch.Tensor:
    """One frequency and one time mask per clip, filled with the silence level (normalised log(eps))."""
    b, t, f = x.shape
    fill = float(x.min())
    f0 = torch.randint(0, f - freq, (b, 1), generator=gen)
    fw = torch.randint(0, freq + 1, (b, 1), generator=gen)
    t0 = torch.randint(0, t - time_, (b, 1), generator=gen)
    tw = torch.randint(0, time_ + 1, (b, 1), generator=gen)
    fm = (torch.arange(f) >= f0) & (torch.arange(f) < f0 + fw)
    tm = (torch.arange(t) >= t0) & (torch.arange(t) < t0 + tw)
    return x.masked_fill(fm[:, None, :] | tm[:, :, None], fill)


@torch.no_grad()
def accuracy(model: LMUFormer, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    pred = torch.cat([model.forward_frames(x[i:i + batch])["logits"].mean(1).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def epoch_indices(y: np.ndarray, unknown_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Every clip of every class except `_unknown_`, of which a fresh random subset `unknown_ratio` times the
    size of an average class: unknown words are most of the data and must not swamp the keywords."""
    unk = LABELS.index(UNKNOWN)
    rest, unknown = np.flatnonzero(y != unk), np.flatnonzero(y == unk)
    count = min(len(unknown), int(unknown_ratio * len(rest) / (len(LABELS) - 1)))
    return rng.permutation(np.concatenate([rest, rng.choice(unknown, size=count, replace=False)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a Speech Commands v2 layout (real or synthetic)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (+ .json beside it)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--unknown-ratio", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng, gen = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    data = {s: load_split(a.data, s, seed=a.seed) for s in ("training", "validation", "testing")}
    x = {s: torch.from_numpy(d.features()) for s, d in data.items()}
    y = {s: torch.from_numpy(d.labels) for s, d in data.items()}
    frames = x["training"].shape[1]
    print(f"features in {time.perf_counter() - t0:.0f} s: " + ", ".join(f"{s} {len(v)}" for s, v in y.items()), flush=True)

    model = LMUFormer(input_size=x["training"].shape[2], dim=a.dim, depth=1, mlp_ratio=a.mlp_ratio,
                      num_classes=len(LABELS), theta=float(frames), seq_len=frames)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    steps = a.epochs * -(-len(epoch_indices(data["training"].labels, a.unknown_ratio, np.random.default_rng())) // a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.1)
    best, best_state, history = -1.0, None, []
    t1 = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        idx = torch.from_numpy(epoch_indices(data["training"].labels, a.unknown_ratio, rng))
        total = 0.0
        for i in range(0, len(idx), a.batch):
            b = idx[i:i + a.batch]
            logits = model.forward_frames(spec_augment(x["training"][b], gen))["logits"].mean(1)
            loss = F.cross_entropy(logits, y["training"][b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        val = accuracy(model, x["validation"], y["validation"])
        history.append({"epoch": epoch + 1, "loss": round(total / len(idx), 4), "val_acc": round(val, 4)})
        print(f"epoch {epoch + 1}: loss {total / len(idx):.4f} val {val:.4f} ({time.perf_counter() - t1:.0f} s)",
              flush=True)
        if val >= best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    test = accuracy(model, x["testing"], y["testing"])
    print(f"best val {best:.4f}, test (unseen voices) {test:.4f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), a.out)
    record = {"command": "python " + shlex.join(sys.argv), "seed": a.seed, "labels": LABELS,
              "clip_frames": frames, "pad_to": None, "config": model.config(),
              "parameters": sum(p.numel() for p in model.parameters()),
              "data": {"root": str(a.data), **{s: len(v) for s, v in y.items()}},
              "accuracy": {"validation": round(best, 4), "testing_pytorch": round(test, 4)},
              "train_seconds": round(time.perf_counter() - t1, 1), "threads": a.threads, "history": history}
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
