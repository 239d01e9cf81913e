"""The HMT figures, from the pipeline's own stages: compile, validate, bench; plus the eager fixed-shape step.

    python examples/hmt/report.py --checkpoint models/checkpoints/hmt_small.pt --out /tmp/hmt_report

1. `edgekit compile hmt` for this host.
2. `edgekit validate` over --segments segments of held-out text (the training script's validation split, repeated;
   default 1,563 segments = 100,032 bytes, so the N-slot memory cache wraps ~100 times): the host artifact's
   logits and memory embeddings against the float64 reference, the last --decode-segments fed byte by byte as
   generation runs them; RSS of the artifact's process at T/10 and T.
3. The eager float32 fixed-shape step (`HMT.score`) against the same float64 reference over the first
   --step-segments segments: the deployable form itself, before export.
4. State carried between segments vs a plain Transformer's full KV cache at 10k and 100k tokens.
5. `edgekit bench`: bytes per second for scoring (segment step), decode steps and generation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgekit.bench import bench
from edgekit.compile import compile
from edgekit import models
from edgekit.models import hmt
from edgekit.validate import validate


def held_out_text(path: Path) -> Path:
    """The training script's validation split, written to `path`."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train import corpus

    path.write_bytes(corpus()[1])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/hmt_report"))
    ap.add_argument("--segments", type=int, default=1563)
    ap.add_argument("--decode-segments", type=int, default=2)
    ap.add_argument("--step-segments", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = models.build("hmt", args.config, args.checkpoint)
    report: dict = {"command": "python " + " ".join(sys.argv), "config": model.config(),
                    "parameters": sum(p.numel() for p in model.parameters())}
    args.out.mkdir(parents=True, exist_ok=True)
    text = held_out_text(args.out / "held_out.txt")

    t0 = time.perf_counter()
    bundle = compile("hmt", "host", args.out / "bundle", config=None if args.checkpoint else args.config,
                     checkpoint=args.checkpoint, force=True, progress=lambda m: print(m, flush=True))
    report["build"] = {"seconds": round(time.perf_counter() - t0, 1), "bundle": str(bundle.path),
                       "library_mib": round(bundle.library.stat().st_size / 2**20, 2)}

    print(f"validating over {args.segments} segments", flush=True)
    v = validate(bundle.path, segments=args.segments, decode_segments=args.decode_segments, text=text)
    report["validation"] = {k: v[k] for k in ("segments", "tokens", "decode_segments", "outputs",
                                              "next_byte_agreement", "rss_bytes", "checks", "passed", "seconds")}
    print(json.dumps(report["validation"], indent=1), flush=True)

    data = np.frombuffer(text.read_bytes(), np.uint8).astype(np.int64)
    x = torch.from_numpy(np.resize(data, args.step_segments * model.L)).view(1, -1)
    with torch.no_grad():
        ref_logits, ref_mem = model.double().reference(x)
        scored = model.float().score(x)
        step_logits, step_mem = scored["logits"], scored["memory_embedding"]
    report["eager_step_vs_reference"] = {
        "segments": args.step_segments,
        "max_abs_logit_error": float((step_logits.double() - ref_logits).abs().max()),
        "max_abs_memory_error": float((step_mem.double() - ref_mem).abs().max()),
        "logit_range": [float(ref_logits.min()), float(ref_logits.max())]}

    report["state"] = {"hmt_bytes_between_segments": model.state_bytes(),
                       "decode_cache_bytes": bundle.manifest["decode_cache_bytes"],
                       "kv_cache_bytes": {f"{n}": hmt.KVCacheLM.cache_bytes(model, n) for n in (10_000, 100_000)}}
    print(json.dumps({k: report[k] for k in ("eager_step_vs_reference", "state")}, indent=1), flush=True)

    print("benchmarking", flush=True)
    b = bench(bundle.path, calls=300, warmup=5)
    report["bench"] = {f"{r['engine']} {r['call']}": {"p50_us_per_byte": round(r["p50_us"], 1),
                                                      "bytes_per_second": round(r["bytes_per_second"], 1)}
                       for r in b["results"]}
    print(json.dumps(report["bench"], indent=1), flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
