"""Named model sizes: the published Mamba-1 and Mamba-2 checkpoints' shapes, plus small ones for tests and CPU.

`preset("mamba2-130m")` returns a fresh MambaConfig; `PRESETS` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import MambaConfig

NEOX_VOCAB = 50277  # GPT-NeoX-20B tokenizer, used by every published Mamba checkpoint


def _mamba1(d_model: int, n_layer: int) -> Callable[[], MambaConfig]:
    return lambda: MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=NEOX_VOCAB, ssm_cfg={"layer": "Mamba1"})


def _mamba2(d_model: int, n_layer: int) -> Callable[[], MambaConfig]:
    return lambda: MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=NEOX_VOCAB, ssm_cfg={"layer": "Mamba2"})


PRESETS: dict[str, Callable[[], MambaConfig]] = {
    "mamba-130m": _mamba1(768, 24),
    "mamba-370m": _mamba1(1024, 48),
    "mamba-790m": _mamba1(1536, 48),
    "mamba-1.4b": _mamba1(2048, 48),
    "mamba-2.8b": _mamba1(2560, 64),
    "mamba2-130m": _mamba2(768, 24),
    "mamba2-370m": _mamba2(1024, 48),
    "mamba2-780m": _mamba2(1536, 48),
    "mamba2-1.3b": _mamba2(2048, 48),
    "mamba2-2.7b": _mamba2(2560, 64),
    # small byte-level models (vocab 256) for CPU training and tests
    "bytes-mamba1-small": lambda: MambaConfig(d_model=256, n_layer=4, vocab_size=256, ssm_cfg={"layer": "Mamba1"}),
    "bytes-mamba2-small": lambda: MambaConfig(
        d_model=256, n_layer=4, vocab_size=256, ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32}),
}


def preset(name: str) -> MambaConfig:
    """A fresh config for a named size; ValueError lists the names on a typo."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
