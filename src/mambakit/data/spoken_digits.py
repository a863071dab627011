"""An SC09-like spoken-digits set ("zero" .. "nine", 16 kHz, 1 s clips) synthesised with espeak-ng, cached on disk.

SC09 (the digits of Google's Speech Commands) is not installable offline; eSpeak NG is (Debian `espeak-ng`,
Homebrew `espeak-ng`). Its voices give the variety a generative model of speech must cover: English accents
(`ACCENTS`), voice variants (`VARIANTS`: male, female, whispery, croaky, ...), speaking rates and pitches.
A *speaker* is an (accent, variant) pair; the split is by speaker (80 / 10 / 10, fixed by a hash of the names), so
no voice of the validation or test set is heard in training (as SC09 splits by speaker).

Layout of a set (`build_spoken_digits`, `mambakit data spoken-digits`):

    ROOT/manifest.json                 {"sample_rate": 16000, "clip_samples": 16000, "source": ...,
                                        "clips": [{"path", "digit", "split", "speaker", "rate", "pitch"}, ...]}
    ROOT/{train,validation,test}/<digit>_<speaker>_<k>.wav     16-bit mono PCM

Each clip: the word synthesised at 22,050 Hz, resampled to 16 kHz, leading and trailing silence trimmed,
peak-normalised to 0.9, and centred in 1 s of silence (a word longer than 1 s is cut to its middle second).

`write_clip_set` writes any list of clips in this layout, and `tone_digit_clips` makes a stand-in set of
synthetic tones (digit d is a chirp around its own pitch): the tests and `--quick` runs use it where eSpeak
NG is not installed. `load_spoken_digits(root, split)` reads a split back as tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import read_wav, resample, write_wav
from .errors import DataError

__all__ = ["DIGITS", "SPLITS", "ACCENTS", "VARIANTS", "SAMPLE_RATE", "ESPEAK_INSTALL", "Clip", "espeak_path",
           "synthesize_word", "to_clip", "build_spoken_digits", "write_clip_set", "tone_digit_clips", "load_spoken_digits", "speaker_recordings",
           "default_root", "speaker_splits"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "validation", "test")
SAMPLE_RATE = 16000
# English accents shipped by espeak-ng 1.51 (`espeak-ng --voices=en`)
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt", "klatt2",
            "klatt3", "whisper", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mario", "Michael", "Mike",
            "Storm", "Tweaky", "adam", "anika", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed",
            "edward", "grandma", "grandpa")
RATES = (120, 150, 175, 200)  # words per minute (espeak-ng -s)
PITCHES = (30, 50, 70)  # 0..99 (espeak-ng -p)
ESPEAK_INSTALL = ("espeak-ng is not installed (or not on PATH). Install it, then run the command again: "
                  "`sudo apt-get install espeak-ng` (Debian, Ubuntu), `sudo dnf install espeak-ng` (Fedora), "
                  "`brew install espeak-ng` (macOS)")


@dataclass
class Clip:
    """One clip before it is written: its samples ((L,) float32 at 16 kHz) and where it belongs."""

    digit: int
    split: str
    speaker: str
    samples: np.ndarray
    rate: int = 0
    pitch: int = 0


def default_root() -> Path:
    """Where `mambakit data spoken-digits` caches the set: $MAMBAKIT_DATA/spoken-digits, else
    ~/.cache/mambakit/spoken-digits."""
    base = os.environ.get("MAMBAKIT_DATA")
    return (Path(base) if base else Path.home() / ".cache" / "mambakit") / "spoken-digits"


def speaker_splits(speakers: Sequence[str]) -> dict[str, str]:
    """{speaker: "train" / "validation" / "test"}: speakers in the order of a hash of their names, the first 80% train,
    the next 10% validation, the rest test (at least one speaker each from 3 speakers on). Fixed for a set of
    speakers, whatever their order."""
    ranked = sorted(speakers, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    n = len(ranked)
    n_test = max(1, round(0.1 * n)) if n >= 3 else 0
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {name: "train" if i < n_train else "validation" if i < n_train + n_val else "test"
            for i, name in enumerate(ranked)}


def espeak_path() -> str | None:
    return shutil.which("espeak-ng")


def synthesize_word(word: str, voice: str, rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """(samples, sample rate) of `word` spoken by espeak-ng voice `voice` ("en-us+f3"); DataError with the install
    command when espeak-ng is missing, and with its message when it fails."""
    exe = espeak_path()
    if exe is None:
        raise DataError(ESPEAK_INSTALL)
    proc = subprocess.run([exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", word],
                          capture_output=True, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise DataError(f"espeak-ng -v {voice} failed: {proc.stderr.decode(errors='replace').strip()}")
    return read_wav(_fix_wav_header(proc.stdout))


def _fix_wav_header(data: bytes) -> bytes:
    """espeak-ng writing to a pipe cannot seek back, so its RIFF and data sizes are 0x7fffffff: set the real ones."""
    if data[:4] != b"RIFF" or data[36:40] != b"data":
        return data
    fixed = bytearray(data)
    fixed[4:8] = (len(data) - 8).to_bytes(4, "little")
    fixed[40:44] = (len(data) - 44).to_bytes(4, "little")
    return bytes(fixed)


def to_clip(samples: np.ndarray, sample_rate: int, clip_samples: int = SAMPLE_RATE, threshold: float = 0.02) -> np.ndarray:
    """Resample to 16 kHz, trim silence, peak-normalise to 0.9, centre in `clip_samples` (see the module docstring)."""
    x = resample(samples if samples.ndim == 1 else samples.mean(1), sample_rate, SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(x) > threshold * max(float(np.abs(x).max()), 1e-9))
    if loud.size:
        x = x[loud[0]:loud[-1] + 1]
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > 0:
        x = x * (0.9 / peak)
    if x.size > clip_samples:
        start = (x.size - clip_samples) // 2
        return x[start:start + clip_samples].astype(np.float32)
    out = np.zeros(clip_samples, dtype=np.float32)
    start = (clip_samples - x.size) // 2
    out[start:start + x.size] = x
    return out


def build_spoken_digits(root: str | Path | None = None, *, speakers: int | None = None, takes: int = 2, seed: int = 0,
                        progress: bool = True, jobs: int | None = None) -> Path:
    """Synthesise the set into `root` (default `default_root()`) and return it.

    Args:
        speakers: how many (accent, variant) speakers to use (default all, 7 x 40 = 280); each says every digit
            `takes` times at a rate and pitch drawn from RATES x PITCHES (seeded).
        jobs: espeak-ng processes at once (default: the CPU count). The rates and pitches are drawn before any
            synthesis, so the set is the same for every `jobs` (about 22 ms a clip on one core).
    Raises:
        DataError: espeak-ng is missing (the message says how to install it) or fails.

    Example:
        >>> build_spoken_digits("data/spoken-digits", speakers=40)     # 40 x 10 x 2 = 800 clips, about a minute
    """
    if espeak_path() is None:
        raise DataError(ESPEAK_INSTALL)
    rng = np.random.default_rng(seed)
    all_speakers = [(accent, variant) for accent in ACCENTS for variant in VARIANTS]
    if speakers is not None:
        order = rng.permutation(len(all_speakers))[:speakers]
        all_speakers = [all_speakers[i] for i in sorted(order)]
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    splits = speaker_splits([f"{accent}+{variant}" for accent, variant in all_speakers])
    plan = []  # (digit, split, speaker, rate, pitch) of every clip, in the order of the written set
    for accent, variant in all_speakers:
        speaker = f"{accent}+{variant}"
        for digit in range(len(DIGITS)):
            for _ in range(takes):
                plan.append((digit, splits[speaker], speaker, int(rng.choice(RATES)), int(rng.choice(PITCHES))))

    def make(item) -> Clip:
        digit, split, speaker, rate, pitch = item
        samples, sr = synthesize_word(DIGITS[digit], speaker, rate, pitch)
        return Clip(digit, split, speaker, to_clip(samples, sr), rate, pitch)

    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:  # threads: each waits on its espeak-ng process
        clips = list(tqdm(pool.map(make, plan), total=len(plan), desc="espeak-ng clips", disable=not progress))
    return write_clip_set(root if root is not None else default_root(), clips, source="espeak-ng")


def write_clip_set(root: str | Path, clips: Sequence[Clip], source: str) -> Path:
    """Write clips as WAV files plus manifest.json in the set's layout (see the module docstring)."""
    root = Path(root)
    entries = []
    counts: dict[tuple, int] = {}
    for clip in clips:
        if clip.split not in SPLITS:
            raise ValueError(f"write_clip_set: split must be one of {SPLITS}, got {clip.split!r}")
        key = (clip.digit, clip.speaker)
        counts[key] = counts.get(key, 0) + 1
        rel = f"{clip.split}/{clip.digit}_{clip.speaker.replace('/', '_')}_{counts[key] - 1}.wav"
        write_wav(root / rel, clip.samples, SAMPLE_RATE)
        meta = {k: v for k, v in asdict(clip).items() if k != "samples"}
        entries.append({"path": rel, **meta})
    lengths = {int(clip.samples.shape[0]) for clip in clips}
    if len(lengths) != 1:
        raise ValueError(f"write_clip_set: every clip must have the same length, got lengths {sorted(lengths)}")
    manifest = {"sample_rate": SAMPLE_RATE, "clip_samples": lengths.pop(), "source": source, "digits": list(DIGITS),
                "clips": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return root


def tone_digit_clips(per_digit: int = 8, clip_samples: int = SAMPLE_RATE, seed: int = 0) -> list[Clip]:
    """A stand-in for speech: digit d is a 0.5 s rising chirp with harmonics around 150 + 60 d Hz, jittered in pitch
    and timing per clip; `per_digit` clips per digit and split (test and validation get half as many, at least 1).
    Distinguishable by ear and by a classifier, needs no synthesiser."""
    rng = np.random.default_rng(seed)
    clips = []
    for split, count in (("train", per_digit), ("validation", max(1, per_digit // 2)), ("test", max(1, per_digit // 2))):
        for digit in range(10):
            for k in range(count):
                f0 = (150.0 + 60.0 * digit) * rng.uniform(0.95, 1.05)
                n = clip_samples // 2
                t = np.arange(n) / SAMPLE_RATE
                phase = 2 * np.pi * (f0 * t + 0.5 * 0.4 * f0 * t ** 2 / t[-1])  # a chirp to 1.4 f0
                tone = np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase)
                tone *= np.hanning(n) * 0.5
                out = np.zeros(clip_samples, dtype=np.float32)
                start = int(rng.integers(0, clip_samples - n + 1))
                out[start:start + n] = tone
                clips.append(Clip(digit, split, f"tone{k}", out))
    return clips


def load_spoken_digits(root: str | Path | None = None, split: str = "train",
                       with_speakers: bool = False) -> tuple[torch.Tensor, ...]:
    """(waveforms (n, clip_samples) float32 in [-1, 1], digits (n,) int64) of one split of a set written by
    `build_spoken_digits` / `write_clip_set`, plus the clips' speaker names (a list) when `with_speakers`.
    DataError naming the command that builds it when absent."""
    if split not in SPLITS:
        raise ValueError(f"load_spoken_digits: split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else default_root()
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"no spoken-digits set at {root}: build it with `mambakit data spoken-digits --out {root}` "
                        "(needs espeak-ng)")
    manifest = json.loads(manifest_path.read_text())
    entries = [e for e in manifest["clips"] if e["split"] == split]
    if not entries:
        raise DataError(f"{root}: no clips in split {split!r}")
    waves = np.zeros((len(entries), manifest["clip_samples"]), dtype=np.float32)
    for i, e in enumerate(entries):
        samples, rate = read_wav(root / e["path"])
        if rate != manifest["sample_rate"]:
            raise DataError(f"{root / e['path']}: sample rate {rate}, the manifest says {manifest['sample_rate']}")
        waves[i, :min(samples.size, waves.shape[1])] = samples[:waves.shape[1]]
    digits = torch.tensor([e["digit"] for e in entries], dtype=torch.int64)
    if with_speakers:
        return torch.from_numpy(waves), digits, [e["speaker"] for e in entries]
    return torch.from_numpy(waves), digits


def speaker_recordings(root: str | Path | None = None, split: str = "train") -> dict[str, torch.Tensor]:
    """{speaker: (samples,) float32}: every clip of a speaker in `split`, concatenated in the manifest's order: long
    recordings for training at contexts beyond one clip (the Mamba paper's Figure 7 uses long piano recordings)."""
    waves, _, speakers = load_spoken_digits(root, split, with_speakers=True)
    out: dict[str, list[torch.Tensor]] = {}
    for wave_, speaker in zip(waves, speakers):
        out.setdefault(speaker, []).append(wave_)
    return {speaker: torch.cat(parts) for speaker, parts in out.items()}
