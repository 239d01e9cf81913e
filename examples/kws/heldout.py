"""Held-out evaluation of a keyword spotter: per voice and SNR, prefix words, window phase, PyTorch == bundle.

Streams (keywords and other words 0.6-1.5 s apart; the other words are SCv2 non-keywords, words never trained
on and the prefix words yesterday, stopwatch, gopher, nobody, upper, often) are synthesised for each held-out
voice (speakers kal, slt, ked in flite and festival: never in training or validation) and for the espeak-ng
test voices, then mixed with pink noise 20 and 10 dB below the speech (and left clean). For each stream:

- precision, recall, F1 of `edgekit stream`'s detections (long_stream.py's matching);
- false detections on prefix words: detections no keyword accounts for, inside a prefix word;
- repeat-shift: the stream played twice, its length half a hop off a multiple of the hop, so the second play
  sees every word at another window phase; a detection "moved" unless the other play has one with the same
  label within one hop;
- the same detections from the PyTorch model's windows as from the compiled bundle's.

    python examples/kws/heldout.py --out out/kws-heldout --checkpoint models/checkpoints/kws_demo.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgekit import audio  # noqa: E402
from edgekit.apps.kws import DEMO_CHECKPOINT, Detector, Window, _softmax, detect, open_model  # noqa: E402
from edgekit.models import build  # noqa: E402
from long_stream import OTHERS, score  # noqa: E402
from make_dataset import PREFIX_WORDS, make_stream, speakers, split_of  # noqa: E402
from speech_commands import KEYWORDS  # noqa: E402

SNRS = {"clean": float("inf"), "20 dB": 20.0, "10 dB": 10.0}


def prefix_false(detections: list, marks: list[bool], truth: list[dict]) -> tuple[int, int]:
    """(false detections inside prefix words, prefix words spoken)."""
    words = [u for u in truth if u["word"] in PREFIX_WORDS]
    false = sum(any(u["start"] - 0.1 <= d.time <= u["end"] + 0.1 for u in words)
                for d, ok in zip(detections, marks) if not ok)
    return false, len(words)


def repeat_shift(detections_of: Callable[[np.ndarray], list], x: np.ndarray, hop: int) -> dict:
    """Play `x` twice, cut so that the second play starts half a hop off the window grid; count detections of
    either play with no match (same label, time within one hop) in the other."""
    frames = (audio.frame_count(len(x)) // hop - 1) * hop + hop // 2
    x = x[:frames * audio.FRAME_SHIFT]
    seconds, tolerance = len(x) / audio.SAMPLE_RATE, hop * audio.FRAME_SHIFT / audio.SAMPLE_RATE
    both = detections_of(np.concatenate([x, x]))
    first = [(d.label, d.time) for d in both if d.time < seconds]
    second = [(d.label, d.time - seconds) for d in both if d.time >= seconds]
    used, same = set(), 0
    for label, t in first:
        hit = next((i for i, (l2, t2) in enumerate(second) if i not in used and l2 == label
                    and abs(t2 - t) <= tolerance + 1e-6), None)
        if hit is not None:
            used.add(hit)
            same += 1
    return {"first": len(first), "second": len(second), "same": same,
            "moved": len(first) + len(second) - 2 * same}


def pytorch_windows(checkpoint: Path, x: np.ndarray, hop: int, clip_frames: int) -> list[Window]:
    """The windows `detect` classifies (the stream, then one clip of silence), classified by PyTorch."""
    tail = np.zeros(clip_frames * audio.FRAME_SHIFT + audio.FRAME_LENGTH, np.float32)
    feats = audio.FrontEnd().push(np.concatenate([x, tail]))
    feats = feats[:len(feats) // hop * hop]
    starts = list(range(0, len(feats) - clip_frames + 1, hop))
    model = build("lmuformer", checkpoint=checkpoint).eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(np.stack([feats[s:s + clip_frames] for s in starts[i:i + 256]])))
                            ["mean_logits"][:, -1] for i in range(0, len(starts), 256)]).numpy()
    return [Window(s, _softmax(y)) for s, y in zip(starts, logits)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    p.add_argument("--minutes", type=float, default=3.0, help="stream length per voice (group)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--hop", type=int, default=14)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--smooth", type=int, default=3)
    p.add_argument("--voices", nargs="*", help="evaluate these speakers instead, one stream each (e.g. flite:awb "
                   "for a model trained without flite: a leave-one-synthesizer-out row)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    bundle, spec = open_model(None, a.checkpoint, None, print)
    groups = {v: [v] for v in a.voices or [v for v in speakers() if split_of(v) == "heldout"]}
    if not a.voices:
        groups["espeak-ng test voices"] = [v for v in speakers() if split_of(v) == "testing"]
    rows, seconds, compute = [], 0.0, 0.0
    for i, (name, voices) in enumerate(groups.items()):
        for label, snr in SNRS.items():
            x, truth = make_stream(a.minutes, voices, KEYWORDS, OTHERS, a.seed + i, (snr, snr), noise="pink_noise",
                                   bursts=False)
            found, windows = [], []
            report = detect(bundle, spec, [x], a.hop, a.threshold, a.smooth, found.append, windows=windows)
            seconds, compute = seconds + report.audio_seconds, compute + report.compute_seconds
            s = score(found, truth)
            false, prefixes = prefix_false(found, s.pop("marks"), truth)
            reference = Detector(spec, a.threshold, a.hop, a.smooth)
            torch_found = [d for w in pytorch_windows(a.checkpoint, x, a.hop, spec.clip_frames)
                           for d in reference.push(w)] + reference.close()
            same = [(d.label, d.start, d.end) for d in found] == [(d.label, d.start, d.end) for d in torch_found]
            shift = repeat_shift(lambda y: _detections(bundle, spec, y, a), x, a.hop) if snr == 20.0 else None
            rows.append({"voice": name, "snr": label, **s, "prefix_false": false, "prefix_words": prefixes,
                         "pytorch_identical": same, "repeat_shift": shift})
            print(json.dumps(rows[-1]), flush=True)
    results = {"checkpoint": str(a.checkpoint), "hop": a.hop, "threshold": a.threshold, "smooth": a.smooth,
               "minutes_per_stream": a.minutes, "rows": rows, "rtf": round(compute / seconds, 4),
               "pooled": pooled([r for r in rows if r["voice"] != "espeak-ng test voices"])}
    (a.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["pooled"]), f"RTF {results['rtf']}")


def pooled(rows: list[dict]) -> dict:
    """Precision, recall, F1 over several streams at each SNR, and the prefix and repeat-shift totals."""
    out = {}
    for snr in SNRS:
        rs = [r for r in rows if r["snr"] == snr]
        tp, det, kw = (sum(r[k] for r in rs) for k in ("true_positives", "detections", "keywords"))
        p, r = tp / max(det, 1), tp / max(kw, 1)
        out[snr] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-9), 4),
                    **{k: sum(r[k] for r in rs) for k in ("prefix_false", "prefix_words")}}
    shifts = [r["repeat_shift"] for r in rows if r["repeat_shift"]]
    out["repeat_shift"] = {k: sum(s[k] for s in shifts) for k in ("first", "second", "same", "moved")}
    return out


def _detections(bundle, spec, x: np.ndarray, a: argparse.Namespace) -> list:
    found = []
    detect(bundle, spec, [x], a.hop, a.threshold, a.smooth, found.append)
    return found


if __name__ == "__main__":
    main()
