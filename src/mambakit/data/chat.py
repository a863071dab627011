"""Chat templates: a conversation rendered into the prompt text a chat model was trained on.

A checkpoint's tokenizer_config.json ("chat_template") or chat_template.jinja holds a Jinja template. It is
rendered here with the same Jinja settings and helpers as transformers' `apply_chat_template`, so the
prompt is the same text, character for character:

    environment   jinja2's immutable sandbox, trim_blocks and lstrip_blocks on, the loop-controls extension
                  ({% break %}, {% continue %}) and `{% generation %}...{% endgeneration %}` (rendered as
                  its body; transformers uses it to mark assistant tokens)
    variables     messages, tools, documents, add_generation_prompt, and the tokenizer's special tokens
                  (bos_token, eos_token, pad_token, unk_token, ...), plus any keyword given
    helpers       tojson (json.dumps without HTML escaping, ensure_ascii off; indent, separators,
                  sort_keys), raise_exception(message), strftime_now(format)

A template's raise_exception, and any template error, is a DataError naming the template's source.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .errors import DataError

__all__ = ["render_chat_template", "apply_chat_template"]


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the characters themselves.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise DataError("chat templates need jinja2: pip install jinja2 (or pip install 'mambakit[data]')") from err

    class GenerationBlock(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: renders its body (it only marks the assistant's text)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as err:
        raise DataError(f"the chat template does not parse: {err}") from err


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                         special_tokens: dict[str, str] | None = None, tools: list[dict] | None = None,
                         documents: list[dict] | None = None, **kwargs) -> str:
    """The prompt text of `messages` ([{"role": "user", "content": "..."}, ...]) under Jinja `template`.

    Args:
        add_generation_prompt: end with the header of the assistant's turn (what the model continues).
        special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...}, visible to the template by name.
        kwargs: further template variables (they override special_tokens of the same name).

    Example:
        >>> render_chat_template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\\n{% endfor %}"
        ...                      "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        ...                      [{"role": "user", "content": "Hi"}])
        '<|user|>Hi\\n<|assistant|>'
    """
    import jinja2

    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r}")
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return _compile(template).render(messages=messages, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as err:
        raise DataError(f"the chat template failed: {err}") from err


def apply_chat_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
    """`render_chat_template` with the tokenizer's own template and special tokens (as a checkpoint loads them).

    Raises DataError when the tokenizer has no chat template.

    Example:
        >>> tok = load_checkpoint_tokenizer("org/chat-model")
        >>> ids = tok.encode(apply_chat_template(tok, [{"role": "user", "content": "Hello"}]))
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        where = getattr(tokenizer, "path", None)
        raise DataError(f"the tokenizer{f' of {where}' if where else ''} has no chat template (no \"chat_template\" "
                        "in tokenizer_config.json and no chat_template.jinja): it is not a chat model; "
                        "give the prompt as plain text")
    return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                special_tokens=getattr(tokenizer, "special_tokens", None) or {}, **kwargs)
