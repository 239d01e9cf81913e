"""The keyword-spotting demo: synthetic data set layout, staggered windows == offline clips, `edgekit stream`."""
import re
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekit import audio
from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.apps.kws import (DEMO_CHECKPOINT, SCV2_LABELS, SUPPRESS_FRAMES, ClipSpec, Merger, StaggeredClassifier,
                            Window, host_bundle)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "kws"))
from make_dataset import make_dataset, split_of, synthesize  # noqa: E402
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


def test_stream_cli_detects_keyword_with_cached_demo(cache, tmp_path, monkeypatch):
    speech = synthesize("yes", TEST_VOICE, 160, 50)
    x = np.zeros(int(2.2 * audio.SAMPLE_RATE), np.float32)
    x[8000:8000 + len(speech)] = 0.5 * speech / np.abs(speech).max()
    x += 0.003 * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
    audio.write_wav(tmp_path / "yes.wav", x)
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    monkeypatch.setattr(sys.modules["edgekit.compile"], "compile", lambda *a, **k: pytest.fail("the cached bundle was not used"))
    result = CliRunner().invoke(main, ["stream", "--wav", str(tmp_path / "yes.wav")])
    assert result.exit_code == 0, result.output
    detections = re.findall(r"^\s*([\d.]+) s\s+(\S+)\s+([\d.]+)$", result.output, re.M)
    assert [d[1] for d in detections] == ["yes"], result.output
    assert 0.3 <= float(detections[0][0]) <= 1.5 and "real-time factor" in result.output


def test_clip_spec_and_merger():
    scv2 = ClipSpec.for_model(35, None)
    assert scv2.labels == SCV2_LABELS and (scv2.clip_frames, scv2.pad_to) == (98, 128)
    with pytest.raises(EdgekitError, match="--labels"):
        ClipSpec.for_model(5, None)
    spec = ClipSpec(["_silence_", "_unknown_", "yes", "no"])
    p = lambda i, v: np.eye(4)[i] * v + (1 - v) / 4  # noqa: E731

    def detections(seq: list[tuple[int, float]], radius: int) -> list[tuple[str, int]]:
        merge = Merger(spec, threshold=0.5, hop=SUPPRESS_FRAMES // radius)
        assert merge.radius == radius
        out = [d for s, (i, v) in enumerate(seq) for d in merge.push(Window(14 * s, p(i, v)))] + merge.close()
        return [(d.label, round(d.time / 0.14 - 3.5)) for d in out]  # window index of each detection

    # one detection at the most confident window; silence and unknown never detect; the last one is flushed
    assert detections([(2, 0.6), (2, 0.9), (3, 0.7), (1, 0.9), (0, 1.0), (3, 0.8)], radius=2) == [("yes", 1), ("no", 5)]
    # the same keyword twice in a row is two detections, even where the windows between them detect it too
    assert detections([(2, 0.7), (2, 0.8), (2, 0.6), (2, 0.9), (2, 0.95)], radius=2) == [("yes", 1), ("yes", 4)]


def test_an_empty_wav_is_one_clear_error(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache))
    import wave

    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    r = CliRunner().invoke(main, ["stream", "--wav", str(tmp_path / "empty.wav")])
    assert r.exit_code == 2 and "no audio samples" in r.output, r.output
