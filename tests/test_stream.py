"""The keyword-spotting demo: synthetic data set layout, staggered windows == offline clips, `edgekit stream`."""
import json
import re
import sys
import types
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner

from edgekit import audio
from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.apps import kws
from edgekit.apps.kws import (DEMO_CHECKPOINT, SCV2_LABELS, SUPPRESS_FRAMES, ClipSpec, Detector, StaggeredClassifier,
                              Window, detect, host_bundle)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "kws"))
from make_dataset import (MBROLA_CANDIDATES, in_voice_phones, make_dataset, reverberate, say,  # noqa: E402
                          speaker_id, speakers, split_of, synthesize, telephone, training_speakers)
from speech_commands import LABELS, load_split  # noqa: E402

TEST_VOICE = "en-us+f3"  # f3 is a test-split speaker: never heard in training


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private edgekit cache holding the demo model compiled on first use (once for this module)."""
    path = tmp_path_factory.mktemp("edgekit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEKIT_CACHE", str(path))
        host_bundle(DEMO_CHECKPOINT)
    return path


def test_dataset_layout(tmp_path):
    counts = make_dataset(tmp_path, ["yes", "no"], {"training": 2, "validation": 1, "testing": 1}, workers=1,
                          noise_seconds=3.0)
    assert counts == {"training": 4, "validation": 2, "testing": 2}
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["_background_noise_", "no", "yes"]
    test = (tmp_path / "testing_list.txt").read_text().split()
    val = (tmp_path / "validation_list.txt").read_text().split()
    every = [f"{p.parent.name}/{p.name}" for p in tmp_path.glob("[a-z]*/*.wav")]
    train = [n for n in every if n not in test + val]
    speakers = lambda names: {n.split("/")[1].split("_nohash_")[0] for n in names}  # noqa: E731
    assert len(train) == 4 and not speakers(train) & speakers(test) and not speakers(train) & speakers(val)
    with wave.open(str(tmp_path / test[0])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (16000, 1, 2, 16000)
    labels = ["_silence_", "_unknown_", "yes", "no"]
    split = load_split(tmp_path, "training", labels=labels)
    assert split.waves.shape == (6, 16000) and sorted(labels[i] for i in split.labels) == ["_silence_"] * 2 + [
        "no"] * 2 + ["yes"] * 2
    assert split_of(TEST_VOICE.split("+")[1]) == "testing"
    assert np.array_equal(synthesize("go", TEST_VOICE, 150, 40), synthesize("go", TEST_VOICE, 150, 40))  # seeded
    noise, before = (tmp_path / "_background_noise_" / "hum.wav").read_bytes(), sorted(every)
    added = make_dataset(tmp_path, ["yes"], {"training": 2, "validation": 1, "testing": 1}, engines=["flite"])
    assert added == {"training": 2, "validation": 0, "testing": 0}  # only flite's training voices speak
    assert (tmp_path / "_background_noise_" / "hum.wav").read_bytes() == noise
    assert (tmp_path / "testing_list.txt").read_text().split() == test
    new = {f"{p.parent.name}/{p.name}" for p in tmp_path.glob("[a-z]*/*.wav")} - set(before)
    assert len(new) == 2 and speakers(new) <= {speaker_id(v) for v in ("flite:awb", "flite:rms")}


def test_speakers_held_out_in_every_engine():
    """kal, slt and ked never reach training or validation, whichever synthesizer speaks them; flite's awb and
    rms are trained on; flite speaks deterministically at 16 kHz."""
    held = {v for v in speakers() if split_of(v) == "heldout"}
    assert held == {"flite:kal", "flite:kal16", "flite:slt", "festival:kal_diphone", "festival:ked_diphone",
                    "festival:slt_hts"}
    train = set(training_speakers())
    assert {"flite:awb", "flite:rms"} <= train and not train & held
    assert {split_of(v) for v in speakers() if v.startswith("espeak-ng:")} == {"training", "validation", "testing"}
    assert split_of("piper:joe") == split_of("kokoro:jf_alpha+jm_kumo") == "training"  # new speakers, whether installed
    assert split_of("mbrola:us2") == split_of("mbrola:de4") == "training" and split_of("mbrola:es2") == "validation"
    assert split_of("festival:rab_diphone") == split_of("festival:us1_mbrola") == "training"  # other speakers
    a, b = (say("flite:awb", "go", np.random.default_rng(3)) for _ in range(2))
    assert np.array_equal(a, b) and 0.1 < len(a) / audio.SAMPLE_RATE < 1.0


def test_mbrola_voice_speaks_english_with_its_own_phonemes():
    """A Spanish voice (no /j/, no diphthongs as one phoneme, no schwa) says "yes" and "go" with its nearest
    sounds; pitch points stay on the first part of a split diphthong; comments and unknown sounds drop."""
    pho = "; espeak-ng\nj\t65\nE\t50\t 0 232 80 215\ns\t100\ng\t65\n@U\t177\t 0 198 100 139\nQ 10\n_\t301\n"
    spanish = frozenset("p b t d k g f T s x tS m n l r w i e a o u".split())
    assert in_voice_phones(pho, spanish) == "i 65\ne 50 0 232 80 215\ns 100\ng 65\no 88 0 198 100 139\nu 88\n_ 301\n"
    english = frozenset("j E s g @U".split())
    assert in_voice_phones(pho, english) == "j 65\nE 50 0 232 80 215\ns 100\ng 65\n@U 177 0 198 100 139\n_ 301\n"
    us = "p b t d k g f v T D s z S Z h tS dZ m n N l r w j i I E { A O U u V @ r= @U EI AI OI aU".split()
    assert set(us) <= MBROLA_CANDIDATES  # every sound espeak-ng's US English writes is probed in each voice
    assert in_voice_phones("".join(f"{p} 50\n" for p in us), MBROLA_CANDIDATES) == "".join(f"{p} 50\n" for p in us)


def test_vtlp_moves_formants_by_the_warp_factor():
    """A formant at 1 kHz lands within the warp's range of frequencies, spread over it; no warp changes nothing."""
    from train import bin_centres, vtlp
    hz = bin_centres(128)[1].numpy()
    x = torch.full((256, 3, 128), -1.0)
    x[:, :, int(np.abs(hz - 1000).argmin())] = 1.0
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(vtlp(x, gen, 0.0), x)
    moved = hz[vtlp(x, gen, 0.2)[:, 0].argmax(1).numpy()] / hz[int(np.abs(hz - 1000).argmin())]
    assert moved.min() > 0.78 and moved.max() < 1.22 and moved.min() < 0.85 and moved.max() > 1.15


def test_narrowband_mutes_what_an_8khz_recording_lacks():
    """A share of the items keeps nothing above a 3.4-4 kHz cutoff: the level of a band with no energy at all."""
    from train import SILENCE_LEVEL, bin_centres, narrowband
    assert np.isclose(SILENCE_LEVEL, audio.features(np.zeros(audio.SAMPLE_RATE, np.float32)).min())
    x, gen = torch.zeros(2000, 3, 128), torch.Generator().manual_seed(0)
    assert torch.equal(narrowband(x, gen, 0.0), x)
    muted, hz = narrowband(x, gen, 0.25)[:, 0] == SILENCE_LEVEL, bin_centres(128)[1].numpy()
    assert 0.2 < muted.any(1).float().mean() < 0.3
    assert not muted[:, hz <= 3400].any() and muted[muted.any(1)][:, hz > 4000].all()


def test_augmentation_room_and_telephone():
    x = spoken_yes(at=0.1, seconds=1.0)
    wet = reverberate(x, np.random.default_rng(0))
    assert wet.shape == x.shape and np.isclose(np.abs(wet).max(), np.abs(x).max()) and not np.allclose(wet, x)
    band = np.abs(np.fft.rfft(telephone(x)))
    f = np.fft.rfftfreq(len(x), 1 / audio.SAMPLE_RATE)
    assert band[(f > 3500) | (f < 250)].max() < 1e-6 * band.max()


def test_windows_are_offline_clip_classifications(cache, monkeypatch):
    """Each staggered window's probabilities are the PyTorch model's on that second of features alone."""
    from edgekit.models import build

    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    spec = ClipSpec.for_model(len(LABELS), DEMO_CHECKPOINT)
    clf = StaggeredClassifier(host_bundle(DEMO_CHECKPOINT), spec, hop=14)
    feats = audio.features(np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1)
    windows = [w for t in range(0, len(feats) - 13, 14) for w in clf.push(feats[t:t + 14])]
    assert [w.start for w in windows] == list(range(0, len(feats) - 97, 14))
    model = build("lmuformer", checkpoint=DEMO_CHECKPOINT)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(np.stack([feats[w.start:w.start + 98] for w in windows])))
                            ["mean_logits"][:, -1], -1).numpy()
    assert np.abs(np.stack([w.probs for w in windows]) - ref).max() < 1e-4


def spoken_yes(at: float = 0.5, seconds: float = 2.2) -> np.ndarray:
    speech = synthesize("yes", TEST_VOICE, 160, 50)
    x = np.zeros(int(seconds * audio.SAMPLE_RATE), np.float32)
    x[int(at * audio.SAMPLE_RATE):int(at * audio.SAMPLE_RATE) + len(speech)] = 0.5 * speech / np.abs(speech).max()
    return x + 0.003 * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)


def test_stream_cli_detects_keyword_with_cached_demo(cache, tmp_path, monkeypatch):
    audio.write_wav(tmp_path / "yes.wav", spoken_yes())
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    monkeypatch.setattr(sys.modules["edgekit.compile"], "compile",
                        lambda *a, **k: pytest.fail("the cached bundle was not used"))
    result = CliRunner().invoke(main, ["stream", "--wav", str(tmp_path / "yes.wav")])
    assert result.exit_code == 0, result.output
    assert "start s" in result.output and "confidence" in result.output  # the header
    detections = re.findall(r"^\s*([\d.]+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)$", result.output, re.M)
    assert [d[2] for d in detections] == ["yes"], result.output
    start, end = float(detections[0][0]), float(detections[0][1])
    word = (0.5, 0.5 + len(synthesize("yes", TEST_VOICE, 160, 50)) / audio.SAMPLE_RATE)
    assert word[0] - 0.15 <= start < end <= word[1] + 0.15, (start, end, word)  # the word's span, within a hop
    assert "real-time factor" in result.output


@pytest.mark.parametrize("rate,channels,subtype", [(22050, 1, "PCM_16"), (22050, 2, "PCM_24"), (44100, 1, "FLOAT"),
                                                   (48000, 2, "PCM_U8"), (8000, 1, "PCM_16")])
def test_stream_json_lines_from_any_wav(cache, tmp_path, monkeypatch, rate, channels, subtype):
    """22,050 Hz (what espeak-ng writes), 24-bit, float, stereo, 8-bit, 8 kHz telephone band: converted on the fly;
    --json prints only JSON Lines on stdout: detections, then one summary."""
    import soxr

    x = soxr.resample(spoken_yes(), audio.SAMPLE_RATE, rate)
    soundfile.write(tmp_path / "yes.wav", np.stack([x] * channels, 1), rate, subtype=subtype)
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    r = CliRunner().invoke(main, ["stream", "--wav", str(tmp_path / "yes.wav"), "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["label"] for d in lines[:-1]] == ["yes"], r.stdout
    assert set(lines[0]) == {"label", "start", "end", "confidence"} and lines[0]["start"] < lines[0]["end"]
    summary = lines[-1]["summary"]
    assert summary["detections"] == 1 and abs(summary["audio_seconds"] - 2.2) < 0.01 and summary["real_time_factor"] > 0
    assert summary["rss_mib"] and not summary["interrupted"]
    assert f"{rate} Hz" in r.stderr  # the header says what was read and how it was converted


def test_ctrl_c_still_prints_the_summary(cache, tmp_path, monkeypatch):
    def interrupted(path, repeat):
        def blocks():
            x = spoken_yes(seconds=1.5)
            yield from np.split(x[:16000], 10)
            raise KeyboardInterrupt
        return "a stream", blocks()

    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    monkeypatch.setattr(kws, "open_wav", interrupted)
    r = CliRunner().invoke(main, ["stream", "--wav", "x.wav", "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["label"] for d in lines[:-1]] == ["yes"]  # the word heard before Ctrl-C is still detected
    assert lines[-1]["summary"]["interrupted"] and lines[-1]["summary"]["audio_seconds"] == 1.0


def fake_sounddevice(devices: list[str]) -> types.ModuleType:
    sd = types.ModuleType("sounddevice")
    sd.PortAudioError = type("PortAudioError", (Exception,), {})

    def query_devices(device, kind):
        if not devices or (device is not None and device not in devices and device != 0):
            raise (sd.PortAudioError("Error querying device -1") if device is None else
                   ValueError(f"No input device matching {device!r}"))
        return {"name": devices[0], "default_samplerate": 44100.0}

    sd.query_devices, sd.InputStream = query_devices, lambda **kw: pytest.fail("a stream was opened")
    return sd


@pytest.mark.parametrize("module,args,message", [
    (None, [], "needs the sounddevice package"),
    ("portaudio", [], "needs the PortAudio library"),
    (fake_sounddevice([]), [], "no usable input device"),
    (fake_sounddevice(["USB mic"]), ["--device", "headset"], "no usable input device 'headset'"),
])
def test_mic_failures_are_one_line_errors(tmp_path, monkeypatch, module, args, message):
    if module == "portaudio":  # the real sounddevice raises OSError at import where PortAudio is missing
        (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "sounddevice", module)
    monkeypatch.setattr(kws, "open_model", lambda *a: pytest.fail("the model was loaded before the microphone"))
    r = CliRunner().invoke(main, ["stream", "--mic", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_device_needs_mic(tmp_path):
    r = CliRunner().invoke(main, ["stream", "--wav", str(tmp_path / "a.wav"), "--device", "1"])
    assert r.exit_code == 2 and "--device picks a microphone" in r.output


def test_clip_spec_and_detector():
    scv2 = ClipSpec.for_model(35, None)
    assert scv2.labels == SCV2_LABELS and (scv2.clip_frames, scv2.pad_to) == (98, 128)
    with pytest.raises(EdgekitError, match="--labels"):
        ClipSpec.for_model(5, None)
    spec = ClipSpec(["_silence_", "_unknown_", "yes", "no"])
    p = lambda i, v: np.eye(4)[i] * v + (1 - v) / 4  # noqa: E731

    def detections(seq: list[tuple[int, float]], radius: int, smooth: int = 1) -> list[tuple[str, int, int]]:
        detector = Detector(spec, threshold=0.5, hop=SUPPRESS_FRAMES // radius, smooth=smooth)
        assert detector.radius == radius
        out = [d for s, (i, v) in enumerate(seq) for d in detector.push(Window(14 * s, p(i, v)))] + detector.close()
        return [(d.label, round(d.start / 0.14), round((d.end - 0.98) / 0.14)) for d in out]  # first, last window

    # unsmoothed: one detection at the most confident window; silence and unknown never detect; the last one is
    # flushed; a detection spans the overlap of the run of windows that chose its keyword
    assert detections([(2, 0.6), (2, 0.9), (3, 0.7), (1, 0.9), (0, 1.0), (3, 0.8)], radius=2) == [
        ("yes", 1, 0), ("no", 5, 5)]
    # the same keyword twice in a row is two detections, even where the windows between them detect it too
    assert [d[0] for d in detections([(2, 0.7), (2, 0.8), (2, 0.6), (2, 0.9), (2, 0.95)], radius=2)] == ["yes"] * 2
    # smoothed over 3 windows: a keyword heard by a single window (a prefix cut from a longer word) is dropped,
    # a keyword heard by several overlapping windows is kept
    blip = [(0, 1.0)] * 3 + [(2, 0.9), (1, 0.9), (1, 0.9)] + [(0, 1.0)] * 6
    word = [(0, 1.0)] * 3 + [(2, 0.6), (2, 0.9), (2, 0.8), (2, 0.7)] + [(0, 1.0)] * 6
    assert detections(blip, radius=2) == [("yes", 3, 3)] and detections(blip, radius=2, smooth=3) == []
    assert detections(word, radius=2, smooth=3) == [("yes", 6, 3)]


def test_detections_do_not_depend_on_window_phase(cache, monkeypatch):
    """The same speech with the window grid shifted by a fraction of a hop gives the same detections."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    bundle, spec = host_bundle(DEMO_CHECKPOINT), ClipSpec.for_model(len(LABELS), DEMO_CHECKPOINT)
    x = np.concatenate([spoken_yes(at=0.3, seconds=1.4), spoken_yes(at=0.1, seconds=1.6)])
    runs = []
    for shift in (0, 3, 7, 11):
        found = []
        detect(bundle, spec, [np.concatenate([np.zeros(shift * 160, np.float32), x])], on_detection=found.append)
        runs.append([(d.label, d.start - shift / 100, d.end - shift / 100) for d in found])
    assert [label for label, _, _ in runs[0]] == ["yes", "yes"]
    for run in runs[1:]:
        assert [d[0] for d in run] == ["yes", "yes"]
        assert all(abs(a[1] - b[1]) <= 0.14 and abs(a[2] - b[2]) <= 0.14 for a, b in zip(run, runs[0])), runs


def test_an_empty_wav_is_one_clear_error(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    import wave

    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    r = CliRunner().invoke(main, ["stream", "--wav", str(tmp_path / "empty.wav")])
    assert r.exit_code == 2 and "no audio samples" in r.output, r.output
