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


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Tiny models on a shared 2-core machine: one thread per test process is several times faster than torch's
    default (threads that wait on each other for matrices of a few dozen rows)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

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


def test_data_command_jobs_run_espeak_in_parallel_and_write_the_same_set(tmp_path, monkeypatch, capsys):
    """--jobs N: N synthesiser calls at once (a fake espeak-ng that finishes out of order), and byte for byte the
    set of one job: the rates and pitches are drawn before any synthesis."""
    import hashlib
    import threading
    import time

    import mambakit.data.spoken_digits as sd
    from mambakit.cli.__main__ import main

    threads, calls = set(), []

    def fake_synthesize(word, voice, rate=175, pitch=50):
        threads.add(threading.get_ident())
        calls.append((word, voice, rate, pitch))
        key = int(hashlib.sha1(f"{word}{voice}{rate}{pitch}".encode()).hexdigest()[:6], 16)
        time.sleep((key % 5) * 1e-3)  # out of order across threads
        t = np.arange(8000) / 8000
        return (0.5 * np.sin(2 * np.pi * (200 + key % 300) * t) * (t > 0.2) * (t < 0.6)).astype(np.float32), 8000

    monkeypatch.setattr(sd, "espeak_path", lambda: "espeak-ng")
    monkeypatch.setattr(sd, "synthesize_word", fake_synthesize)
    sets = {}
    for jobs in (1, 4):
        threads.clear()
        calls.clear()
        out = tmp_path / f"jobs{jobs}"
        assert main(["data", "spoken-digits", "--out", str(out), "--speakers", "3", "--takes", "2", "--jobs",
                     str(jobs), "--no-progress"]) == 0
        assert f"wrote 60 clips to {out}" in capsys.readouterr().out
        assert len(threads) == 1 if jobs == 1 else len(threads) > 1
        sets[jobs] = ({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()},
                      sorted(calls))
    assert sets[1][1] == sets[4][1] and len(sets[1][1]) == 60
    assert sets[1][0] == sets[4][0]
    with pytest.raises(ValueError, match="jobs must be a positive int"):
        sd.build_spoken_digits(tmp_path / "bad", speakers=1, jobs=0, progress=False)


# ---------------------------------------------------------------- the U-Net

from mambakit.models.unet import AudioUNet, UNetConfig, sample_audio  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

UNETS = [
    pytest.param({"mixer": "mamba"}, id="mamba"),
    pytest.param({"mixer": "s4d-lin", "mlp": True}, id="s4d-lin-mlp"),
    pytest.param({"mixer": "s4d-real", "mlp": True}, id="s4d-real-mlp"),
]


def _tiny_unet(**kwargs) -> AudioUNet:
    torch.manual_seed(0)
    model = AudioUNet(UNetConfig(d_model=8, n_layers=1, pool=[2, 4], d_state=4, **kwargs)).eval()
    with torch.no_grad():  # larger weights than at init, so every path carries signal into the check
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kwargs", UNETS)
def test_unet_shapes_any_length(kwargs):
    model = _tiny_unet(**kwargs)
    assert model.config.widths == [8, 16, 32] and model.config.multiple == 8
    for length in (1, 7, 8, 29):
        assert model(torch.randint(0, 256, (2, length))).shape == (2, length, 256)
    if kwargs["mixer"] == "s4d-lin":
        assert model.down[0][0].mixer.is_complex  # the complex-A option is S4D-Lin
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 8))


@pytest.mark.parametrize("kwargs", UNETS)
def test_unet_is_causal(kwargs):
    """Perturb every sample from t on: the outputs before t do not move, those from t on do (the model reads its
    input: the test would pass vacuously on a constant model)."""
    model = _tiny_unet(**kwargs)
    levels = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        base = model(levels)
        for t in (0, 1, 5, 8, 13, 16, 31):
            changed = levels.clone()
            changed[:, t:] = torch.randint(0, 256, (2, 32 - t))
            out = model(changed)
            # S4D convolves by FFT, where every output carries rounding of the whole signal (~1e-7): hence a
            # tolerance far below any real dependence (the perturbed outputs move by O(1))
            assert_close(out[:, :t], base[:, :t], name=f"outputs before {t}", rel=1e-5)
            assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("kwargs", UNETS)
def test_unet_step_by_step_equals_forward(kwargs):
    model = _tiny_unet(**kwargs)
    levels = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(levels)
        state = model.allocate_state(2)
        steps = torch.stack([model.step(levels[:, t], state) for t in range(24)], dim=1)
    assert_close(steps, full, name="step logits", rel=1e-4)


@pytest.mark.parametrize("kwargs", UNETS)
def test_unet_state_resets_in_place_and_the_step_runner_steps_as_the_model(kwargs):
    """UNetStepGraphs without graphs (a CPU model) steps as `model.step` does on its own state; `reset` empties the
    state in place (the tensors a captured graph reads keep their addresses) and the same inputs give the same
    logits again, across several pooling groups."""
    from mambakit.models.unet import UNetStepGraphs

    model = _tiny_unet(**kwargs)
    levels = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        state = model.allocate_state(2)
        expected = torch.stack([model.step(levels[:, t], state) for t in range(19)], dim=1)
        runner = UNetStepGraphs(model, 2)
        assert not runner.graphed and runner.period == 8
        addresses = [t.data_ptr() for t in runner.state.buffers + runner.state.pending]
        first = torch.stack([runner(levels[:, t]) for t in range(19)], dim=1)
        assert runner.state.t == 19 and any(bool(t.any()) for t in runner.state.pending)
        runner.state.reset()
        assert runner.state.t == 0 and not any(bool(t.any()) for t in runner.state.buffers + runner.state.pending)
        assert [t.data_ptr() for t in runner.state.buffers + runner.state.pending] == addresses
        again = torch.stack([runner(levels[:, t]) for t in range(19)], dim=1)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    with pytest.raises(ValueError, match="needs a model on CUDA"):
        UNetStepGraphs(model, 2, graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", UNETS)
def test_unet_step_graphs_replay_every_phase_as_the_eager_step(kwargs):
    """On CUDA: one graph per phase of the pooling (8 for pool [2, 4]); 3 rounds of replays give the eager step's
    logits, and greedy sampling with graphs gives the eager samples."""
    from mambakit.models.unet import UNetStepGraphs

    model = _tiny_unet(**kwargs).cuda()
    levels = torch.randint(0, 256, (2, 24), device="cuda")
    with torch.no_grad():
        state = model.allocate_state(2)
        eager = torch.stack([model.step(levels[:, t], state) for t in range(24)], dim=1)
        runner = UNetStepGraphs(model, 2)
        assert runner.graphed and len(runner._graphs) == 8
        graphed = torch.stack([runner(levels[:, t]).clone() for t in range(24)], dim=1)
    assert_close(graphed, eager, name="graphed step logits", rel=1e-5)
    assert torch.equal(sample_audio(model, 2, 40, temperature=0.0, cuda_graph=True),
                       sample_audio(model, 2, 40, temperature=0.0))


def test_sample_audio_and_wav(tmp_path):
    model = _tiny_unet(mixer="mamba")
    a = sample_audio(model, 2, 20, seed=1)
    b = sample_audio(model, 2, 20, seed=1)
    assert a.shape == (2, 20) and torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) < 256
    assert (a[:, 0] == 128).all()  # starts from the level of silence
    prompt = torch.randint(0, 256, (2, 5))
    c = sample_audio(model, 2, 12, prompt=prompt, temperature=0.0)
    assert torch.equal(c[:, :5], prompt)
    write_wav(tmp_path / "s.wav", mu_law_decode(a[0]), 16000)
    assert read_wav(tmp_path / "s.wav")[0].shape == (20,)


def test_unet_config_errors():
    with pytest.raises(ValueError, match="mixer must be one of"):
        UNetConfig(mixer="lstm")
    with pytest.raises(ValueError, match="pooling factor"):
        UNetConfig(pool=[1])


# ---------------------------------------------------------------- mambakit reproduce spoken-digits / audio-context --quick

from mambakit.reproduce.dna_audio_common import frechet_distance  # noqa: E402
from mambakit.reproduce.spoken_digits import inception_score  # noqa: E402


def test_frechet_distance_and_inception_score():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert abs(frechet_distance(a, torch.randn(4000, 3, generator=g))) < 0.02  # same Gaussian
    shifted = torch.randn(4000, 3, generator=g) + torch.tensor([2.0, 0.0, 0.0])
    assert abs(frechet_distance(a, shifted) - 4.0) < 0.15  # |mu_a - mu_b|^2 = 4, same covariance
    scaled = 3 * torch.randn(4000, 3, generator=g)
    assert abs(frechet_distance(a, scaled) - 3 * (1 + 9 - 2 * 3)) < 0.6  # Tr(S_a + S_b - 2 (S_a S_b)^1/2) = 3 * 4
    assert inception_score(torch.eye(10)) == pytest.approx(10.0)  # confident and diverse
    assert inception_score(torch.full((5, 10), 0.1)) == pytest.approx(1.0)  # no confidence


@pytest.mark.slow
def test_reproduce_spoken_digits_quick(tmp_path):
    import json

    from mambakit.reproduce import FINISHED, reproduce

    out = tmp_path / "spoken-digits"
    assert reproduce("spoken-digits", out, quick=True, device="cpu", progress=False) == FINISHED
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "spoken-digits" and results["quick"] is True
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"mamba-unet", "s4d-lin-mlp-unet", "s4d-real-mlp-unet"}
    assert rows["s4d-lin-mlp-unet"]["A"] == "complex" and rows["s4d-real-mlp-unet"]["A"] == "real"
    for key, r in rows.items():
        assert 0.0 < r["bits_per_sample"] < 9.0
        assert 0.1 <= r["confidence"] <= 1.0 and 1.0 - 1e-6 <= r["inception_score"] <= 10.0 and r["fid"] >= 0
        assert sum(r["digit_histogram"]) == r["generated"] == results["settings"]["generate"]
        samples, rate = read_wav(out / "samples" / f"{key}_0.wav")
        assert rate == 16000 and samples.shape == (results["settings"]["clip_samples"],)
    assert 0.0 <= results["settings"]["classifier"]["test_accuracy"] <= 1.0
    loaded = AudioUNet.from_pretrained(out / "s4d-lin-mlp-unet")  # the committed checkpoint layout loads
    assert loaded.config.mixer == "s4d-lin" and loaded.config.mlp
    levels = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert loaded(levels).shape == (1, 16, 256)
    readme = (out / "README.md").read_text()
    assert "(bits_per_sample.png)" in readme and "samples/mamba-unet_0.wav" in readme and "quick mode" in readme


@pytest.mark.slow
def test_reproduce_audio_context_quick_through_the_cli(tmp_path):
    import json

    from mambakit.cli.__main__ import main

    out = tmp_path / "audio-context"
    assert main(["reproduce", "audio-context", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    s = results["settings"]
    rows = results["rows"]
    assert {(r["label"], r["context"]) for r in rows} == {(m, 2 ** k) for m in ("Mamba-UNet", "S4D+MLP-UNet")
                                                          for k in s["contexts_log2"]}
    for r in rows:
        assert 0.0 < r["bits_per_sample"] < 9.0 and r["batch_size"] * r["context"] == s["samples_per_step"]
        assert 0 < r["val_samples"] <= s["eval_samples"]
    assert len({r["val_samples"] for r in rows}) == 1  # every context scores the same held-out samples
    readme = (out / "README.md").read_text()
    assert "(bits_vs_context.png)" in readme and "## What it shows" in readme and "paper's claim" in readme


def test_audio_context_scores_the_same_held_out_samples_at_every_context():
    from mambakit.reproduce.audio_context import _held_out_spans, _held_out_windows

    recordings = [torch.arange(1000, 1000 + n) for n in (70, 9, 300)]  # distinct values: positions are traceable
    spans = _held_out_spans(recordings, 32, 200)  # 6 spans of 32 predictions: 2 from the first, 4 from the third
    assert [s[0].item() for s in spans] == [1000, 1032, 1000, 1032, 1064, 1096]
    predicted = None
    for length in (4, 8, 32):
        windows = _held_out_windows(spans, length)
        assert windows.shape == (6 * 32 // length, length + 1)
        targets = windows[:, 1:].flatten().tolist()
        predicted = predicted or targets
        assert targets == predicted  # the same samples, in the same order, whatever the context
    assert predicted == [v for s in spans for v in s[1:].tolist()]  # each span's 2nd .. last sample, once
    with pytest.raises(ValueError, match="does not divide"):
        _held_out_windows(spans, 12)
    with pytest.raises(ValueError, match="smaller than the longest context"):
        _held_out_spans(recordings, 32, 16)
    with pytest.raises(ValueError, match="no held-out recording is longer"):
        _held_out_spans(recordings[1:2], 32, 200)


@pytest.mark.parametrize("mamba, s4d, verdict", [
    ([1.5, 1.4, 1.3], [1.5, 1.5, 1.5], "claim holds here"),
    ([1.3, 1.4, 1.5], [1.3, 1.5, 1.7], "only loses less"),
    ([1.5, 1.4, 1.45], [1.5, 1.3, 1.2], "gains no more"),
])
def test_audio_context_verdict_follows_the_numbers(mamba, s4d, verdict):
    from mambakit.reproduce.audio_context import _verdict

    contexts = [2 ** 11, 2 ** 13, 2 ** 15]
    rows = [{"label": label, "context": L, "bits_per_sample": b}
            for label, values in (("Mamba-UNet", mamba), ("S4D+MLP-UNet", s4d)) for L, b in zip(contexts, values)]
    text = _verdict(rows, contexts)
    assert verdict in text
    assert f"Mamba-UNet: {mamba[0]:.3f} -> {mamba[-1]:.3f}" in text
    trend = "falls at every" if mamba == sorted(mamba, reverse=True) else "rises at every" if mamba == sorted(mamba) \
        else "does not move one way"
    assert trend in text.splitlines()[0]


def test_unet_save_and_load(tmp_path):
    model = _tiny_unet(mixer="s4d-lin", mlp=True)
    model.save_pretrained(tmp_path / "m")
    loaded = AudioUNet.from_pretrained(tmp_path / "m")
    levels = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(levels), model(levels))
    assert loaded.config == model.config
