"""mambakit.generation: inference cache, prefill, decode step, sampling, generate and stream."""

from .cache import InferenceCache, allocate_cache
from .generate import SamplingParams, decode_one_token, generate, prefill, stream
from .sampling import apply_repetition_penalty, greedy, logits_to_probs, sample

__all__ = [
    "InferenceCache",
    "allocate_cache",
    "SamplingParams",
    "prefill",
    "decode_one_token",
    "generate",
    "stream",
    "logits_to_probs",
    "apply_repetition_penalty",
    "sample",
    "greedy",
]
