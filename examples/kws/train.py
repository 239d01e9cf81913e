"""Train the small LMUFormer keyword spotter shipped as edgekit's demo model, on one CPU thread.

Input: 1 s clips -> 98 frames of the published front end (edgekit.audio, 128 mel bins), no padding; the clip
prediction is the mean of the per-frame logits over the 98 frames (`mean_logits` at the last frame), so a
streaming session fed one 1 s window from a zero state and flushed computes exactly the training forward.

Besides the clips of the data set, every epoch draws fresh 1 s windows at random offsets from synthetic
continuous streams (training voices and words only): the windows `edgekit stream` classifies. A window is
labelled with the keyword it holds whole; a keyword cut by the window's edge makes it `_unknown_`, so the
model learns that "own" cut from "down" is not "on"; windows with nothing spoken are `_silence_`.

    python examples/kws/train.py --data data/kws-synth --out models/checkpoints/kws_demo.pt
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgekit import audio  # noqa: E402
from edgekit.models.lmuformer import LMUFormer  # noqa: E402
from make_dataset import (AFFIX_WORDS, EXTRA_WORDS, SCV2_WORDS, common_words, make_stream, speakers,  # noqa: E402
                          split_of, training_speakers)
from speech_commands import KEYWORDS, LABELS, SILENCE, UNKNOWN, Split, load_split  # noqa: E402

SILENCE_LEVEL = float(np.float32(audio.normalise(np.log(audio.EPSILON))))  # a band with no energy

WHOLE, CUT = 0.03, 0.3  # s of a keyword outside the window still counted whole; fraction outside that makes it cut


def spec_augment(x: torch.Tensor, gen: torch.Generator, freq: int = 16, time_: int = 12) -> torch.Tensor:
    """One frequency and one time mask per clip, filled with the silence level."""
    b, t, f = x.shape
    f0 = torch.randint(0, f - freq, (b, 1), generator=gen)
    fw = torch.randint(0, freq + 1, (b, 1), generator=gen)
    t0 = torch.randint(0, t - time_, (b, 1), generator=gen)
    tw = torch.randint(0, time_ + 1, (b, 1), generator=gen)
    fm = (torch.arange(f) >= f0) & (torch.arange(f) < f0 + fw)
    tm = (torch.arange(t) >= t0) & (torch.arange(t) < t0 + tw)
    return x.masked_fill(fm[:, None, :] | tm[:, :, None], SILENCE_LEVEL)


@cache
def bin_centres(bins: int) -> tuple[np.ndarray, torch.Tensor]:
    """The mel filterbank's centre frequencies, in mel (numpy) and in Hz (torch); read-only, shared by every batch."""
    mels = audio.mel_edges(bins)[1:-1]
    return mels, torch.from_numpy(audio.mel_to_hz(mels))


def narrowband(x: torch.Tensor, gen: torch.Generator, share: float) -> torch.Tensor:
    """A recording made at 8 kHz (a telephone line, a cheap microphone), then resampled: nothing above its 3.4-4 kHz
    cutoff, background noise included; `share` of the items get the silence level in every band above a random
    cutoff. (make_dataset.py's telephone band limits the speech only, before its noise is mixed in.)"""
    b, _, f = x.shape
    cutoff = 3400.0 + 600.0 * torch.rand(b, 1, generator=gen, dtype=torch.float64)
    mute = (bin_centres(f)[1][None, :] > cutoff) & (torch.rand(b, 1, generator=gen) < share)
    return x.masked_fill(mute[:, None, :], SILENCE_LEVEL)


def vtlp(x: torch.Tensor, gen: torch.Generator, warp: float) -> torch.Tensor:
    """Vocal-tract length perturbation on log-mel features: each clip's spectrum is stretched along frequency by
    a factor in [1 - warp, 1 + warp] (bin b takes the energy the unwarped spectrum had at f_b / factor), as a
    shorter or longer vocal tract moves every formant by the same factor."""
    b, _, f = x.shape
    mels, hz = bin_centres(f)
    alpha = 1 + (torch.rand(b, 1, generator=gen, dtype=torch.float64) * 2 - 1) * warp
    src = torch.from_numpy(np.interp(audio.mel(np.clip((hz / alpha).numpy(), 0, None)), mels, np.arange(f)))
    lo = src.floor().long().clamp(0, f - 1)
    hi = (lo + 1).clamp(max=f - 1)
    w = (src - lo).float()[:, None, :]
    take = lambda i: torch.gather(x, 2, i[:, None, :].expand(-1, x.shape[1], -1))  # noqa: E731
    return take(lo) * (1 - w) + take(hi) * w


class FeatureNoise:
    """Noise mixed into normalised log-mel features at a random SNR: filterbank energies add (the speech-noise
    cross term averages out over a band), so mixing costs one logaddexp instead of a new front-end pass. The
    SNR is relative to the clip's active frames, as make_dataset.py's and heldout.py's mixing is."""

    def __init__(self, root: Path, kinds: list[str], snr_db: tuple[float, float]):
        self.noises = [torch.from_numpy(audio.features(audio.read_wav(root / "_background_noise_" / f"{k}.wav")))
                       for k in kinds]
        self.snr_db = snr_db

    def __call__(self, x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
        b, t, _ = x.shape
        mix = torch.rand(b, generator=gen) < share
        if not mix.any():
            return x
        speech = audio.denormalise(x[mix])
        noise = torch.stack([self._stretch(t, gen) for _ in range(int(mix.sum()))])
        frame = speech.exp().sum(2)
        active = frame > 1e-4 * frame.amax(1, keepdim=True)  # samples above 1 % of the peak, as add_noise
        level = (frame * active).sum(1) / active.sum(1)
        snr = torch.empty(len(speech)).uniform_(*self.snr_db, generator=gen)
        gain = level.log() - noise.exp().sum(2).mean(1).log() - snr * np.log(10) / 10
        out = x.clone()
        out[mix] = audio.normalise(torch.logaddexp(speech, noise + gain[:, None, None]))
        return out

    def _stretch(self, frames: int, gen: torch.Generator) -> torch.Tensor:
        noise = self.noises[int(torch.randint(len(self.noises), (1,), generator=gen))]
        at = int(torch.randint(len(noise) - frames, (1,), generator=gen))
        return audio.denormalise(noise[at:at + frames])


@torch.no_grad()
def accuracy(model: LMUFormer, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    pred = torch.cat([model.forward_frames(x[i:i + batch])["logits"].mean(1).argmax(1)
                      for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


class StreamWindows:
    """Labelled clip-length windows of a synthetic stream; features are per frame, so a window of the stream's
    features is exactly what a staggered session sees."""

    def __init__(self, minutes: float, voices: list[str], seed: int, frames: int, snr_db: tuple[float, float]):
        others = [w for w in SCV2_WORDS if w not in KEYWORDS] + EXTRA_WORDS + AFFIX_WORDS + common_words()[0]
        x, self.truth = make_stream(minutes, voices, KEYWORDS, others, seed, snr_db)
        self.features = torch.from_numpy(audio.features(x))
        self.frames = frames
        self.starts = np.array([u["start"] for u in self.truth])

    def label(self, start: int) -> int | None:
        """The window's class, or None where it is ambiguous (a keyword neither whole nor clearly cut, or two)."""
        hop = audio.FRAME_SHIFT / audio.SAMPLE_RATE
        a, b = start * hop, (start + self.frames - 1) * hop + audio.FRAME_LENGTH / audio.SAMPLE_RATE
        lo, hi = np.searchsorted(self.starts, [a - 5.0, b])  # no item is longer than 5 s
        items = [u for u in self.truth[lo:hi] if u["end"] > a]
        whole, spoken = [], False
        for u in items:
            if u["kind"] == "noise":
                continue
            spoken = True
            if u["kind"] != "keyword":
                continue
            outside = max(0.0, a - u["start"]) + max(0.0, u["end"] - b)
            if outside <= WHOLE:
                whole.append(u["word"])
            elif outside < CUT * (u["end"] - u["start"]):
                return None
        if len(whole) > 1:
            return None
        return LABELS.index(whole[0]) if whole else LABELS.index(UNKNOWN if spoken else SILENCE)

    def sample(self, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts, labels = [], []
        while len(starts) < count:
            s = int(rng.integers(0, len(self.features) - self.frames))
            if (y := self.label(s)) is not None:
                starts.append(s)
                labels.append(y)
        return torch.stack([self.features[s:s + self.frames] for s in starts]), torch.tensor(labels)


def spoken_by(split: Split, root: Path, engines: list[str]) -> Split:
    """The clips of `split` said by these engines' speakers (per the data set's speakers.txt), silence kept."""
    engine = {sid: speaker.split(":")[0] for sid, speaker, _ in
              (line.split() for line in (root / "speakers.txt").read_text().splitlines())}
    keep = [i for i, n in enumerate(split.names)
            if n.startswith(SILENCE) or engine[n.split("/")[1].split("_nohash_")[0]] in engines]
    return Split(split.waves[keep], split.labels[keep], [split.names[i] for i in keep])


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
    p.add_argument("--depth", type=int, default=1, help="LMU blocks")
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--unknown-ratio", type=float, default=3.0)
    p.add_argument("--stream-minutes", type=float, default=60.0, help="synthetic training stream to draw windows from")
    p.add_argument("--stream-windows", type=int, default=3000, help="stream windows per epoch")
    p.add_argument("--stream-snr", type=float, nargs=2, default=(0.0, 30.0), help="SNR range of stream words, dB")
    p.add_argument("--feature-noise", type=float, default=0.0, help="share of training items mixed with noise "
                   "at the feature level (on top of the clips' own noise)")
    p.add_argument("--feature-noise-snr", type=float, nargs=2, default=(0.0, 20.0), help="its SNR range, dB")
    p.add_argument("--feature-noise-kinds", nargs="+", default=["pink_noise", "brown_noise", "white_noise", "babble"])
    p.add_argument("--vtlp", type=float, default=0.1, help="vocal-tract length perturbation: frequency warp "
                   "factors in [1 - VTLP, 1 + VTLP] (a female voice's formants lie ~15-20 %% above a male one's)")
    p.add_argument("--narrowband", type=float, default=0.15, help="share of training items made 8 kHz recordings "
                   "(nothing above 3.4-4 kHz, noise included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", type=Path, help="start from this checkpoint (same configuration) instead of at random")
    p.add_argument("--max-minutes", type=float, help="stop after this much training time; the best epoch is kept")
    p.add_argument("--engines", nargs="+", help="train on these synthesizers' speakers only (clips and stream): a "
                   "leave-one-synthesizer-out model; validation stays on the data set's validation voices")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng, gen = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    data = {s: load_split(a.data, s, seed=a.seed) for s in ("training", "validation", "testing")}
    if a.engines:
        data["training"] = spoken_by(data["training"], a.data, a.engines)
    x = {s: torch.from_numpy(d.features()) for s, d in data.items()}
    y = {s: torch.from_numpy(d.labels) for s, d in data.items()}
    del data  # the waves: 3 GB that training no longer needs
    frames = x["training"].shape[1]
    voices = {"training": training_speakers(engines=a.engines),
              "validation": [v for v in speakers() if split_of(v) == "validation"]}
    streams = {s: StreamWindows(m, voices[s], a.seed + i, frames, tuple(a.stream_snr)) for i, (s, m) in
               enumerate([("training", a.stream_minutes), ("validation", a.stream_minutes / 6)])}
    val_windows = streams["validation"].sample(2000, np.random.default_rng(a.seed))
    print(f"features in {time.perf_counter() - t0:.0f} s: " + ", ".join(f"{s} {len(v)}" for s, v in y.items()),
          flush=True)

    noise = FeatureNoise(a.data, a.feature_noise_kinds, tuple(a.feature_noise_snr)) if a.feature_noise else None
    model = LMUFormer(input_size=x["training"].shape[2], dim=a.dim, depth=a.depth, mlp_ratio=a.mlp_ratio,
                      num_classes=len(LABELS), theta=float(frames), seq_len=frames)
    if a.init:
        model.load_state_dict(torch.load(a.init, map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    per_epoch = len(epoch_indices(y["training"].numpy(), a.unknown_ratio, np.random.default_rng())) + a.stream_windows
    steps = a.epochs * -(-per_epoch // a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.1)
    best, history = -1.0, []
    t1 = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        idx = torch.from_numpy(epoch_indices(y["training"].numpy(), a.unknown_ratio, rng))
        wx, wy = streams["training"].sample(a.stream_windows, rng)
        ex, ey = torch.cat([x["training"][idx], wx]), torch.cat([y["training"][idx], wy])
        order = torch.randperm(len(ey), generator=gen)
        total = 0.0
        for i in range(0, len(order), a.batch):
            b = order[i:i + a.batch]
            batch = ex[b] if noise is None else noise(ex[b], a.feature_noise, gen)
            batch = spec_augment(vtlp(narrowband(batch, gen, a.narrowband), gen, a.vtlp), gen)
            logits = model.forward_frames(batch)["logits"].mean(1)
            loss = F.cross_entropy(logits, ey[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        clips, windows = accuracy(model, x["validation"], y["validation"]), accuracy(model, *val_windows)
        val = (clips + windows) / 2
        history.append({"epoch": epoch + 1, "loss": round(total / len(order), 4), "val_clip_acc": round(clips, 4),
                        "val_window_acc": round(windows, 4)})
        print(f"epoch {epoch + 1}: loss {total / len(order):.4f} val clips {clips:.4f} windows {windows:.4f} "
              f"({time.perf_counter() - t1:.0f} s)", flush=True)
        if val >= best:
            best = val
            save(model, a, history, best, frames, {s: len(v) for s, v in y.items()}, time.perf_counter() - t1)
        if a.max_minutes and time.perf_counter() - t1 > 60 * a.max_minutes:
            print(f"stopping: the {a.max_minutes:g}-minute budget is spent", flush=True)
            break
    model.load_state_dict(torch.load(a.out, weights_only=True))
    test = accuracy(model, x["testing"], y["testing"])
    print(f"best val (clips + windows) / 2 {best:.4f}, test clips (unseen voices) {test:.4f}", flush=True)
    record = json.loads(a.out.with_suffix(".json").read_text())
    record["accuracy"]["testing_pytorch"] = round(test, 4)
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def save(model: LMUFormer, a: argparse.Namespace, history: list[dict], best: float, frames: int,
         counts: dict[str, int], seconds: float) -> None:
    """The checkpoint and its training record, at every new best epoch (so a stopped run keeps its best)."""
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), a.out)
    record = {"command": "python " + shlex.join(sys.argv), "seed": a.seed, "labels": LABELS,
              "clip_frames": frames, "pad_to": None, "config": model.config(),
              "parameters": sum(p.numel() for p in model.parameters()), "init": a.init and str(a.init),
              "data": {"root": str(a.data), **counts}, "speakers": {
                  "training": sorted(set(training_speakers(engines=a.engines))),
                  "heldout": sorted(v for v in speakers() if split_of(v) == "heldout")},
              "stream_minutes": a.stream_minutes, "stream_windows_per_epoch": a.stream_windows,
              "stream_snr_db": list(a.stream_snr), "augmentation": "clips: make_dataset.py; features: "
              + (f"noise ({', '.join(a.feature_noise_kinds)}) on {a.feature_noise:.0%} at {a.feature_noise_snr[0]:g}-"
                 f"{a.feature_noise_snr[1]:g} dB, " if a.feature_noise else "")
              + f"8 kHz band on {a.narrowband:.0%}, VTLP +-{a.vtlp:.0%}, SpecAugment",
              "accuracy": {"validation_clips_and_windows": round(best, 4)},
              "train_seconds": round(seconds, 1), "threads": a.threads, "history": history}
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")

if __name__ == "__main__":
    main()
