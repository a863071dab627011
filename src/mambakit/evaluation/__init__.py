"""mambakit.evaluation: held-out loss and bits per byte."""

from .bits_per_byte import Evaluation, evaluate_bits_per_byte, evaluate_stream, token_nll_sum

__all__ = ["Evaluation", "evaluate_stream", "evaluate_bits_per_byte", "token_nll_sum"]
