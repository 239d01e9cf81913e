"""A long evaluation stream for keyword spotting, and the scores of `edgekit stream` on it.

The stream: keywords and other words (SCv2 non-keywords and words no model here was trained on) spoken by
voices unseen in training, separated by pauses, with bursts of loud noise, over a continuous background noise
whose kind changes. Its ground truth is a timeline JSON. Then it streams the stream through the compiled
model (exactly as `edgekit stream` does), scores keyword detections (precision, recall, F1), times it (RTF),
draws waveform, truth and detections on one timeline (PNG), and optionally repeats it to an hour to show that
resident memory stays flat.

    python examples/kws/long_stream.py --out out/kws-stream --minutes 5 --hour
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgekit import audio  # noqa: E402
from edgekit.apps.kws import DEMO_CHECKPOINT, Detection, Detector, Window, detect, open_model, open_wav  # noqa: E402
from make_dataset import PREFIX_WORDS, SCV2_WORDS, common_words, make_stream, speakers, split_of  # noqa: E402
from speech_commands import KEYWORDS  # noqa: E402

# Words absent from the training data of the demo model: the hardest "other words".
UNSEEN_WORDS = ["apple", "river", "doctor", "pencil", "summer", "winter", "kitchen", "orange", "silver", "planet",
                "basket", "dinner", "letter", "pocket", "morning", "evening", "camera", "forest", "island", "ticket"]
# The other words of evaluation streams: SCv2 non-keywords, words never trained on, and prefix words.
OTHERS = [w for w in SCV2_WORDS if w not in KEYWORDS] + UNSEEN_WORDS + common_words()[1] + PREFIX_WORDS * 8
TOLERANCE = 0.5  # s: a detection counts for a word if its time lies within the word's span widened by this


def score(detections: list[Detection], truth: list[dict]) -> dict:
    """Greedy one-to-one matching of detections to keyword utterances (same word, time within the span
    widened by TOLERANCE); everything unmatched is a false positive."""
    keywords = [u for u in truth if u["kind"] == "keyword"]
    used, tp, marks = set(), 0, []
    for d in detections:
        hit = next((i for i, u in enumerate(keywords) if i not in used and u["word"] == d.label
                    and u["start"] - TOLERANCE <= d.time <= u["end"] + TOLERANCE), None)
        marks.append(hit is not None)
        if hit is not None:
            used.add(hit)
            tp += 1
    p, r = tp / max(1, len(detections)), tp / max(1, len(keywords))
    return {"keywords": len(keywords), "detections": len(detections), "true_positives": tp,
            "precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-9), 4),
            "marks": marks}


def single_session_baseline(bundle, spec, x: np.ndarray, threshold: float, hop: int) -> list[Detection]:
    """The cheap alternative to staggered windows: ONE session never reset; every `hop` frames, the mean of the
    last clip-length per-frame logits is classified. Same merging of windows into detections."""
    from edgekit.runtime import Session
    from edgekit.apps.kws import _softmax

    session = Session(bundle)
    logits = session.feed(audio.features(x)[None], 1)["logits"][0, session.delay:]
    merge, out, w = Detector(spec, threshold, hop), [], spec.clip_frames
    for start in range(0, len(logits) - w + 1, hop):
        out += merge.push(Window(start, _softmax(logits[start:start + w].mean(0))))
    return out + merge.close()


def plot(path: Path, x: np.ndarray, truth: list[dict], detections: list[Detection], marks: list[bool],
         row_seconds: float = 60.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = len(x) / audio.SAMPLE_RATE
    rows = int(np.ceil(seconds / row_seconds))
    fig, axes = plt.subplots(rows, 1, figsize=(24, 2.6 * rows), squeeze=False)
    colours = {"keyword": "tab:blue", "other": "tab:gray", "noise": "tab:orange"}
    for r, ax in enumerate(axes[:, 0]):
        lo, hi = r * row_seconds, min(seconds, (r + 1) * row_seconds)
        seg = x[int(lo * audio.SAMPLE_RATE):int(hi * audio.SAMPLE_RATE)]
        ax.plot(lo + np.arange(len(seg))[::8] / audio.SAMPLE_RATE, seg[::8], lw=0.3, color="black")
        for u in truth:
            if lo <= u["start"] < hi:
                ax.axvspan(u["start"], u["end"], color=colours[u["kind"]], alpha=0.25, lw=0)
                ax.text(u["start"], -0.95, u["word"], fontsize=7, color=colours[u["kind"]], rotation=90, va="bottom")
        for d, ok in zip(detections, marks):
            if lo <= d.time < hi:
                ax.axvline(d.time, color="tab:green" if ok else "tab:red", lw=1.2)
                ax.text(d.time, 0.95, f"{d.label} {d.confidence:.2f}", fontsize=7, va="top",
                        color="tab:green" if ok else "tab:red", rotation=90)
        ax.set_xlim(lo, lo + row_seconds)
        ax.set_ylim(-1, 1)
        ax.set_yticks([])
    axes[0, 0].set_title("waveform; truth spans (blue keyword, gray other word, orange noise burst); "
                         "detections (green correct, red false)")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--split", default="testing", help="whose voices: testing (unseen) or validation (for tuning)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bundle", type=Path, help="a compiled bundle (default: --checkpoint compiled for this host)")
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="default: the shipped demo model")
    p.add_argument("--smooth", type=int, nargs="*", default=[3], help="windows averaged before peak picking")
    p.add_argument("--hop", type=int, nargs="*", default=[14], help="hops to compare (the first one is plotted)")
    p.add_argument("--threshold", type=float, nargs="*", default=[0.5])
    p.add_argument("--baseline", action="store_true", help="also score one never-reset session")
    p.add_argument("--hour", action="store_true", help="repeat the stream to one hour and record RSS every minute")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    wav = a.out / "stream.wav"
    voices = [v for v in speakers() if split_of(v) == a.split]
    x, truth = make_stream(a.minutes, voices, KEYWORDS, OTHERS, a.seed)
    audio.write_wav(wav, x)
    x = audio.read_wav(wav)
    (a.out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    bundle, spec = open_model(a.bundle, None if a.bundle else a.checkpoint, None, print)
    results = {"bundle": str(bundle.path),
               "stream": {"seconds": round(len(x) / audio.SAMPLE_RATE, 1), "split": a.split, "seed": a.seed,
                          "items": {k: sum(u["kind"] == k for u in truth) for k in ("keyword", "other", "noise")}},
               "runs": []}
    first = None
    for hop in a.hop:
        windows: list[Window] = []
        report = detect(bundle, spec, open_wav(wav)[1], hop=hop, threshold=min(a.threshold), windows=windows)
        for th, smooth in itertools.product(a.threshold, a.smooth):
            dets = _redetect(spec, windows, th, hop, smooth)
            s = score(dets, truth)
            results["runs"].append({"design": "staggered", "hop": hop, "sessions": spec.clip_frames // hop,
                                    "threshold": th, "smooth": smooth, "rtf": round(report.rtf, 4),
                                    "cpu_rtf": round(report.cpu_rtf, 4),
                                    **{k: v for k, v in s.items() if k != "marks"}})
            print(json.dumps(results["runs"][-1]), flush=True)
            first = first or (dets, s["marks"])
        if a.baseline:
            for th in a.threshold:
                s = score(single_session_baseline(bundle, spec, x, th, hop), truth)
                results["runs"].append({"design": "one session, never reset", "hop": hop, "sessions": 1,
                                        "threshold": th, **{k: v for k, v in s.items() if k != "marks"}})
                print(json.dumps(results["runs"][-1]), flush=True)
    plot(a.out / "timeline.png", x, truth, *first)
    if a.hour:
        repeat = int(np.ceil(3600 / (len(x) / audio.SAMPLE_RATE)))
        report = detect(bundle, spec, open_wav(wav, repeat)[1], hop=a.hop[0], threshold=a.threshold[0],
                        smooth=a.smooth[0])
        results["hour"] = {"audio_seconds": round(report.audio_seconds, 1), "rtf": round(report.rtf, 4),
                           "cpu_rtf": round(report.cpu_rtf, 4), "detections": report.detections,
                           "rss_mib": [[t, round(r / 2**20, 2)] for t, r in report.rss]}
        rss = [r for _, r in report.rss[1:]]
        print(f"hour: RTF {report.rtf:.4f} (CPU {report.cpu_rtf:.4f}), "
              f"RSS {min(rss) / 2**20:.1f}..{max(rss) / 2**20:.1f} MiB", flush=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def _redetect(spec, windows: list[Window], threshold: float, hop: int, smooth: int = 3) -> list[Detection]:
    """Detections at another threshold from the same windows (the classifier does not depend on it)."""
    merge, out = Detector(spec, threshold, hop, smooth), []
    for w in windows:
        out += merge.push(w)
    return out + merge.close()


if __name__ == "__main__":
    main()
