"""Conversations for supervised fine-tuning: read, rendered with a chat template, tokenized with a loss mask.

A conversation is a list of messages {"role": "system" | "user" | "assistant" | ..., "content": "..."}. Files:

    .jsonl   one conversation per line: {"messages": [...]}, the list of messages itself, or a prompt and its
             answer {"prompt": "...", "completion": "..."} (a user and an assistant message)
    .json    a list of such conversations (or {"conversations": [...]})
    a folder every .jsonl / .json file in it, in sorted order

Only the assistant's turns are scored. For each assistant message i the template is rendered twice: messages[:i]
with the generation prompt (what a chat request hands the model) and messages[:i + 1] without it; what the second
adds to the first is the assistant's part (its text and the template's end of turn, e.g. "<|im_end|>\\n"), and it is
scored; everything else (system, user, the template's headers) is context only. The pieces are tokenized one by one
and joined, so the prompt tokens are exactly those a chat request would give the model, followed by the answer's.

The template is the tokenizer's own (a chat model's chat_template) or, for a model without one, DEFAULT_CHAT_TEMPLATE:
plain role headers and "<|end|>" closing each turn, which generation stops at (DEFAULT_STOP, saved with the model as
a stop string). A template that is not a prefix-extending rendering of the conversation (rendering more messages
changes the earlier text) is refused, as no tokens could then be told apart.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import render_chat_template
from .errors import DataError
from .stream import TokenStream

__all__ = ["DEFAULT_CHAT_TEMPLATE", "DEFAULT_STOP", "load_conversations", "encode_conversation",
           "ConversationStreams", "conversation_streams", "conversation_stream", "chat_template_of", "conversation_spans",
           "unreached_scored", "conversation_windows"]

DEFAULT_STOP = "<|end|>"
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + DEFAULT_STOP
                         + "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _messages(item, where: str) -> list[dict]:
    """One conversation of a file, as a checked list of messages."""
    if isinstance(item, dict) and "messages" in item:
        item = item["messages"]
    elif isinstance(item, dict) and "prompt" in item and "completion" in item:
        item = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["completion"]}]
    if not isinstance(item, list) or not item:
        raise DataError(f"{where}: a conversation is a non-empty list of messages, {{\"messages\": [...]}} or "
                        f"{{\"prompt\": ..., \"completion\": ...}}; got {str(item)[:80]!r}")
    for m in item:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: every message needs a string \"role\" and \"content\"; got {str(m)[:80]!r}")
    roles = [m["role"] for m in item]
    if "assistant" not in roles:
        raise DataError(f"{where}: the conversation has no assistant message: nothing to learn from it")
    if roles[0] == "assistant":
        raise DataError(f"{where}: the conversation starts with the assistant; a chat template renders the turns "
                        "after a user or system message")
    return item


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every conversation of a .jsonl / .json file or of the .jsonl / .json files of a folder (see the module
    docstring for the layouts), in order. Raises DataError naming the file and line of a malformed one.

    Example:
        >>> load_conversations("chats.jsonl")[0]
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json"))
        if not files:
            raise DataError(f"{path}: no .jsonl or .json files of conversations in it")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    conversations = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{f}:{n}: not JSON: {err}") from None
                    conversations.append(_messages(item, f"{f}:{n}"))
        else:
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{f}: not JSON: {err}") from None
            if isinstance(items, dict) and isinstance(items.get("conversations"), list):
                items = items["conversations"]
            if not isinstance(items, list):
                raise DataError(f"{f}: a .json file of conversations holds a list of them")
            conversations.extend(_messages(item, f"{f}[{i}]") for i, item in enumerate(items))
    if not conversations:
        raise DataError(f"{path}: no conversations in it")
    return conversations


def chat_template_of(tokenizer, template: str | None = None) -> tuple[str, tuple[str, ...]]:
    """The template a fine-tuning run renders with, and the stop strings generation needs with it.

    Args:
        template: None (the tokenizer's chat template, else DEFAULT_CHAT_TEMPLATE), "default"
            (DEFAULT_CHAT_TEMPLATE), or the path of a Jinja file.
    Returns:
        (template text, stop strings): DEFAULT_STOP with the default template; the tokenizer's own stop strings
        with its own template (its end of turn is usually a stop token already); none with a file's.
    """
    if template == "default":
        return DEFAULT_CHAT_TEMPLATE, (DEFAULT_STOP,)
    if template:
        p = Path(template)
        if not p.is_file():
            raise DataError(f"chat template {template}: no such file (give a Jinja file, or 'default')")
        return p.read_text(encoding="utf-8"), ()
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own, tuple(getattr(tokenizer, "stop_strings", ()) or ())
    return DEFAULT_CHAT_TEMPLATE, (DEFAULT_STOP,)


def encode_conversation(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` rendered with `template`, and for each id whether it is scored (the assistant's).

    Returns:
        ids: list of L ints; scored: list of L bools, True on the assistant's tokens (text and end of turn).

    Example:
        >>> ids, scored = encode_conversation(ByteTokenizer(), [{"role": "user", "content": "Hi"},
        ...                                                     {"role": "assistant", "content": "Yo"}],
        ...                                   DEFAULT_CHAT_TEMPLATE)
        >>> ByteTokenizer().decode([i for i, s in zip(ids, scored) if s])
        'Yo<|end|>\\n'
    """
    special = getattr(tokenizer, "special_tokens", None) or {}

    def render(upto: int, prompt: bool) -> str:
        return render_chat_template(template, messages[:upto], add_generation_prompt=prompt, special_tokens=special)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the chat template does not extend its own text as messages are added (rendering "
                            f"message {i} changes the text before it), so the assistant's tokens cannot be told "
                            "apart: give another template (--chat-template)")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(len(messages), False)
    if rest.startswith(done) and len(rest) > len(done):
        pieces.append((rest[len(done):], False))
    ids: list[int] = []
    scored: list[bool] = []
    for text, is_scored in pieces:
        if text:
            piece = tokenizer.encode(text)
            ids += piece
            scored += [is_scored] * len(piece)
    return ids, scored


@dataclass
class ConversationStreams:
    """A conversation set tokenized for training: held-out split, streams with their scored masks, counts."""

    train: TokenStream  # .scored: (ntokens,) bool
    val: TokenStream
    n_train: int  # conversations
    n_val: int
    template: str
    stop_strings: tuple[str, ...]
    val_conversations: list[list[dict]]  # the held-out conversations, in the files' order


def _stream(encoded: list[tuple[list[int], list[bool]]], tokenizer) -> TokenStream:
    """conv_1 conv_2 ... with the `scored` and `starts` masks (TokenStream): no separator token between them, so a
    conversation reads exactly as a chat request renders it, from an empty state (the state restarts at each
    start)."""
    ids: list[int] = []
    scored: list[bool] = []
    starts: list[bool] = []
    for conv_ids, conv_scored in encoded:
        if not conv_ids:
            continue
        ids += conv_ids
        scored += conv_scored
        starts += [True] + [False] * (len(conv_ids) - 1)
    dtype = torch.uint8 if tokenizer.vocab_size <= 256 else torch.int32
    stream = TokenStream(torch.tensor(ids, dtype=dtype), tokenizer)
    stream.scored = torch.tensor(scored, dtype=torch.bool)
    stream.starts = torch.tensor(starts, dtype=torch.bool)
    return stream


def _encode_all(conversations: list[list[dict]], tokenizer, template: str,
                progress: bool) -> list[tuple[list[int], list[bool]]]:
    """`encode_conversation` of each conversation, under a progress bar."""
    from tqdm.auto import tqdm

    return [encode_conversation(tokenizer, c, template)
            for c in tqdm(conversations, desc="tokenize", unit="conv", disable=not progress, leave=False)]


def conversation_streams(path: str | Path, tokenizer, val_fraction: float = 0.05, *, template: str | None = None,
                         seed: int = 0, train_loss: str = "assistant", progress: bool = False) -> ConversationStreams:
    """Load the conversations at `path`, hold out a seeded random `val_fraction` of them (at least one, and at
    least one left to train on), render and tokenize each (`encode_conversation`) and pack each split into a stream.

    The held-out set depends on the conversations' order in the files and the seed only. `template` as in
    `chat_template_of`. `train_loss` "all" scores every training token but each conversation's first (the
    baseline without a loss mask); the held-out stream always scores the assistant's tokens only.

    Example:
        >>> data = conversation_streams("chats.jsonl", tokenizer, 0.05)
        >>> data.train.scored.float().mean()      # share of the training tokens that are the assistant's
    """
    conversations = load_conversations(path)
    if len(conversations) < 2:
        raise DataError(f"{path}: {len(conversations)} conversation: at least two are needed (one is held out)")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    template, stops = chat_template_of(tokenizer, template)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(val_fraction * len(conversations))), len(conversations) - 1)
    val_ids = set(order[:n_val])
    encoded = _encode_all(conversations, tokenizer, template, progress)
    if train_loss not in ("assistant", "all"):
        raise DataError(f"train_loss must be 'assistant' or 'all', got {train_loss!r}")
    train = _stream([e for i, e in enumerate(encoded) if i not in val_ids], tokenizer)
    if train_loss == "all":
        train.scored = ~train.starts
    val = _stream([e for i, e in enumerate(encoded) if i in val_ids], tokenizer)
    if not bool(train.scored.any()):
        raise DataError(f"{path}: the training conversations have no assistant tokens after rendering")
    return ConversationStreams(train, val, len(conversations) - n_val, n_val, template, stops,
                               [c for i, c in enumerate(conversations) if i in val_ids])


def conversation_stream(path: str | Path, tokenizer, *, template: str | None = None,
                        progress: bool = False) -> tuple[TokenStream, int, str]:
    """Every conversation at `path`, in the files' order, rendered and tokenized as `conversation_streams` does and
    packed into one stream that scores the assistant's tokens only: what `mambakit eval --chat` reads.

    Returns:
        (stream, number of conversations, the template rendered with); stream.scored and .starts: (ntokens,) bool.
    """
    conversations = load_conversations(path)
    template, _ = chat_template_of(tokenizer, template)
    stream = _stream(_encode_all(conversations, tokenizer, template, progress), tokenizer)
    if not bool(stream.scored.any()):
        raise DataError(f"{path}: the conversations have no assistant tokens after rendering")
    return stream, len(conversations), template


def unreached_scored(stream: TokenStream, seqlen: int) -> tuple[int, int, int]:
    """What training windows of `seqlen` targets never score in a conversation stream: a window starts at a
    conversation's first token, so a scored token more than seqlen tokens after it is never a target.

    Returns:
        (scored tokens never reached, scored tokens, the longest conversation's length in tokens).
    """
    if stream.starts is None or stream.scored is None:
        raise ValueError("unreached_scored: not a conversation stream (no `starts` / `scored` masks)")
    n = len(stream)
    if n == 0:
        return 0, 0, 0
    first = torch.nonzero(stream.starts).flatten()
    conv = torch.cumsum(stream.starts.long(), 0) - 1  # (n,) each token's conversation
    offset = torch.arange(n) - first[conv.clamp(min=0)]
    far = stream.scored & (offset > seqlen)
    longest = int(torch.diff(torch.cat([first, torch.tensor([n])])).max()) if first.numel() else n
    return int(far.sum()), int(stream.scored.sum()), longest


def conversation_spans(stream: TokenStream, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """[start, end) token ranges of a conversation stream's conversations, in order: all of them, or the first ones
    up to the one that reaches `max_tokens` tokens (at least one)."""
    if stream.starts is None:
        raise ValueError("conversation_spans: the stream has no `starts` mask (not a conversation stream)")
    bounds = torch.nonzero(stream.starts).flatten().tolist() + [len(stream)]
    spans = []
    for a, b in zip(bounds, bounds[1:]):
        spans.append((a, b))
        if max_tokens is not None and b >= max_tokens:
            break
    return spans


def conversation_windows(stream: TokenStream, seqlen: int, batch_size: int, max_tokens: int | None = None,
                         rank: int = 0, world_size: int = 1, spans: list[tuple[int, int]] | None = None):
    """Held-out windows of a conversation stream that never cut a conversation's context: one row per conversation,
    from its first token (an empty state, as a chat request), padded at the end; a conversation longer than
    seqlen + 1 tokens is read in pieces of seqlen targets, each from an empty state. Rows come in batches of up to
    `batch_size`; row i belongs to rank i % world_size. Together the rows score every target inside the
    conversations of `conversation_spans(stream, max_tokens)` exactly once.

    `spans`: `conversation_spans(stream, max_tokens)` when the caller has it already.

    Yields:
        (tokens, scored, starts): (b, l + 1) int64, bool, bool; l <= seqlen the batch's longest row; padding is
        token 0, never scored.
    """
    pieces = []
    for a, b in (conversation_spans(stream, max_tokens) if spans is None else spans):
        for lo in range(a, b - 1, seqlen):
            pieces.append((lo, min(lo + seqlen + 1, b)))
    mine = pieces[rank::world_size]
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        width = max(hi - lo for lo, hi in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)
        starts = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (lo, hi) in enumerate(batch):
            tokens[row, :hi - lo] = stream.tokens[lo:hi]
            scored[row, :hi - lo] = stream.scored[lo:hi]
            starts[row, 0] = True
        yield tokens, scored, starts
