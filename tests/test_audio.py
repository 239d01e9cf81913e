"""The audio front end: Kaldi's fbank as the published LMUFormer pipeline computes it, streaming == offline."""
import math

import numpy as np
import pytest
import soundfile
import torch

from edgekit import audio
from edgekit.errors import EdgekitError


def speechlike(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """Harmonics with a wandering pitch, an envelope and noise: energy in every mel band, some quiet frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    f0 = 120 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / audio.SAMPLE_RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)) ** 2
    return (0.2 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def kaldi_fbank_reference(wave: np.ndarray, frames: int) -> np.ndarray:
    """Kaldi's compute-fbank-feats written out plainly, frame by frame and filter by filter, in torch float32
    as torchaudio computes it: the independent check of the vectorised front end."""
    x = torch.from_numpy(wave.astype(np.float32))
    x = x - x.mean()
    window = torch.hann_window(400, periodic=False)
    eps = torch.finfo(torch.float32).eps
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 129
    out = torch.zeros(frames, 128)
    for i in range(frames):
        frame = x[160 * i:160 * i + 400].clone()
        frame -= frame.mean()
        prev = torch.cat([frame[:1], frame[:-1]])
        frame = (frame - 0.97 * prev) * window
        power = torch.fft.rfft(torch.cat([frame, torch.zeros(112)])).abs() ** 2
        for m in range(128):
            left, centre, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
            energy = 0.0
            for k in range(256):  # the Nyquist bin (256) carries no weight in Kaldi
                f = mel(k * 16000 / 512)
                if left < f < right:
                    w = (f - left) / (centre - left) if f <= centre else (right - f) / (right - centre)
                    energy += w * float(power[k])
            out[i, m] = math.log(max(energy, eps))
    return out.numpy()


def test_matches_plain_kaldi_formulas():
    wave = speechlike(0.2)
    ours = audio.fbank(wave)[:5]
    ref = kaldi_fbank_reference(wave, 5)
    assert np.abs(ours - ref).max() < 2e-4  # float32 rounding of the reference


def test_known_values_and_shapes():
    assert math.isclose(float(audio.mel(700.0)), 1127.0 * math.log(2.0))
    assert np.allclose(audio.mel_to_hz(audio.mel([20.0, 1000.0, 8000.0])), [20.0, 1000.0, 8000.0])
    banks = audio.mel_banks()
    assert banks.shape == (257, 128) and not banks[256].any() and banks.min() == 0.0
    assert audio.frame_count(16000) == 98 and audio.frame_count(399) == 0
    # digital silence floors at log(float32 eps); the normalisation is the published one
    silence = audio.features(np.zeros(16000, np.float32))
    assert np.allclose(silence, (math.log(np.finfo(np.float32).eps) + 6.845978) / (2 * 5.5654526))
    padded = audio.features(np.zeros(16000, np.float32), pad_to=128)
    assert padded.shape == (128, 128) and np.allclose(padded[98:], 6.845978 / (2 * 5.5654526))


def test_streaming_equals_offline():
    wave = speechlike(3.0, seed=1)
    offline = audio.features(wave)
    front, rng, pieces, i = audio.FrontEnd(), np.random.default_rng(0), [], 0
    while i < len(wave):
        n = int(rng.integers(1, 900))  # blocks shorter and longer than a frame
        pieces.append(front.push(wave[i:i + n]))
        i += n
    streamed = np.concatenate(pieces)
    assert streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() <= 1e-5
    assert len(front.pending) < audio.FRAME_LENGTH  # constant memory


def test_clip_mean_removal_is_a_no_op():
    """The public pipeline removes each clip's mean; per-frame DC removal makes that irrelevant, which is why
    streaming needs no running mean. A DC offset of 0.1 changes the features by float rounding only."""
    wave = speechlike(1.0, seed=2)
    offset = audio.FrontEnd().push(wave + np.float32(0.1))
    assert np.abs(offset - audio.features(wave)).max() < 1e-4


def test_wav_round_trip(tmp_path):
    wave = speechlike(0.5)
    audio.write_wav(tmp_path / "a.wav", wave)
    back = audio.read_wav(tmp_path / "a.wav")
    assert back.dtype == np.float32 and np.abs(back - wave).max() <= 1 / 32768


@pytest.mark.parametrize("rate,channels,subtype", [(22050, 1, "PCM_16"), (22050, 2, "PCM_24"), (44100, 2, "FLOAT"),
                                                   (8000, 1, "PCM_U8"), (48000, 1, "PCM_32"), (16000, 2, "DOUBLE")])
def test_any_wav_is_read_as_16k_mono(tmp_path, rate, channels, subtype):
    """A 440 Hz tone in any rate, channel count and sample format comes back as the same tone at 16 kHz mono,
    at every block size (the resampler streams: blocks in, blocks out)."""
    t = np.arange(int(1.5 * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    soundfile.write(tmp_path / "a.wav", np.stack([tone] + [0.5 * tone] * (channels - 1), 1), rate, subtype=subtype)
    with audio.WavReader(tmp_path / "a.wav", block=777) as r:
        assert (r.rate, r.channels) == (rate, channels)
        x = np.concatenate(list(r.blocks()))
    want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(24000) / 16000) * (1 + 0.5 * (channels - 1)) / channels
    assert x.dtype == np.float32 and abs(len(x) - 24000) <= 1
    inner = slice(800, 23000)  # away from the resampler's edges
    assert np.abs(x[inner] - want[inner]).max() < (0.02 if subtype == "PCM_U8" else 2e-3)
    assert np.array_equal(audio.read_wav(tmp_path / "a.wav"), x)


def test_unreadable_sound_file_is_one_clear_error(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(EdgekitError, match="cannot read .* as a sound file"):
        audio.WavReader(tmp_path / "a.wav")
