"""mambakit.evaluation: held-out loss and bits per byte."""

from .bits_per_byte import evaluate_bits_per_byte, token_nll_sum

__all__ = ["evaluate_bits_per_byte", "token_nll_sum"]
