"""The mixers a config can name: `ssm_cfg["layer"]` -> class, and the attention layer of hybrid models.

One table, read by the model builder (models/mamba_lm.py) and the checkpoint readers (checkpoints/), so a
new mixer is registered once.
"""

from __future__ import annotations

from .attention import MHA
from .mamba1 import Mamba1
from .mamba1_ablation import Mamba1Ablation
from .mamba1_ungated import Mamba1Ungated
from .mamba2 import Mamba2
from .s4d import S4D

MIXERS = {"Mamba1": Mamba1, "Mamba2": Mamba2, "Mamba1Ungated": Mamba1Ungated, "S4D": S4D,
          "Mamba1Ablation": Mamba1Ablation}
ATTENTION = MHA
