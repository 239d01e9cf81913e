"""The published LMUFormer / AST speech front end (Kaldi log-mel filterbank), in numpy, offline and streaming.

Features are Kaldi's log-mel filterbank as `torchaudio.compliance.kaldi.fbank(wave, htk_compat=True,
use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)` computes it on a
16 kHz waveform scaled to [-1, 1] (25 ms frames every 10 ms, edges snipped, per-frame DC removal, pre-emphasis
0.97, symmetric Hann window, FFT 512, power spectrum, 128 triangular bins evenly spaced on the mel scale
1127 ln(1 + f/700) from 20 Hz to Nyquist, log floored at float32 epsilon), then normalised as
(fbank + 6.845978) / (2 * 5.5654526).

Every frame depends on its own 400 samples only, so the streaming front end reproduces the offline features
exactly. The public pipeline also removes the waveform mean of each clip; Kaldi's per-frame DC removal makes
that a no-op (a constant offset cancels inside every frame), which is why streaming needs no running mean.
All arithmetic is float64 (torchaudio uses float32; the difference is float32 rounding of the log energies).
"""
from __future__ import annotations

import wave
from functools import cache
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile
import soxr

from edgekit.errors import EdgekitError

SAMPLE_RATE = 16_000
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # the frame length rounded up to a power of two
NUM_MEL_BINS = 128
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
NORM_MEAN, NORM_STD = -6.845978, 5.5654526  # published normalisation of the LMUFormer / AST pipeline
EPSILON = float(np.finfo(np.float32).eps)  # Kaldi's floor before the log
BLOCK = 4096  # frames per vectorised step offline: bounds the float64 temporaries on long recordings


def mel(freq: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """The inverse of `mel`."""
    return 700.0 * np.expm1(np.asarray(m, dtype=np.float64) / 1127.0)


@cache
def mel_edges(num_bins: int = NUM_MEL_BINS, sample_rate: int = SAMPLE_RATE, low_freq: float = LOW_FREQ) -> np.ndarray:
    """The filters' corners in mel, evenly spaced up to Nyquist: filter i rises from [i], peaks at [i + 1] (its
    centre) and falls to [i + 2]."""
    lo, hi = mel(low_freq), mel(sample_rate / 2)
    return lo + np.arange(num_bins + 2) * (hi - lo) / (num_bins + 1)


@cache
def mel_banks(num_bins: int = NUM_MEL_BINS, fft_size: int = FFT_SIZE, sample_rate: int = SAMPLE_RATE,
              low_freq: float = LOW_FREQ) -> np.ndarray:
    """Triangular filters [fft_size // 2 + 1, num_bins], linear in mel, up to Nyquist; the Nyquist bin gets
    weight 0 as in Kaldi (its filters span FFT bins 0 .. fft_size/2 - 1 only)."""
    edges = mel_edges(num_bins, sample_rate, low_freq)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    m = mel(np.arange(fft_size // 2) * sample_rate / fft_size)[None, :]
    tri = np.maximum(0.0, np.minimum((m - left) / (centre - left), (right - m) / (right - centre)))
    return np.concatenate([tri, np.zeros((num_bins, 1))], axis=1).T.copy()


@cache
def hann(length: int = FRAME_LENGTH) -> np.ndarray:
    """The symmetric Hann window (torch.hann_window(periodic=False)), as Kaldi's 'hanning'."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))


def log_mel(frames: np.ndarray) -> np.ndarray:
    """Kaldi log-mel energies [m, 128] (not normalised) of frames [m, 400] of samples."""
    x = np.asarray(frames, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x = x - PREEMPHASIS * np.concatenate([x[:, :1], x[:, :-1]], axis=1)  # the first sample is its own predecessor
    spectrum = np.fft.rfft(x * hann(x.shape[1]), n=FFT_SIZE)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return np.log(np.maximum(power @ mel_banks(), EPSILON)).astype(np.float32)


def normalise(fbank: np.ndarray) -> np.ndarray:
    """The published normalisation of log-mel energies (numpy or torch, float32 stays float32)."""
    return (fbank - NORM_MEAN) / (2 * NORM_STD)


def denormalise(features: np.ndarray) -> np.ndarray:
    """The log-mel energies that `normalise` made these features of."""
    return features * (2 * NORM_STD) + NORM_MEAN


def frame_count(samples: int) -> int:
    """Frames Kaldi emits for a waveform of this length (snip_edges=True): only frames that fit whole."""
    return 0 if samples < FRAME_LENGTH else 1 + (samples - FRAME_LENGTH) // FRAME_SHIFT


def _frames(wave_: np.ndarray) -> np.ndarray:
    n = frame_count(len(wave_))
    if n == 0:
        return np.zeros((0, FRAME_LENGTH), wave_.dtype)
    return np.lib.stride_tricks.sliding_window_view(wave_[:(n - 1) * FRAME_SHIFT + FRAME_LENGTH],
                                                    FRAME_LENGTH)[::FRAME_SHIFT]


def fbank(waveform: np.ndarray, remove_mean: bool = True) -> np.ndarray:
    """Offline log-mel filterbank [frames, 128] of a 16 kHz waveform in [-1, 1], not normalised; the waveform
    mean is removed first, as the public pipeline does (it changes nothing but rounding, see the module doc)."""
    x = np.asarray(waveform, dtype=np.float64)
    if remove_mean and len(x):
        x = x - x.mean()
    frames = _frames(x)
    return np.concatenate([log_mel(frames[i:i + BLOCK]) for i in range(0, max(1, len(frames)), BLOCK)])


def features(waveform: np.ndarray, pad_to: int | None = None) -> np.ndarray:
    """Normalised model input [frames, 128] of one clip. `pad_to` zero-pads (or cuts) the filterbank to that
    many frames BEFORE normalising, as the public SCv2 pipeline does with 128 frames (padding becomes ~0.615)."""
    fb = fbank(waveform)
    if pad_to is not None:
        fb = np.concatenate([fb[:pad_to], np.zeros((max(0, pad_to - len(fb)), fb.shape[1]), fb.dtype)])
    return normalise(fb)


class FrontEnd:
    """Streaming features: `push(samples)` returns the normalised frames completed by those samples.

    It keeps the samples of the frame in progress (at most 399), so memory is constant on an endless stream,
    and frame t equals `features(whole_stream)[t]` as soon as its last sample has arrived.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending = np.zeros(0, np.float64)
        self.frames_out = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.pending, np.asarray(samples, dtype=np.float64).ravel()])
        n = frame_count(len(buf))
        out = normalise(log_mel(_frames(buf))) if n else np.zeros((0, NUM_MEL_BINS), np.float32)
        self.pending = buf[n * FRAME_SHIFT:]
        self.frames_out += n
        return out


def read_wav(path: Path) -> np.ndarray:
    """A sound file as float32 16 kHz mono in [-1, 1] (channels averaged, resampled): the scale torchaudio.load
    gives."""
    with WavReader(path) as r:
        return np.concatenate([np.zeros(0, np.float32), *r.blocks()])


class WavReader:
    """Reads any sound file libsndfile reads (WAV of 8/16/24/32-bit PCM or float at any rate and channel count,
    FLAC, OGG, AIFF, ...) in blocks of about `block` output samples, as float32 16 kHz mono in [-1, 1]: channels
    averaged, other rates resampled by soxr (streaming, so memory is constant on hour-long files)."""

    def __init__(self, path: Path, block: int = SAMPLE_RATE // 10):
        self.path = Path(path)
        try:
            self.file = soundfile.SoundFile(str(self.path))
        except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
            raise EdgekitError(f"cannot read {path} as a sound file: {e}",
                               "pass a WAV (any rate, channels, 8/16/24/32-bit or float), FLAC or OGG file") from None
        self.rate, self.channels, self.frames = self.file.samplerate, self.file.channels, self.file.frames
        if not (1000 <= self.rate <= 768_000) or not 1 <= self.channels <= 64:
            self.file.close()
            raise EdgekitError(f"{path} claims {self.rate} Hz and {self.channels} channels: a damaged header",
                               "re-export the audio, e.g. `sox in.wav out.wav`")
        self.block = max(1, block * self.rate // SAMPLE_RATE)

    def describe(self) -> str:
        """What the file holds and what is done to it, for the user."""
        done = [f"resampled to {SAMPLE_RATE} Hz"] * (self.rate != SAMPLE_RATE) + ["mixed to mono"] * (self.channels > 1)
        return (f"{self.rate} Hz, {self.channels} channel{'s' * (self.channels > 1)}, {self.file.subtype_info}, "
                f"{self.frames / self.rate:.1f} s" + (f" ({', '.join(done)})" if done else ""))

    def __enter__(self) -> "WavReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def blocks(self) -> Iterator[np.ndarray]:
        """float32 16 kHz mono blocks until the end of the file (a truncated file ends at its last whole frame)."""
        resample = Resampler(self.rate)
        try:
            for x in self.file.blocks(self.block, dtype="float32", always_2d=True):
                yield resample(x.mean(axis=1))
        except (RuntimeError, ValueError) as e:  # libsndfile errors mid-file are RuntimeErrors
            raise EdgekitError(f"{self.path} is damaged after {self.file.tell() / self.rate:.1f} s: {e}",
                               "re-export the audio, e.g. `sox in.wav out.wav`") from None
        yield resample(np.zeros(0, np.float32), last=True)


class Resampler:
    """Streaming conversion of float32 mono blocks at `rate` to 16 kHz with soxr (high quality); identity at
    16 kHz. Blocks in, blocks out, the filter's state carried between them."""

    def __init__(self, rate: int):
        self.stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32") if rate != SAMPLE_RATE else None

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.stream.resample_chunk(x, last=last) if self.stream else x


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """float samples in [-1, 1] as a 16-bit mono PCM WAV (clipped)."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
