"""Streaming detokenization on CPU: `IncrementalDecoder` over n tokens, before (issue 22) and after.

Before: the decoder re-decoded every token so far at each new one (O(n) per token, O(n^2) per stream); the
class is kept below as `RedecodeAll`, as it was at commit ff46f0a. After: mambakit.data.IncrementalDecoder
(`tokenizers.decoders.DecodeStream` for tokenizer.json, a sliding window for sentencepiece, the incremental
UTF-8 decoder for bytes).

Tokenizers are trained here on the built-in Shakespeare corpus (no download): a byte-level BPE
(tokenizer.json, GPT-NeoX style, vocab 8192) and a sentencepiece BPE with byte fallback (vocab 8192). The
token stream is the encoded text of the first plays, cut at n tokens.

    python benchmarks/stream_decode.py                  # n = 1000, 2500, 5000, 10000; median of 3
    python benchmarks/stream_decode.py --n 10000 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mambakit.data import ByteTokenizer, HFTokenizer, IncrementalDecoder, SentencePieceTokenizer, shakespeare_documents


class RedecodeAll:
    """The IncrementalDecoder before issue 22 (its token path): decode all ids so far at every token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new, self._emitted = text[self._emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self._ids)
        new, self._emitted = text[self._emitted:], len(text)
        return new


def _train(directory: Path, text: list[str]) -> dict:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    bpe.save(str(directory / "tokenizer.json"))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for doc in text for line in doc.splitlines() if line.strip()), model_writer=model,
        vocab_size=8192, model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
        input_sentence_size=200_000, shuffle_input_sentence=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return {"tokenizer.json (byte-level BPE)": HFTokenizer(directory), "sentencepiece BPE": SentencePieceTokenizer(
        directory), "bytes": ByteTokenizer()}


def _stream_seconds(decoder_cls, tok, ids: list[int], repeats: int) -> tuple[float, str]:
    times, text = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        dec = decoder_cls(tok)
        pieces = [dec.push(t) for t in ids]
        pieces.append(dec.flush())
        times.append(time.perf_counter() - t0)
        text = "".join(pieces)
    return statistics.median(times), text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 2500, 5000, 10000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before-max", type=int, default=10000, help="skip the quadratic decoder above this n")
    args = p.parse_args()
    docs = [d.text for d in shakespeare_documents()]
    with tempfile.TemporaryDirectory() as tmp:
        toks = _train(Path(tmp), docs)
        print(f"python {platform.python_version()}, tokenizers {tokenizers.__version__}, sentencepiece "
              f"{sentencepiece.__version__}, {platform.processor() or platform.machine()}")
        print("| tokenizer | tokens | before: re-decode all (s) | after: IncrementalDecoder (s) | after, us/token |")
        print("|---|---|---|---|---|")
        for name, tok in toks.items():
            stream = tok.encode("".join(docs[:4]))
            for n in args.n:
                ids = stream[:n]
                if len(ids) < n:
                    raise SystemExit(f"only {len(ids)} tokens of text for {name}")
                after, text = _stream_seconds(IncrementalDecoder, tok, ids, args.repeats)
                assert text == tok.decode(ids), name  # the stream must spell the same text
                if isinstance(tok, ByteTokenizer) or n > args.before_max:
                    before = "-"  # the byte path was already incremental
                else:
                    seconds, old_text = _stream_seconds(RedecodeAll, tok, ids, args.repeats)
                    assert old_text == text, name
                    before = f"{seconds:.3f}"
                print(f"| {name} | {n:,} | {before} | {after:.4f} | {after / n * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
