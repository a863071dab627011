"""Raw audio: WAV I/O, resampling, mu-law (8 bits) round trip, the spoken-digits set (built from synthetic tones:
espeak-ng is not something CI installs) and `mambakit data spoken-digits`'s error without espeak-ng."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from mambakit.data import DataError
from mambakit.data.audio import mu_law_decode, mu_law_encode, read_wav, resample, write_wav
from mambakit.data.spoken_digits import (
    ESPEAK_INSTALL,
    _fix_wav_header,
    load_spoken_digits,
    speaker_splits,
    to_clip,
    tone_digit_clips,
    write_clip_set,
)

# ---------------------------------------------------------------- WAV


@pytest.mark.parametrize("shape", [pytest.param((1600,), id="mono"), pytest.param((800, 2), id="stereo")])
def test_wav_round_trip_16_bit(tmp_path, shape):
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    write_wav(tmp_path / "a.wav", x, 16000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and y.shape == shape and y.dtype == np.float32
    assert np.abs(y - x).max() <= 1.0 / 32767  # 16-bit PCM: within one LSB
    write_wav(tmp_path / "t.wav", torch.from_numpy(x), 8000)  # tensors are accepted too
    assert np.array_equal(read_wav(tmp_path / "t.wav")[0], y)


@pytest.mark.parametrize("width, raw, expected", [
    pytest.param(1, bytes([0, 128, 255]), [-1.0, 0.0, 127 / 128], id="8bit-unsigned"),
    pytest.param(3, bytes([0, 0, 0x80, 0, 0, 0, 0xFF, 0xFF, 0x7F]), [-1.0, 0.0, (2 ** 23 - 1) / 2 ** 23], id="24bit"),
    pytest.param(4, np.array([-2 ** 31, 0, 2 ** 30], dtype="<i4").tobytes(), [-1.0, 0.0, 0.5], id="32bit"),
])
def test_wav_reads_other_pcm_widths(tmp_path, width, raw, expected):
    path = tmp_path / "w.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(22050)
        w.writeframes(raw)
    samples, rate = read_wav(path)
    assert rate == 22050 and np.allclose(samples, expected, atol=1e-7)


def test_wav_errors(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"not a wav")
    with pytest.raises(DataError, match="not a readable PCM WAV"):
        read_wav(tmp_path / "x.wav")
    with pytest.raises(ValueError, match=r"samples must be \(L,\) or \(L, C\)"):
        write_wav(tmp_path / "y.wav", np.zeros((2, 2, 2)))


def test_espeak_pipe_header_is_repaired():
    header = bytearray(b"RIFF" + (0x7FFFFFFF).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
                       + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (22050).to_bytes(4, "little")
                       + (44100).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
                       + b"data" + (0x7FFFFFFF).to_bytes(4, "little"))
    data = bytes(header) + np.array([0, 16384, -16384], dtype="<i2").tobytes()
    samples, rate = read_wav(_fix_wav_header(data))
    assert rate == 22050 and samples.tolist() == [0.0, 0.5, -0.5]


def test_resample_keeps_a_tone_and_its_length():
    t = np.arange(22050) / 22050
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    y = resample(x, 22050, 16000)
    assert y.shape == (16000,)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(y - expected).max() < 1e-3  # a whole number of periods: the FFT resampling is exact


# ---------------------------------------------------------------- mu-law


def test_mu_law_levels_and_ends():
    assert mu_law_encode(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    assert mu_law_encode(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clipped
    levels = torch.arange(256)
    decoded = mu_law_decode(levels)
    assert decoded[0] == -1.0 and decoded[-1] == 1.0 and (decoded.diff() > 0).all()
    assert torch.equal(mu_law_encode(decoded), levels)  # every level decodes to a value that encodes back to it


def test_mu_law_round_trip_within_one_quantisation_step():
    x = torch.cat([torch.linspace(-1, 1, 20001), torch.rand(20000) * 2 - 1, torch.randn(2000) * 1e-3])
    q = mu_law_encode(x)
    assert q.dtype == torch.int64 and int(q.min()) >= 0 and int(q.max()) <= 255
    y = mu_law_decode(q)
    # the quantisation step at x: the spacing between the two levels around the value decoded
    grid = mu_law_decode(torch.arange(256))
    lo = grid[(q - 1).clamp(min=0)]
    hi = grid[(q + 1).clamp(max=255)]
    step = torch.maximum(y - lo, hi - y)
    err = (y - x).abs()
    assert (err <= step).all(), f"worst {float((err - step).max())}"
    assert float(err.max()) < 2 / 255 * 8  # and in absolute terms a few % at most (the widest levels, near +-1)


def test_mu_law_rejects_float_levels_and_bad_bits():
    with pytest.raises(ValueError, match="integer levels"):
        mu_law_decode(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="bits"):
        mu_law_encode(torch.zeros(3), bits=0)


# ---------------------------------------------------------------- spoken digits (tones stand in for espeak-ng)


def test_spoken_digit_set_written_and_read_back(tmp_path):
    clips = tone_digit_clips(per_digit=2)
    root = write_clip_set(tmp_path / "sd", clips, source="tones")
    for split, n in (("train", 20), ("validation", 10), ("test", 10)):
        waves, digits = load_spoken_digits(root, split)
        assert waves.shape == (n, 16000) and waves.dtype == torch.float32
        assert sorted(digits.tolist()) == sorted(list(range(10)) * (n // 10))
        assert float(waves.abs().max()) <= 1.0 and float(waves.abs().max()) > 0.1


def test_spoken_digit_set_missing_names_the_command(tmp_path):
    with pytest.raises(DataError, match="mambakit data spoken-digits"):
        load_spoken_digits(tmp_path / "none", "train")


def test_to_clip_trims_normalises_and_centres():
    word = np.concatenate([np.zeros(5000), 0.3 * np.sin(np.arange(11025) * 0.3), np.zeros(7000)]).astype(np.float32)
    clip = to_clip(word, 22050)
    assert clip.shape == (16000,) and abs(float(np.abs(clip).max()) - 0.9) < 0.02
    loud = np.flatnonzero(np.abs(clip) > 0.05)
    assert abs((loud[0] + loud[-1]) / 2 - 8000) < 200  # centred


def test_speaker_splits_fixed_and_by_speaker():
    names = [f"en-us+v{i}" for i in range(40)]
    splits = speaker_splits(names)
    assert splits == speaker_splits(list(reversed(names)))
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "validation", "test")}
    assert counts == {"train": 32, "validation": 4, "test": 4}


def test_data_command_without_espeak_says_how_to_install(tmp_path, monkeypatch, capsys):
    from mambakit.cli.__main__ import main

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no espeak-ng to find
    assert main(["data", "spoken-digits", "--out", str(tmp_path / "sd"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambakit data: error: espeak-ng is not installed")
    assert "apt-get install espeak-ng" in err and "brew install espeak-ng" in err
    assert ESPEAK_INSTALL.split(".")[0] in err
    assert not (tmp_path / "sd").exists()
