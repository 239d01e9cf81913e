"""Choose the detector's threshold, smoothing and hop on validation streams, never on the evaluation voices.

Streams like heldout.py's (keywords and other words 0.6-1.5 s apart, pink noise at 20 and 10 dB below the
speech, and clean) are made from the validation voices of espeak-ng and MBROLA (never trained on) and from each
other engine's training voices (flite awb and rms, piper joe, the Kokoro speakers and blends, MBROLA: heard in
training, but other renderings of the words): the held-out voices (kal, slt, ked) and the espeak-ng test voices
are never used. The windows of every stream are classified once per hop (PyTorch; the bundle gives identical
windows, see heldout.py), then the detector is run for every threshold and smoothing; the best F1 pooled over all
streams wins.

    python examples/kws/tune.py --out out/kws-tune --checkpoint models/checkpoints/kws_demo.pt
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgekit.apps.kws import DEMO_CHECKPOINT, ClipSpec  # noqa: E402
from heldout import SNRS, pytorch_windows  # noqa: E402
from long_stream import OTHERS, _redetect, score  # noqa: E402
from make_dataset import make_stream, speakers, split_of  # noqa: E402
from speech_commands import KEYWORDS  # noqa: E402


def validation_groups() -> dict[str, list[str]]:
    """Who speaks the validation streams: the validation voices (espeak-ng, MBROLA), and each other engine's
    training voices (one stream per engine)."""
    groups = {"validation voices": [v for v in speakers() if split_of(v) == "validation"]}
    for v in speakers():
        if split_of(v) == "training" and not v.startswith("espeak-ng:"):
            groups.setdefault(v.split(":")[0] + " training voices", []).append(v)
    return groups


def validation_streams(folder: Path, minutes: float, seed: int) -> list[tuple[np.ndarray, list[dict]]]:
    """Made once and kept in `folder` (the neural voices sample, so a remake differs): every model and setting
    is compared on the same audio."""
    if not (folder / "truth.json").is_file():
        streams = [make_stream(minutes, voices, KEYWORDS, OTHERS, seed + i, (snr, snr), noise="pink_noise",
                               bursts=False) for i, voices in enumerate(validation_groups().values())
                   for snr in SNRS.values()]
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "audio.npz", *[x for x, _ in streams])
        (folder / "truth.json").write_text(json.dumps([t for _, t in streams]) + "\n")
    waves = np.load(folder / "audio.npz")
    truths = json.loads((folder / "truth.json").read_text())
    return [(waves[f"arr_{i}"], t) for i, t in enumerate(truths)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    p.add_argument("--minutes", type=float, default=2.0, help="stream length per voice (group) and SNR")
    p.add_argument("--seed", type=int, default=101, help="not heldout.py's seeds, so no stream is shared")
    p.add_argument("--streams", type=Path, help="where the validation streams are kept (default: OUT/streams); "
                   "give the same folder to compare models on the same audio")
    p.add_argument("--hop", type=int, nargs="+", default=[14])
    p.add_argument("--smooth", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--threshold", type=float, nargs="+", default=[round(t, 2) for t in np.arange(0.3, 0.76, 0.05)])
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    spec = ClipSpec.for_model(json.loads(a.checkpoint.with_suffix(".json").read_text())["config"]["num_classes"],
                              a.checkpoint)
    streams = validation_streams(a.streams or a.out / "streams", a.minutes, a.seed)
    runs = []
    for hop in a.hop:
        windows = [pytorch_windows(a.checkpoint, x, hop, spec.clip_frames) for x, _ in streams]
        for smooth, threshold in itertools.product(a.smooth, a.threshold):
            scores = [score(_redetect(spec, w, threshold, hop, smooth), truth)
                      for w, (_, truth) in zip(windows, streams)]
            tp, det, kw = (sum(s[k] for s in scores) for k in ("true_positives", "detections", "keywords"))
            precision, recall = tp / max(det, 1), tp / max(kw, 1)
            f1 = 2 * precision * recall / max(precision + recall, 1e-9)
            runs.append({"hop": hop, "smooth": smooth, "threshold": threshold, "precision": round(precision, 4),
                         "recall": round(recall, 4), "f1": round(f1, 4)})
            print(json.dumps(runs[-1]), flush=True)
    best = max(runs, key=lambda r: r["f1"])
    (a.out / "results.json").write_text(json.dumps({"checkpoint": str(a.checkpoint), "groups": validation_groups(),
                                                    "minutes": a.minutes, "seed": a.seed, "runs": runs,
                                                    "best": best}, indent=1) + "\n")
    print("best:", json.dumps(best))


if __name__ == "__main__":
    main()
