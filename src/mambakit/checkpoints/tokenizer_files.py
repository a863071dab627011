"""The tokenizer kept beside a checkpoint's weights, read and written through mambakit.data.

    tokenizer_config.json   mambakit.data's {"type": "bytes"} or {"type": "hf", "eos_token": ...}; in a
                            Hugging Face directory also transformers' own fields (the two share the file:
                            every field is kept and each reader ignores what it does not know)
    tokenizer.json          a Hugging Face `tokenizers` file (e.g. GPT-NeoX-20B's), type "hf" only

A Hugging Face model folder (tokenizer_config.json without "type", or none) reads as the first of
    tokenizer.json     -> HFTokenizer                (the `tokenizers` package)
    tokenizer.model    -> SentencePieceTokenizer     (the `sentencepiece` package)
    anything else      -> TransformersTokenizer      (transformers' AutoTokenizer, when installed)
and its special tokens come from the checkpoint's configs, never from guesses at token names:
    ids      generation_config.json, then config.json       (bos/eos/pad_token_id; eos may be a list)
    names    tokenizer_config.json, then special_tokens_map.json   (bos_token, eos_token, ...)
eos_id is the first end-of-sequence id found, `stop_ids` every one of them. The chat template is
tokenizer_config.json's "chat_template" (a string, or a list of named templates: "default") or
chat_template.jinja; texts that end generation, generation_config.json's "stop_strings".
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import CheckpointError
from .io import CONFIG_NAME, GENERATION_CONFIG, read_json, write_json

__all__ = ["TOKENIZER_FILES", "has_tokenizer", "load_checkpoint_tokenizer", "save_tokenizer", "save_checkpoint_fields",
           "copy_tokenizer"]

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
# What a converted checkpoint carries across: mambakit's two files and transformers' companions.
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "added_tokens.json",
                   "vocab.json", "merges.txt", SENTENCEPIECE_MODEL, CHAT_TEMPLATE_FILE)
# transformers' names of the special tokens (what chat templates see)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (TOKENIZER_CONFIG, TOKENIZER_JSON, SENTENCEPIECE_MODEL))


def _token_text(token) -> str | None:
    # transformers writes special tokens as plain strings, or as {"content": ..., ...} in older files
    return token.get("content") if isinstance(token, dict) else token


def load_checkpoint_tokenizer(directory: str | Path, revision: str | None = None):
    """The tokenizer saved with a checkpoint, with the special tokens and chat template its configs give.

    A mambakit.data ByteTokenizer, HFTokenizer or SentencePieceTokenizer, or a TransformersTokenizer for a
    Hugging Face folder only transformers reads (see the module docstring for the order and the sources).
    `directory` may be a Hub id (at `revision`), resolved as load_pretrained resolves it.

    Example:
        >>> tok = load_checkpoint_tokenizer("state-spaces/mamba-130m-hf")      # tokenizer.json of GPT-NeoX-20B
        >>> tok.eos_id, tok.stop_ids
        (0, (0,))
    """
    from ..data import DataError, HFTokenizer, SentencePieceTokenizer, TransformersTokenizer, load_tokenizer
    from .hub import resolve_checkpoint

    if not Path(directory).is_dir() or revision is not None:
        directory = resolve_checkpoint(directory, revision)  # the name as given: Path() would drop a leading ./
    directory = Path(directory)
    cfg = read_json(directory / TOKENIZER_CONFIG) if (directory / TOKENIZER_CONFIG).is_file() else {}
    names = _special_names(directory, cfg)
    try:
        if "type" in cfg:
            tokenizer = load_tokenizer(directory)  # mambakit's own (bytes, hf, sentencepiece)
        elif (directory / TOKENIZER_JSON).is_file():
            tokenizer = HFTokenizer(directory, eos_token=names.get("eos_token"), guess_eos=False)
        elif (directory / SENTENCEPIECE_MODEL).is_file():
            tokenizer = SentencePieceTokenizer(directory, eos_token=names.get("eos_token"),
                                               added_tokens=_added_tokens(cfg))
        elif (directory / TOKENIZER_CONFIG).is_file() or (directory / "vocab.json").is_file():
            tokenizer = TransformersTokenizer(directory)
        else:
            tokenizer = load_tokenizer(directory)  # no tokenizer at all: its error names the files looked for
        _apply_checkpoint_fields(tokenizer, directory, cfg, names)
    except DataError as err:
        raise CheckpointError(f"{directory}: cannot load the checkpoint's tokenizer: {err}") from err
    return tokenizer


def _special_names(directory: Path, cfg: dict) -> dict[str, str]:
    """{"bos_token": "<s>", ...} from tokenizer_config.json, then special_tokens_map.json."""
    smap = read_json(directory / SPECIAL_TOKENS_MAP) if (directory / SPECIAL_TOKENS_MAP).is_file() else {}
    names = {}
    for name in SPECIAL_NAMES:
        text = _token_text(cfg.get(name))
        if text is None:
            text = _token_text(smap.get(name))
        if isinstance(text, str):
            names[name] = text
    return names


def _added_tokens(cfg: dict) -> dict[str, int]:
    """transformers' added_tokens_decoder ({"32000": {"content": "<|im_start|>", ...}}) as {text: id}."""
    added = {}
    for key, token in (cfg.get("added_tokens_decoder") or {}).items():
        text = _token_text(token)
        if isinstance(text, str) and str(key).isdigit():
            added[text] = int(key)
    return added


def _config_ids(directory: Path, field: str) -> list[int]:
    """`field` (e.g. "eos_token_id") from generation_config.json, else config.json, as a list (may be empty)."""
    for name in (GENERATION_CONFIG, CONFIG_NAME):
        path = directory / name
        value = read_json(path).get(field) if path.is_file() else None
        if value is not None:
            values = value if isinstance(value, list) else [value]
            return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    return []


def _apply_checkpoint_fields(tokenizer, directory: Path, cfg: dict, names: dict[str, str]) -> None:
    """Set bos_id / eos_id / pad_id / stop_ids / special_tokens / chat_template from the checkpoint's configs."""
    to_id = getattr(tokenizer, "token_to_id", None)
    to_token = getattr(tokenizer, "id_to_token", None)

    def ids_of(kind: str) -> list[int]:
        ids = [i for i in _config_ids(directory, f"{kind}_token_id") if i < tokenizer.vocab_size]
        named = names.get(f"{kind}_token")
        if named is not None and to_id is not None and to_id(named) is not None and to_id(named) not in ids:
            ids.append(to_id(named))
        return ids

    eos = ids_of("eos")
    if eos:
        tokenizer.eos_id = eos[0]
    bos, pad = ids_of("bos"), ids_of("pad")
    tokenizer.bos_id = bos[0] if bos else None
    tokenizer.pad_id = pad[0] if pad else None
    tokenizer.stop_ids = tuple(dict.fromkeys(eos or ([] if tokenizer.eos_id is None else [tokenizer.eos_id])))
    special = dict(names)
    for kind, ids in (("bos", bos), ("eos", eos), ("pad", pad)):
        if f"{kind}_token" not in special and ids and to_token is not None and to_token(ids[0]) is not None:
            special[f"{kind}_token"] = to_token(ids[0])
    tokenizer.special_tokens = special
    template = _chat_template(directory, cfg)
    if template is not None:
        tokenizer.chat_template = template
    gen = directory / GENERATION_CONFIG
    stops = read_json(gen).get("stop_strings") if gen.is_file() else None
    if isinstance(stops, str):
        stops = [stops]
    if isinstance(stops, list):
        tokenizer.stop_strings = tuple(s for s in stops if isinstance(s, str) and s)


def _chat_template(directory: Path, cfg: dict) -> str | None:
    if (directory / CHAT_TEMPLATE_FILE).is_file():  # transformers >= 4.50 saves it here
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def _finish_config(directory: Path, hf: bool) -> None:
    """Make tokenizer_config.json readable by mambakit.data and, in a Hugging Face directory, by transformers."""
    path = directory / TOKENIZER_CONFIG
    cfg = read_json(path) if path.is_file() else {}
    if "type" not in cfg:
        if not (directory / TOKENIZER_JSON).is_file():
            return  # e.g. a sentencepiece folder: read as a Hugging Face folder, left as it came
        cfg["type"] = "hf"
    if cfg["type"] == "hf":
        cfg["eos_token"] = _token_text(cfg.get("eos_token"))
        if hf:
            cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # what transformers 4.x needs to load it
    write_json(path, cfg)


def save_tokenizer(tokenizer, directory: Path, format: str) -> None:
    """tokenizer.save(directory), plus transformers' fields when the checkpoint is in the "hf" format, plus what
    the tokenizer's own files do not hold but a checkpoint's configs gave it (`save_checkpoint_fields`)."""
    tokenizer.save(directory)
    _finish_config(directory, hf=format == "hf")
    save_checkpoint_fields(tokenizer, Path(directory))


def save_checkpoint_fields(tokenizer, directory: Path) -> None:
    """Write back what `load_checkpoint_tokenizer` took from a checkpoint's configs rather than from the tokenizer's
    own files, so that loading `directory` gives it again: the chat template (chat_template.jinja), the special
    token names (tokenizer_config.json: bos_token, pad_token, ...; a name already there is kept), the bos, pad and
    every stop id, and the stop strings (generation_config.json's bos_token_id, pad_token_id, eos_token_id and
    stop_strings, merged into one that is there). Without it a model fine-tuned from a chat model would be saved without its template and stop tokens.
    A tokenizer with none of these fields (e.g. a plain ByteTokenizer) writes nothing."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        (directory / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    names = {k: v for k, v in (getattr(tokenizer, "special_tokens", None) or {}).items()
             if k in SPECIAL_NAMES and isinstance(v, str)}
    path = directory / TOKENIZER_CONFIG
    if names and path.is_file():
        cfg = read_json(path)
        write_json(path, {**names, **cfg})
    ids: dict = {}
    for field, value in (("bos_token_id", getattr(tokenizer, "bos_id", None)),
                         ("pad_token_id", getattr(tokenizer, "pad_id", None))):
        if value is not None:
            ids[field] = int(value)
    eos = getattr(tokenizer, "eos_id", None)
    stops = [int(i) for i in dict.fromkeys(([] if eos is None else [eos]) + list(getattr(tokenizer, "stop_ids", ())))]
    if stops and stops != ([] if eos is None else [eos]):
        ids["eos_token_id"] = stops  # the first is eos_id, the rest also end generation
    stop_strings = [s for s in getattr(tokenizer, "stop_strings", ()) or () if isinstance(s, str) and s]
    if stop_strings:
        ids["stop_strings"] = stop_strings  # transformers' GenerationConfig field of the same name
    if ids:
        gen = directory / GENERATION_CONFIG
        write_json(gen, {**(read_json(gen) if gen.is_file() else {}), **ids})


def copy_tokenizer(src: Path, dst: Path, format: str) -> list[str]:
    """Copy the tokenizer files of checkpoint `src` into `dst` as they are (transformers' extra fields and files
    included), then complete tokenizer_config.json for the target format. Returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if copied:
        _finish_config(dst, hf=format == "hf")
    return copied
