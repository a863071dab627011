"""mambakit.evaluation: held-out loss and bits per byte; per-token log-probabilities (`score`); the lm-evaluation-harness
model (`mambakit.evaluation.lm_eval`, imported on its own: it needs the `lm_eval` extra)."""

from .bits_per_byte import Evaluation, evaluate_bits_per_byte, evaluate_stream, token_nll_sum
from .score import score

__all__ = ["Evaluation", "evaluate_stream", "evaluate_bits_per_byte", "token_nll_sum", "score"]
