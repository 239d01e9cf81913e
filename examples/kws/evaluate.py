"""Held-out clip accuracy of a keyword-spotting checkpoint in PyTorch and as a compiled host bundle.

Each test clip goes through the bundle as a stream (a fresh session, the clip's frames, flush), so this also
checks the compiled step against the PyTorch parallel forward on real inputs. The figures are added to the
checkpoint's JSON record.

    python examples/kws/evaluate.py --data data/kws-synth --checkpoint models/checkpoints/kws_demo.pt
    python examples/kws/evaluate.py ... --quantize int8     # an int8 bundle against the quantized model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgekit.models import build  # noqa: E402
from edgekit.runtime import Session  # noqa: E402
from edgekit import units  # noqa: E402
from edgekit.apps import cache  # noqa: E402
from edgekit.apps.kws import host_bundle  # noqa: E402
from speech_commands import load_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--split", default="testing")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: an int8 bundle, against the quantized PyTorch model, beside the fp32 model's accuracy")
    a = p.parse_args()
    torch.set_num_threads(1)
    split = load_split(a.data, a.split)
    x = split.features()
    model = build("lmuformer", checkpoint=a.checkpoint)
    reference = units.get("frame").reference(model, a.quantize)

    def final_logits(forward_frames) -> np.ndarray:
        """The clip's prediction: its logits averaged over its frames (the running mean at its last frame)."""
        with torch.no_grad():
            return np.concatenate([forward_frames(torch.from_numpy(x[i:i + 256]))["logits"].mean(1).numpy()
                                   for i in range(0, len(x), 256)])

    ref = final_logits(reference.forward_frames)
    bundle = host_bundle(a.checkpoint, print) if a.quantize == "none" else \
        cache.host_bundle("lmuformer", checkpoint=a.checkpoint, progress=print, chunks=(1, 7), quantize=a.quantize)
    session = Session(bundle)
    chunk = max(e["frames"] for e in session.bundle.manifest["entries"].values() if e["frames"])
    got = np.concatenate([session.run(x[i:i + 1], chunk)["mean_logits"][:, -1] for i in range(len(x))])
    result = {"clips": len(x), "pytorch": float((ref.argmax(1) == split.labels).mean()),
              "bundle": float((got.argmax(1) == split.labels).mean()),
              "prediction_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
              "max_abs_logit_difference": float(np.abs(ref - got).max())}
    if a.quantize != "none":
        result["pytorch_fp32"] = float((final_logits(model.forward_frames).argmax(1) == split.labels).mean())
    print(json.dumps(result))
    record_path = a.checkpoint.with_suffix(".json")
    record = json.loads(record_path.read_text())
    key = f"{a.split}_clips" + ("" if a.quantize == "none" else f"_{a.quantize}")
    record.setdefault("evaluation", {})[key] = result
    record_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
