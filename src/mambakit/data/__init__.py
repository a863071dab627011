"""mambakit.data: tokenizers, corpora (built-in Shakespeare and the user's files) and token-stream windows.

Typical use:
    >>> from mambakit.data import ByteTokenizer, TokenStream, RandomWindows, load_corpus
    >>> train_docs, val_docs = load_corpus()               # Shakespeare; or load_corpus("my_data/")
    >>> tok = ByteTokenizer()
    >>> train = TokenStream.from_documents(train_docs, tok)
    >>> RandomWindows(train, seqlen=256, batch_size=16, seed=0).next_batch().shape
    torch.Size([16, 257])
"""

from .corpora import (
    SHAKESPEARE_HELD_OUT,
    SUPPORTED_SUFFIXES,
    Document,
    load_corpus,
    load_documents,
    shakespeare_documents,
    split_documents,
)
from .errors import DataError
from .stream import RandomWindows, TokenStream, eval_target_count, eval_windows
from .streaming import IncrementalDecoder
from .tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, TransformersTokenizer,
                         load_tokenizer)

__all__ = [
    "DataError",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TransformersTokenizer",
    "load_tokenizer",
    "IncrementalDecoder",
    "Document",
    "SUPPORTED_SUFFIXES",
    "SHAKESPEARE_HELD_OUT",
    "shakespeare_documents",
    "load_documents",
    "split_documents",
    "load_corpus",
    "TokenStream",
    "RandomWindows",
    "eval_windows",
    "eval_target_count",
]
