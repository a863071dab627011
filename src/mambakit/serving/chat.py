"""Chat templates: the Jinja template of a checkpoint's tokenizer turns chat messages into one prompt.

The template is read as Hugging Face stores it: the "chat_template" field of tokenizer_config.json, or a
chat_template.jinja file beside it. It is rendered in Jinja's immutable sandbox (a template is data from
the checkpoint, not code to trust) with `messages`, `add_generation_prompt=True`, `bos_token` and
`eos_token`, as transformers' apply_chat_template does.
"""

from __future__ import annotations

import json
from pathlib import Path


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
    """A compiled chat template. render(messages) -> the prompt text.

    Example:
        >>> ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}assistant:", "", "\\0")
        ...     .render([{"role": "user", "content": "hi"}])
        'user: hi\\nassistant:'
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template cannot render these messages: {err}") from None
