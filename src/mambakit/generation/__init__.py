"""mambakit.generation: inference cache, prefill, decode step, sampling, CUDA graphs, the compiled CPU step, generate and
stream, and multi-turn chat with the state carried across turns."""

from .cache import InferenceCache, allocate_cache
from .chat import ChatSession
from .compiled import CompiledDecoder
from .cuda_graph import ChunkPrefillGraphs, CUDAGraphDecoder
from .generate import SamplingParams, generate, stream
from .sampling import apply_repetition_penalty, greedy, logits_to_probs, sample, seen_tokens
from .state_file import SavedState, StateFileWarning, load_state, save_state
from .steps import decode_one_token, prefill
from .stopping import StopStrings, StopTextFilter

__all__ = [
    "InferenceCache",
    "SavedState",
    "StateFileWarning",
    "save_state",
    "load_state",
    "allocate_cache",
    "SamplingParams",
    "prefill",
    "decode_one_token",
    "CUDAGraphDecoder",
    "ChunkPrefillGraphs",
    "CompiledDecoder",
    "generate",
    "stream",
    "ChatSession",
    "StopStrings",
    "StopTextFilter",
    "logits_to_probs",
    "apply_repetition_penalty",
    "sample",
    "greedy",
    "seen_tokens",
]
