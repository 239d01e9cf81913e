"""A Speech-Commands-style keyword data set synthesised offline with espeak-ng (no downloads).

Layout as Speech Commands v2: `ROOT/<word>/<speaker>_nohash_<n>.wav` (16 kHz mono 16-bit, 1 s),
`ROOT/_background_noise_/*.wav`, `ROOT/validation_list.txt`, `ROOT/testing_list.txt`. A "speaker" is one
espeak-ng voice variant (`+f2`, `+Storm`, ...); each clip speaks with it in a random English accent, rate and
pitch, placed at a random offset, scaled and mixed with a background noise at a random SNR. Speakers are split
by a hash of their name (like SCv2), so validation and test voices are never heard in training.

    python examples/kws/make_dataset.py --out data/kws-synth
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from edgekit.audio import SAMPLE_RATE, read_wav, write_wav  # noqa: E402

SCV2_WORDS = ["backward", "follow", "five", "bed", "zero", "on", "learn", "two", "house", "tree", "dog", "stop",
              "seven", "eight", "down", "six", "forward", "cat", "right", "visual", "four", "wow", "no", "nine",
              "off", "three", "left", "marvin", "yes", "up", "sheila", "happy", "bird", "go", "one"]
# Extra non-keywords: more for the model to reject (each is just another "unknown" folder).
EXTRA_WORDS = ["hello", "water", "table", "window", "purple", "garden", "music", "number", "paper", "yellow",
               "money", "button", "listen", "open", "close", "thanks", "coffee", "monkey", "station", "rabbit"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc"]
NOISES = ["white_noise", "pink_noise", "brown_noise", "hum", "babble"]
CLIP = SAMPLE_RATE  # 1 s


def variants() -> list[str]:
    """espeak-ng voice variants installed here (names with spaces cannot be passed as `+name`)."""
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1].removeprefix("!v/") for line in out.splitlines()[1:] if "!v/" in line]
    return sorted({n for n in names if " " not in n})


def split_of(speaker: str, val_pct: int = 15, test_pct: int = 15) -> str:
    """Stable speaker split by hash of the name, as SCv2 does, so it survives espeak-ng updates."""
    h = int(hashlib.sha1(speaker.encode()).hexdigest(), 16) % 100
    return "validation" if h < val_pct else "testing" if h < val_pct + test_pct else "training"


def speaker_id(speaker: str) -> str:
    return hashlib.sha1(speaker.encode()).hexdigest()[:8]


def synthesize(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng speech as float32 at 16 kHz (sox resamples from espeak's 22.05 kHz), silence trimmed."""
    tts = subprocess.Popen(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    # -D: no dither, so that a seed always gives the same samples
    raw = subprocess.run(["sox", "-q", "-D", "-t", "wav", "-", "-t", "raw", "-r", str(SAMPLE_RATE), "-e", "signed",
                          "-b", "16", "-c", "1", "-"], stdin=tts.stdout, capture_output=True, check=True).stdout
    tts.wait()
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(float(np.abs(x).max()), 1e-6))
    return x[loud[0]:loud[-1] + 1] if len(loud) else x


def make_noise(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Synthetic background noises standing in for SCv2's recordings, unit RMS."""
    n = int(seconds * SAMPLE_RATE)
    if kind in ("white_noise", "pink_noise", "brown_noise"):
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
        spec /= {"white_noise": 1.0, "pink_noise": np.sqrt(f), "brown_noise": f}[kind]
        x = np.fft.irfft(spec, n)
    elif kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        base = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * base * h * t + rng.uniform(0, 6.3)) / h for h in range(1, 8))
        x = x + 0.1 * rng.standard_normal(n)
    else:  # babble: many quiet overlapping voices reading filler text, reversed so no word is intelligible
        x = np.zeros(n)
        for _ in range(int(seconds * 3)):
            text = " ".join(rng.choice(EXTRA_WORDS, size=6))
            s = synthesize(text, f"{rng.choice(ACCENTS)}+m{rng.integers(1, 8)}", int(rng.integers(140, 220)),
                           int(rng.integers(20, 80)))[::-1]
            at = int(rng.integers(0, max(1, n - len(s))))
            x[at:at + len(s)] += s[:n - at]
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def render(word: str, speaker: str, seed: int, noises: dict[str, np.ndarray]) -> np.ndarray:
    """One 1 s clip: the word in a random accent, rate and pitch, at a random offset, level and SNR."""
    rng = np.random.default_rng(seed)
    speech = synthesize(word, f"{rng.choice(ACCENTS)}+{speaker}", int(rng.integers(120, 230)),
                        int(rng.integers(15, 90)))[:CLIP]
    clip = np.zeros(CLIP, np.float32)
    at = int(rng.integers(0, CLIP - len(speech) + 1))
    clip[at:at + len(speech)] = speech / (np.abs(speech).max() + 1e-9) * rng.uniform(0.1, 0.9)
    return add_noise(clip, noises, rng)


def add_noise(clip: np.ndarray, noises: dict[str, np.ndarray], rng: np.random.Generator,
              snr_db: tuple[float, float] = (5.0, 40.0)) -> np.ndarray:
    """Mix a random stretch of a random noise at a random SNR relative to the clip's active RMS."""
    noise = noises[rng.choice(sorted(noises))]
    at = int(rng.integers(0, len(noise) - len(clip)))
    active = clip[np.abs(clip) > 0.01 * np.abs(clip).max()] if np.any(clip) else clip
    rms = float(np.sqrt(np.mean(active ** 2))) if len(active) else 0.0
    gain = rms / 10 ** (rng.uniform(*snr_db) / 20)
    return np.clip(clip + gain * noise[at:at + len(clip)], -1, 1).astype(np.float32)


def load_noises(root: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_wav(p) for p in sorted((root / "_background_noise_").glob("*.wav"))}


def make_stream(minutes: float, split: str, keywords: list[str], others: list[str], seed: int,
                snr_db: tuple[float, float] = (5.0, 30.0)) -> tuple[np.ndarray, list[dict]]:
    """A continuous stream (samples, ground-truth timeline) by the voices of one split: keywords (half of the
    spoken items) and other words with pauses of 0.4-2.5 s, bursts of loud noise, and a background noise whose
    kind and level change every 30 s. Each word is scaled to a random SNR over the background under it."""
    rng = np.random.default_rng(seed)
    speakers = [v for v in variants() if split_of(v) == split]
    n = int(minutes * 60 * SAMPLE_RATE)
    x = np.concatenate([make_noise(NOISES[i % 4], 30.0, rng) * rng.uniform(0.002, 0.05)
                        for i in rng.permutation(int(np.ceil(minutes * 2)))])[:n]
    bursts = {k: make_noise(k, 10.0, rng) for k in ("white_noise", "pink_noise", "hum")}
    truth, t = [], int(rng.uniform(0.5, 1.5) * SAMPLE_RATE)
    while t < n:
        if rng.uniform() < 0.1:  # a burst of loud noise, no speech
            word, voice = sorted(bursts)[rng.integers(len(bursts))], None
            seg, kind = bursts[word][:int(rng.uniform(1.0, 3.0) * SAMPLE_RATE)] * rng.uniform(0.05, 0.3), "noise"
        else:
            word = str(rng.choice(keywords)) if rng.uniform() < 0.5 else str(rng.choice(others))
            voice = f"{rng.choice(ACCENTS)}+{rng.choice(speakers)}"
            speech = synthesize(word, voice, int(rng.integers(120, 230)), int(rng.integers(15, 90)))
            if not len(speech):  # espeak-ng said nothing (seen for rare voice/rate combinations)
                continue
            under = np.sqrt(np.mean(x[t:t + len(speech)] ** 2))
            gain = under * 10 ** (rng.uniform(*snr_db) / 20) / np.sqrt(np.mean(speech ** 2))
            seg, kind = speech * min(gain, 0.95 / np.abs(speech).max()), "keyword" if word in keywords else "other"
        if t + len(seg) + SAMPLE_RATE > n:
            break
        snr = 20 * np.log10(np.sqrt(np.mean(seg ** 2)) / np.sqrt(np.mean(x[t:t + len(seg)] ** 2)))
        x[t:t + len(seg)] += seg
        truth.append({"start": round(t / SAMPLE_RATE, 3), "end": round((t + len(seg)) / SAMPLE_RATE, 3),
                      "word": word, "kind": kind, "voice": voice, "snr_db": round(float(snr), 1)})
        t += len(seg) + int(rng.uniform(0.4, 2.5) * SAMPLE_RATE)
    return np.clip(x, -1, 1).astype(np.float32), truth


def _write_word(args: tuple[Path, str, list[tuple[str, int]], int]) -> list[tuple[str, str]]:
    root, word, jobs, seed = args
    noises = load_noises(root)
    (root / word).mkdir(exist_ok=True)
    names = []
    for speaker, k in jobs:
        name = f"{word}/{speaker_id(speaker)}_nohash_{k}.wav"
        digest = int(hashlib.sha1(f"{seed}/{name}".encode()).hexdigest()[:12], 16)
        write_wav(root / name, render(word, speaker, digest, noises))
        names.append((name, split_of(speaker)))
    return names


def make_dataset(out: Path, words: list[str], per_word: dict[str, int], seed: int = 0, workers: int = 1,
                 noise_seconds: float = 60.0) -> dict[str, int]:
    """Write the data set; `per_word` gives clips per word for each split. Returns the clip count per split."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "_background_noise_").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for kind in NOISES:
        write_wav(out / "_background_noise_" / f"{kind}.wav", 0.3 * make_noise(kind, noise_seconds, rng))
    by_split: dict[str, list[str]] = {"training": [], "validation": [], "testing": []}
    for v in variants():
        by_split[split_of(v)].append(v)
    jobs = []
    for word in words:
        plan = []
        for split, count in per_word.items():
            speakers = by_split[split]
            plan += [(speakers[i % len(speakers)], i // len(speakers)) for i in range(count)]
        jobs.append((out, word, plan, seed))
    with ProcessPoolExecutor(workers) as pool:
        names = [n for batch in pool.map(_write_word, jobs) for n in batch]
    lists = {s: sorted(n for n, split in names if split == s) for s in by_split}
    (out / "validation_list.txt").write_text("".join(f"{n}\n" for n in lists["validation"]))
    (out / "testing_list.txt").write_text("".join(f"{n}\n" for n in lists["testing"]))
    (out / "speakers.txt").write_text("".join(f"{speaker_id(v)} {v} {s}\n" for s, vs in by_split.items() for v in vs))
    return {s: len(v) for s, v in lists.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--words", nargs="*", default=SCV2_WORDS + EXTRA_WORDS, help="default: the 35 SCv2 words + extras")
    p.add_argument("--train", type=int, default=240, help="training clips per word")
    p.add_argument("--val", type=int, default=30, help="validation clips per word")
    p.add_argument("--test", type=int, default=60, help="test clips per word")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    counts = make_dataset(a.out, a.words, {"training": a.train, "validation": a.val, "testing": a.test},
                          a.seed, a.workers)
    print(f"wrote {a.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))


if __name__ == "__main__":
    main()
