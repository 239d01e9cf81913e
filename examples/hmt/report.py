"""The HMT figures: reference vs fixed-shape step vs host artifact, state bytes, RSS over a long stream, speed.

    python examples/hmt/report.py --checkpoint models/checkpoints/hmt_small.pt --out /tmp/hmt_report

1. Accuracy over --segments segments of real text (default 256 = 16 N, so the cache wraps 16 times): the eager
   reference (float64, the algorithm as written) against the fixed-shape segment step (float32 eager) and the
   library compiled for this host (float32): max abs error of the logits and of the memory embeddings.
2. State carried between segments vs a plain Transformer's full KV cache at 10k and 100k tokens.
3. RSS of this process sampled every 10,000 tokens while the host artifact scores a --stream-token stream.
4. Bytes per second: scoring (segment step per L bytes) and generation (Generator), host artifact and PyTorch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgekit.compile import compile
from edgekit.hmt_runtime import Generator, load_engine, rss_bytes
from edgekit.models import hmt


def text_stream(n: int) -> np.ndarray:
    """n bytes of held-out text (the training script's validation split), repeated if short."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train import corpus

    _, val, _ = corpus()
    data = np.frombuffer(val, dtype=np.uint8).astype(np.int64)
    return np.resize(data, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/hmt_report"))
    ap.add_argument("--segments", type=int, default=256)
    ap.add_argument("--stream-tokens", type=int, default=100_000)
    ap.add_argument("--gen-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = hmt.build(args.config, args.checkpoint)
    L = model.L
    report: dict = {"command": "python " + " ".join(sys.argv), "config": model.config(),
                    "parameters": sum(p.numel() for p in model.parameters())}

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle = compile("hmt", "host", args.out / "bundle", config=None if args.checkpoint else args.config,
                     checkpoint=args.checkpoint, force=True, progress=lambda m: print(m, flush=True))
    meta = bundle.manifest
    report["build"] = {"seconds": round(time.perf_counter() - t0, 1), "compile_seconds": meta["compile_seconds"],
                       "bundle": str(bundle.path), "library_mib": round(bundle.library.stat().st_size / 2**20, 2),
                       "target": meta["target"]}
    eng = load_engine(bundle.path)

    # 1. accuracy over many segments
    data = text_stream(max(args.stream_tokens, args.segments * L + 1))
    x = torch.from_numpy(data[:args.segments * L]).view(1, -1)
    with torch.no_grad():
        ref_logits, ref_mem = model.double().reference(x)
        model.float()
        step_logits, step_mem = model.score(x)
    state, tvm_logits, tvm_mem = eng.init_state(), [], []
    for s in range(0, x.shape[1], L):
        o, state = eng.segment_full(x[0, s:s + L].numpy(), L, state)
        tvm_logits.append(o["logits"][0])
        tvm_mem.append(o["memory_embedding"][0])
    tvm_logits, tvm_mem = np.concatenate(tvm_logits), np.stack(tvm_mem)
    r, rm = ref_logits[0].numpy(), ref_mem[0].numpy()
    s_, sm = step_logits[0].double().numpy(), step_mem[0].double().numpy()
    per_seg = np.abs(tvm_logits - r).reshape(args.segments, L, -1).max(axis=(1, 2))
    report["accuracy"] = {
        "segments": args.segments, "tokens": int(x.shape[1]), "cache_slots": model.N,
        "logit_range": [float(r.min()), float(r.max())],
        "max_abs_logit_error": {"step_vs_reference": float(np.abs(s_ - r).max()),
                                "host_vs_reference": float(np.abs(tvm_logits - r).max()),
                                "host_vs_step": float(np.abs(tvm_logits - s_).max())},
        "max_abs_memory_error": {"step_vs_reference": float(np.abs(sm - rm).max()),
                                 "host_vs_reference": float(np.abs(tvm_mem - rm).max())},
        "host_logit_error_by_quarter": [float(q.max()) for q in np.array_split(per_seg, 4)],
        "argmax_agreement_host_vs_reference": float((tvm_logits.argmax(-1) == r.argmax(-1)).mean()),
    }
    print(json.dumps(report["accuracy"], indent=1), flush=True)

    # 2. state bytes
    report["state"] = {"hmt_bytes_between_segments": model.state_bytes(),
                       "decode_cache_bytes": meta["decode_cache_bytes"],
                       "kv_cache_bytes": {f"{n}": hmt.KVCacheLM.cache_bytes(model, n) for n in (10_000, 100_000)}}

    # 3. RSS over a long stream through the artifact; 4a. scoring speed
    stream = data[:args.stream_tokens // L * L]
    state, rss, t0 = eng.init_state(), [], time.perf_counter()
    for s in range(0, len(stream), L):
        _, _, state = eng.segment(stream[s:s + L], L, state)
        if (s + L) % 10_000 < L:
            rss.append((s + L, rss_bytes()))
    dt = time.perf_counter() - t0
    report["rss"] = {"tokens": len(stream), "samples_bytes": rss,
                     "growth_after_first_10k_mib": round((rss[-1][1] - rss[0][1]) / 2**20, 3)}
    report["speed"] = {"host_scoring_bytes_per_s": round(len(stream) / dt, 1)}
    te, n_torch = hmt.TorchEngine(model), 64 * L
    st, t0 = te.init_state(), time.perf_counter()
    for s in range(0, n_torch, L):
        _, _, st = te.segment(stream[s:s + L], L, st)
    report["speed"]["pytorch_scoring_bytes_per_s"] = round(n_torch / (time.perf_counter() - t0), 1)

    # 4b. generation speed (whole segments, so the segment/decode mix is the steady one)
    prompt = bytes(stream[:100].astype(np.uint8))
    for name, e in (("host", eng), ("pytorch", te)):
        g = Generator(e)
        g.prefill(prompt)
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for _ in range(args.gen_tokens):
            g.feed(g.sample(0.8, rng))
        dt = time.perf_counter() - t0
        report["speed"][f"{name}_generation_bytes_per_s"] = round(args.gen_tokens / dt, 1)
        report["speed"][f"{name}_generation_calls"] = dict(g.calls)
    fresh = eng.init_state()
    eng.segment(stream[:L], L, fresh)
    t0 = time.perf_counter()
    for _ in range(20):
        eng.segment(stream[:L], L, fresh)
    report["speed"]["host_segment_call_ms"] = round((time.perf_counter() - t0) / 20 * 1e3, 2)
    _, cache, _ = eng.segment(stream[:L], model.j, eng.init_state())
    t0 = time.perf_counter()
    for i in range(L - model.j - 1):
        _, cache = eng.decode(int(stream[i]), cache)
    report["speed"]["host_decode_call_ms"] = round((time.perf_counter() - t0) / (L - model.j - 1) * 1e3, 2)
    print(json.dumps({k: report[k] for k in ("state", "rss", "speed")}, indent=1), flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
