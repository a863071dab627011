"""Raw audio: WAV read/write (standard library `wave`), resampling, and 8-bit mu-law quantisation (the Mamba paper's
Section 4.4 and SaShiMi model 16 kHz waveforms as sequences of 256 mu-law levels).

Shapes (legend): L samples, C channels, B batch.

mu-law with mu = 2^bits - 1 (ITU-T G.711's companding curve, without its bit layout):

    y = sign(x) ln(1 + mu |x|) / ln(1 + mu)          x in [-1, 1]  ->  y in [-1, 1]
    q = round((y + 1) / 2 * mu)                       q in {0, ..., mu}: 256 levels for 8 bits
    decode: y = 2 q / mu - 1;  x = sign(y) ((1 + mu)^|y| - 1) / mu

The levels are dense near 0 and sparse near +-1, as the ear's sensitivity; decode(encode(x)) differs from x
by at most half the width of the level spacing around x (round to nearest in the companded domain, then an
increasing map back), so under one quantisation step.
"""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["read_wav", "write_wav", "resample", "mu_law_encode", "mu_law_decode", "MU_LAW_LEVELS"]

MU_LAW_LEVELS = 256


def read_wav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """(samples, sample_rate) of a PCM WAV file (or its bytes): float32 in [-1, 1], (L,) for mono, (L, C) otherwise.

    8-bit (unsigned), 16-, 24- and 32-bit (signed) PCM are read; compressed WAVs are a DataError.

    Example:
        >>> samples, rate = read_wav("clip.wav")        # (16000,), 16000
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with wave.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as err:
        raise DataError(f"{name}: not a readable PCM WAV file ({err})") from err
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:  # little-endian 24-bit: widen to 32 bits by putting the 3 bytes in the top of an int32
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        samples = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 8388608.0
    elif width == 4:
        samples = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise DataError(f"{name}: unsupported sample width {width} bytes")
    if channels > 1:
        samples = samples.reshape(-1, channels)
    return samples, rate


def write_wav(path: str | Path, samples, sample_rate: int = 16000) -> None:
    """Write float samples in [-1, 1] ((L,) mono or (L, C); numpy or torch) as 16-bit PCM; values beyond are clipped.

    Example:
        >>> write_wav("tone.wav", np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000)
    """
    data = samples.detach().cpu().float().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, np.float32)
    if data.ndim not in (1, 2):
        raise ValueError(f"write_wav: samples must be (L,) or (L, C), got shape {data.shape}")
    if sample_rate <= 0:
        raise ValueError(f"write_wav: sample_rate must be positive, got {sample_rate}")
    # the reader's scale (1 / 32768), so a round trip is within half a step; +1.0 itself clips to 32767
    pcm = np.clip(np.round(data * 32768.0), -32768, 32767).astype("<i2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if data.ndim == 1 else data.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a mono (L,) signal by the FFT (exact for a periodic signal; clips are short, so
    the O(L log L) transform of the whole clip is cheap). Content above the lower Nyquist frequency is dropped.

    Example:
        >>> resample(np.zeros(22050, np.float32), 22050, 16000).shape
        (16000,)
    """
    if samples.ndim != 1:
        raise ValueError(f"resample: samples must be mono (L,), got shape {samples.shape}")
    if rate_in == rate_out or samples.size == 0:
        return samples.astype(np.float32)
    n_out = max(1, int(round(samples.size * rate_out / rate_in)))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(spectrum.size, n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=n_out) * (n_out / samples.size)
    return out.astype(np.float32)


def _check_bits(bits: int) -> float:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"mu-law: bits must be an int in [1, 16], got {bits!r}")
    return float(2 ** bits - 1)


def mu_law_encode(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantise a waveform in [-1, 1] (any shape; values beyond are clipped) to int64 levels {0, ..., 2^bits - 1}.

    Example:
        >>> mu_law_encode(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([  0, 128, 255])
    """
    mu = _check_bits(bits)
    x = torch.as_tensor(x).float().clamp(-1.0, 1.0)
    y = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.floor((y + 1.0) / 2.0 * mu + 0.5).long()


def mu_law_decode(q: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Levels {0, ..., 2^bits - 1} (any shape) back to float32 samples in [-1, 1]; the inverse of the companding
    curve at each level's centre.

    Example:
        >>> mu_law_decode(mu_law_encode(torch.tensor([0.5])))       # within one level of 0.5
        tensor([0.4967])
    """
    mu = _check_bits(bits)
    q = torch.as_tensor(q)
    if q.is_floating_point():
        raise ValueError(f"mu_law_decode: q must hold integer levels, got dtype {q.dtype}")
    y = 2.0 * q.float() / mu - 1.0
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu
