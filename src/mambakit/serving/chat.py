"""Chat templates: the Jinja template of a checkpoint's tokenizer turns chat messages into one prompt.

The template is read as Hugging Face stores it: the "chat_template" field of tokenizer_config.json, or a
chat_template.jinja file beside it, and rendered by `mambakit.data.chat` with `messages`,
`add_generation_prompt=True` and the tokenizer's special tokens, as transformers' apply_chat_template does.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.chat import render_chat_template
from ..data.errors import DataError


class ChatTemplateError(ValueError):
    """The template failed to render these messages (HTTP 400)."""


def load_chat_template(directory: str | Path) -> str | None:
    """The checkpoint's chat template text, or None when it has none."""
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            return named.get("default")
    return None


class ChatTemplate:
    """A checkpoint's chat template. render(messages) -> the prompt text.

    Rendering is `mambakit.data.chat.render_chat_template` (the Jinja environment and helpers transformers
    gives templates: tojson, loop controls, raise_exception, strftime_now, the generation block); a failure
    becomes a ChatTemplateError (HTTP 400).

    Example:
        >>> ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}assistant:")
        ...     .render([{"role": "user", "content": "hi"}])
        'user: hi\\nassistant:'
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict]) -> str:
        try:
            return render_chat_template(self.source, messages, special_tokens=self.special_tokens)
        except DataError as err:
            raise ChatTemplateError(f"the chat template cannot render these messages: {err}") from None
