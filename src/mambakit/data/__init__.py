"""mambakit.data: tokenizers, corpora (built-in Shakespeare and the user's files) and token-stream windows.

Typical use:
    >>> from mambakit.data import ByteTokenizer, TokenStream, RandomWindows, load_corpus
    >>> train_docs, val_docs = load_corpus()               # Shakespeare; or load_corpus("my_data/")
    >>> tok = ByteTokenizer()
    >>> train = TokenStream.from_documents(train_docs, tok)
    >>> RandomWindows(train, seqlen=256, batch_size=16, seed=0).next_batch().shape
    torch.Size([16, 257])
    >>> streams = load_token_streams("my_data/", tok)       # tokenized once into an on-disk cache, then memory-mapped
    >>> split_window(window, tok.eos_id).seq_idx            # packed documents: the state restarts at each EOS
    >>> chats = conversation_streams("chats.jsonl", tok)      # fine-tuning on conversations: the assistant's tokens
"""

from .corpora import (
    COMPRESSED_OPENERS,
    SHAKESPEARE_HELD_OUT,
    SUPPORTED_SUFFIXES,
    Document,
    load_corpus,
    load_documents,
    shakespeare_documents,
    split_documents,
)
from .conversations import (DEFAULT_CHAT_TEMPLATE, ConversationStreams, conversation_stream, conversation_streams,
                            encode_conversation, load_conversations)
from .errors import DataError
from .packing import IGNORE_INDEX, WindowBatch, seq_idx_from_eos, split_window
from .sources import Corpus, is_datasets_dir, open_corpus
from .stream import RandomWindows, TokenStream, eval_target_count, eval_windows, segment_windows
from .streaming import IncrementalDecoder
from .token_cache import TokenizedCorpus, default_cache_dir, load_token_streams, tokenize_corpus
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
    "COMPRESSED_OPENERS",
    "SHAKESPEARE_HELD_OUT",
    "shakespeare_documents",
    "load_documents",
    "split_documents",
    "load_corpus",
    "TokenStream",
    "RandomWindows",
    "eval_windows",
    "eval_target_count",
    "segment_windows",
    "WindowBatch",
    "seq_idx_from_eos",
    "split_window",
    "IGNORE_INDEX",
    "DEFAULT_CHAT_TEMPLATE",
    "load_conversations",
    "encode_conversation",
    "ConversationStreams",
    "conversation_streams",
    "conversation_stream",
    "Corpus",
    "open_corpus",
    "is_datasets_dir",
    "TokenizedCorpus",
    "tokenize_corpus",
    "load_token_streams",
    "default_cache_dir",
]
