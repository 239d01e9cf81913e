"""Loader for the Speech Commands v2 layout (the real data set or the synthetic one from make_dataset.py).

The 12-class task of the SCv2 paper: ten keywords, `_unknown_` (every other word folder) and `_silence_`
(1 s stretches of `_background_noise_` at random levels). Splits come from validation_list.txt and
testing_list.txt; training is every other clip. Clips are zero-padded or cut to 1 s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.audio import NUM_MEL_BINS, SAMPLE_RATE, features, frame_count, read_wav

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SILENCE, UNKNOWN = "_silence_", "_unknown_"
LABELS = [SILENCE, UNKNOWN, *KEYWORDS]
NOISE_DIR = "_background_noise_"


@dataclass
class Split:
    waves: np.ndarray  # [N, 16000] float32
    labels: np.ndarray  # [N] int64, indices into LABELS
    names: list[str]  # relative paths, or "_silence_/<noise>@<offset>"

    def features(self) -> np.ndarray:
        """Normalised model inputs [N, 98, 128], written in place (a list then a stack would need twice the memory
        of a 50k-clip set)."""
        out = np.empty((len(self.waves), frame_count(self.waves.shape[1]), NUM_MEL_BINS), np.float32)
        for i, w in enumerate(self.waves):
            out[i] = features(w)
        return out


def split_names(root: Path) -> dict[str, list[str]]:
    """Clip paths (relative, `word/file.wav`) of each split, as the SCv2 lists define them."""
    listed = {s: set((root / f"{s}_list.txt").read_text().split()) for s in ("validation", "testing")}
    every = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*.wav") if p.parent.name != NOISE_DIR)
    train = [n for n in every if n not in listed["validation"] and n not in listed["testing"]]
    return {"training": train, "validation": sorted(listed["validation"]), "testing": sorted(listed["testing"])}


def fit(x: np.ndarray, length: int = SAMPLE_RATE) -> np.ndarray:
    return np.pad(x[:length], (0, max(0, length - len(x))))


def load_split(root: Path, split: str, seed: int = 0, labels: list[str] = LABELS) -> Split:
    """All clips of one split, labelled for the 12-class task, plus as many silence clips as an average
    keyword has (cut from the background noises, gain from 0 to 1, deterministic per split)."""
    root = Path(root)
    names = split_names(root)[split]
    index = {w: i for i, w in enumerate(labels)}
    ys = [index.get(n.split("/")[0], index[UNKNOWN]) for n in names]
    kw = [y for y in ys if labels[y] not in (SILENCE, UNKNOWN)]
    n_silence = len(kw) // max(1, len(labels) - 2)
    waves = np.empty((len(names) + n_silence, SAMPLE_RATE), np.float32)
    for i, n in enumerate(names):
        waves[i] = fit(read_wav(root / n))
    noises = {p.stem: read_wav(p) for p in sorted((root / NOISE_DIR).glob("*.wav"))}
    rng = np.random.default_rng([seed, ["training", "validation", "testing"].index(split)])
    for i in range(len(names), len(waves)):
        kind = sorted(noises)[rng.integers(len(noises))]
        at = int(rng.integers(0, len(noises[kind]) - SAMPLE_RATE))
        waves[i] = noises[kind][at:at + SAMPLE_RATE] * rng.uniform(0.0, 1.0) ** 2
        ys.append(index[SILENCE])
        names.append(f"{SILENCE}/{kind}@{at}")
    return Split(waves, np.array(ys, dtype=np.int64), names)
