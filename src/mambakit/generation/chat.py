"""A multi-turn conversation that keeps the model's recurrent state between turns (`mambakit chat`).

A Mamba model's state after a text is a few MB whatever the text's length, so a conversation need not be read again
at every turn: each turn reads only what is new since the last one (the template's text around the user's message,
up to the assistant's header) and then generates from there; the reply's tokens are read into the state once it is
done. A turn costs the same at the first message and the hundredth, where a model that rereads the conversation (or
keeps a KV cache) pays for its whole length.

What has been read is tracked as text: the conversation rendered with the chat template must begin with it, and the
new text is its continuation. A template that rewrites earlier text (or a reply the template would render
differently from the tokens the model generated) starts the state again from the whole conversation, so the
state always holds exactly the rendered conversation's text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..data import IncrementalDecoder
from ..data.chat import apply_chat_template
from .cuda_graph import CUDAGraphDecoder
from .generate import stream
from .state_file import SavedState, load_state, save_state
from .steps import model_device, prefill
from .stopping import StopTextFilter

__all__ = ["ChatSession"]


class ChatSession:
    """A conversation with a Mamba chat model (a tokenizer with a chat template), its state carried across turns.

    Args:
        model: a MambaLM without attention layers (their KV cache grows with the conversation: use `generate`).
        tokenizer: the checkpoint's tokenizer; its chat template renders the conversation, its `stop_ids` /
            `stop_strings` (generation_config.json) end a reply, and a reply shows no stop string.
        system: an optional system message that opens the conversation.
        cuda_graph: replay the decode step from one CUDA graph kept for the session (None: when the model is on
            CUDA). On a CPU the same decoder runs the eager step.

    Example:
        >>> chat = ChatSession(model, tokenizer)
        >>> print("".join(chat.reply("Which play is this from? ...", temperature=0)))
        >>> print("".join(chat.reply("And who speaks?")))       # reads only the new message, not the first turn
        >>> chat.messages, chat.tokens_in_state
    """

    def __init__(self, model: nn.Module, tokenizer, *, system: str | None = None, cuda_graph: bool | None = None):
        if getattr(model.config, "attn_layer_idx", None):
            raise ValueError("ChatSession keeps a Mamba model's fixed-size state between turns; this model has "
                             f"attention layers (attn_layer_idx={list(model.config.attn_layer_idx)}), whose cache "
                             "grows with the conversation: render each turn with `generate` instead")
        apply_chat_template(tokenizer, [{"role": "user", "content": ""}])  # DataError now if it has no template
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.stop_ids = list(getattr(tokenizer, "stop_ids", ()) or
                             ([] if tokenizer.eos_id is None else [tokenizer.eos_id]))
        self.stop_strings = [s for s in (getattr(tokenizer, "stop_strings", ()) or ()) if s]
        if cuda_graph is None:
            cuda_graph = model_device(model).type == "cuda"
        self._use_graph = bool(cuda_graph)
        self._decoder: CUDAGraphDecoder | None = None  # captured at the first reply, kept for every turn
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self._read_text = ""  # the rendered text the state holds
        self._state: SavedState | None = None
        self.last_read = 0  # tokens read before the last reply (the new text only, unless it started again)
        self.restarts = 0  # turns that had to read the whole conversation again

    @property
    def tokens_in_state(self) -> int:
        """Tokens the state has read: the whole conversation so far."""
        return 0 if self._state is None else self._state.tokens

    def _read(self, text: str) -> None:
        """Read the rendered conversation `text` into the state: its continuation of what was read, or all of it."""
        if not text.startswith(self._read_text):  # the template rewrote earlier text: start again
            self._state, self._read_text = None, ""
            self.restarts += 1
        ids = self.tokenizer.encode(text[len(self._read_text):])
        self.last_read = len(ids)
        if ids:
            cache, logits = prefill(self.model, [ids], None if self._state is None else self._state.cache)
            self._state = SavedState(cache, logits)
        self._read_text = text

    @torch.inference_mode()
    def reply(self, message: str, max_new_tokens: int = 256, *, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
              stop: Sequence[str] = (), seed: int | None = None) -> Iterator[str]:
        """Send the user's `message`; yield the reply's text as it is generated (no stop string in it). The reply
        joins `messages` and the state once the iterator is exhausted (or closed)."""
        if not isinstance(message, str):
            raise ValueError(f"ChatSession.reply: the message must be a string, got {type(message).__name__}")
        self.messages.append({"role": "user", "content": message})
        self._read(apply_chat_template(self.tokenizer, self.messages, add_generation_prompt=True))
        stops = self.stop_strings + [s for s in stop if s and s not in self.stop_strings]
        decoder, shown = IncrementalDecoder(self.tokenizer), StopTextFilter(stops)
        reply_ids: list[int] = []
        text = ""
        if self._use_graph and self._decoder is None:
            self._decoder = CUDAGraphDecoder(self.model, 1)
        try:
            for token in stream(self.model, [], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty,
                                eos_token_id=self.stop_ids or None, stop_strings=stops or None,
                                decode=self.tokenizer.decode if stops else None, seed=seed, state=self._state,
                                cuda_graph=self._decoder or False):
                reply_ids.append(token)
                if token in self.stop_ids:
                    break
                piece = shown.push(decoder.push(token))
                text += piece
                if piece:
                    yield piece
            tail = shown.push(decoder.flush()) + shown.flush()
            text += tail
            if tail:
                yield tail
        finally:
            self._finish(text, reply_ids)

    def save(self, path: str | Path) -> Path:
        """Write the conversation (its messages and the state after them) to a state file; `ChatSession.load`
        continues it later without reading it again. Raises ValueError before the first turn (no state yet)."""
        if self._state is None:
            raise ValueError("ChatSession.save: nothing to save before the first turn")
        record = {"messages": self.messages, "read_text": self._read_text, "system": self.system}
        return save_state(path, self.model, self._state.cache, self._state.logits,
                          metadata={"chat": json.dumps(record, ensure_ascii=False)})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, tokenizer, *, cuda_graph: bool | None = None) -> "ChatSession":
        """A session that goes on from a conversation `save` wrote (the same model: `load_state` checks it)."""
        saved = load_state(path, model)
        if "chat" not in saved.metadata:
            raise ValueError(f"{path}: a state file without a conversation (written by save_state, not "
                             "ChatSession.save): continue it with `generate --state`")
        record = json.loads(saved.metadata["chat"])
        session = cls(model, tokenizer, system=record["system"], cuda_graph=cuda_graph)
        session.messages, session._read_text, session._state = record["messages"], record["read_text"], saved
        return session

    def _finish(self, text: str, reply_ids: list[int]) -> None:
        """The reply joins the conversation, and its tokens the state (so the next turn reads only new text)."""
        self.messages.append({"role": "assistant", "content": text})
        if reply_ids:
            cache, logits = prefill(self.model, [reply_ids], self._state.cache)
            self._state = SavedState(cache, logits)
            self._read_text += self.tokenizer.decode(reply_ids)
