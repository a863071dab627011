"""The lm-evaluation-harness model "mambakit": importing this module registers it (needs the `lm_eval` extra).

    import mambakit.evaluation.lm_eval  # noqa: F401  (registers "mambakit")
    lm_eval.simple_evaluate(model="mambakit", model_args="pretrained=runs/shakespeare", tasks=["lambada_openai"])

or `mambakit eval --model DIR --tasks NAMES [--include-path DIR]` (cli/eval_tasks.py). Any checkpoint that
`MambaLM.from_pretrained` reads works: Mamba-1, Mamba-2, hybrids and the Transformer baselines, in the mambakit,
mamba_ssm and Hugging Face formats, with the tokenizer saved beside it (or `tokenizer=PATH`).

The three request types, all through `mambakit.evaluation.score` and `mambakit.generation.generate`:

- loglikelihood(context, continuation): context and continuation are tokenized as lm-eval's TemplateLM does
  (the whole string, then split at the context's tokens); the row (context + continuation, truncated from the
  left to max_length + 1 tokens) is scored and the continuation's log-probs summed; "is greedy" when every
  continuation token is the model's argmax. An empty context conditions on the end-of-document token.
- loglikelihood_rolling(text): the document's tokens after the end-of-document token, in lm-eval's disjoint
  windows of max_length predictions (one window when the document fits), summed.
- generate_until(context, {until, max_gen_toks, do_sample, temperature}): greedy unless do_sample, stopped at
  the end-of-document token or the first `until` string, the text cut before it.

Batches: requests are sorted longest first and cut into batches of `batch_size` rows, so rows of a batch have
similar lengths; a batch of ragged rows is one model call, left-padded with `seq_idx` so that padding never reaches
a row's state or attention (each row scores exactly as it would alone). Results come back in request order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own names first: its registry imports them only while it is empty
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..generation import generate
from .score import score

__all__ = ["MambakitLM"]

DEFAULT_BATCH_SIZE = 16


def _device(name: str | torch.device | None) -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batch_size(value) -> int:
    """lm-eval passes an int, a digit string, "auto" or "auto:N"; mambakit batches by count, "auto" means the default."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    raise ValueError(f"mambakit lm-eval model: batch_size must be a positive int or 'auto', got {value!r}")


@register_model("mambakit")
class MambakitLM(TemplateLM):
    """lm-eval model over a mambakit language model.

    Args (model_args): pretrained (a checkpoint directory or Hub id) or model (a MambaLM / TransformerLM object,
        with `tokenizer`); tokenizer (a mambakit tokenizer object, or a directory / tokenizer.json path; default:
        the checkpoint's); device ("auto", "cpu", "cuda", ...); dtype ("float32", "bfloat16", ...; default the
        checkpoint's); batch_size (rows per model call); max_length (tokens of context a prediction sees, default
        2048; a gpt3 Transformer's learned positions cap it).

    Example:
        >>> lm = MambakitLM(pretrained="runs/shakespeare", device="cpu", batch_size=8)
        >>> lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="tasks/"))
    """

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, device: str | None = "auto",
                 dtype: str | None = None, batch_size=DEFAULT_BATCH_SIZE, max_batch_size=None, max_length: int = 2048,
                 revision: str | None = None, **kwargs):
        super().__init__()
        if kwargs:  # a misspelt model_arg would otherwise be ignored without a word
            raise ValueError(f"mambakit lm-eval model: unknown model_args {sorted(kwargs)}; it takes pretrained, model, "
                             "tokenizer, device, dtype, batch_size, max_batch_size, max_length, revision")
        if (pretrained is None) == (model is None):
            raise ValueError("mambakit lm-eval model: give exactly one of pretrained=DIR (model_args) or model=OBJECT")
        if model is None:
            from ..checkpoints import load_pretrained

            torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype), None)
            if dtype not in (None, "auto") and not isinstance(torch_dtype, torch.dtype):
                raise ValueError(f"mambakit lm-eval model: dtype must name a torch dtype (float32, bfloat16), got {dtype!r}")
            model = load_pretrained(pretrained, dtype=torch_dtype, device=_device(device), revision=revision)
        self.model = model.eval()
        self.tokenizer = self._load_tokenizer(tokenizer, pretrained, revision)
        if self.tokenizer.eos_id is None:
            raise ValueError("mambakit lm-eval model: the tokenizer has no end-of-document token (lm-eval conditions "
                             "empty contexts and rolling windows on it)")
        self.batch_size_per_call = _batch_size(batch_size)
        limit = getattr(model.config, "max_position_embeddings", None) if getattr(model.config, "arch", "") == "gpt3" \
            else None
        self.max_length = int(max_length) if limit is None else min(int(max_length), limit - 1)
        if self.max_length < 1:
            raise ValueError(f"mambakit lm-eval model: max_length must be positive, got {max_length!r}")

    @staticmethod
    def _load_tokenizer(tokenizer, pretrained, revision):
        from ..checkpoints import load_checkpoint_tokenizer

        if tokenizer is None:
            if pretrained is None:
                raise ValueError("mambakit lm-eval model: model=OBJECT needs tokenizer=... too")
            return load_checkpoint_tokenizer(pretrained, revision=revision)
        if isinstance(tokenizer, (str, Path)):
            path = Path(tokenizer)
            if path.is_file():
                from ..data import HFTokenizer

                return HFTokenizer(path)
            return load_checkpoint_tokenizer(path)
        return tokenizer

    # ---------------------------------------------------------------- TemplateLM's interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---------------------------------------------------------------- scoring

    def _score_rows(self, rows: list[tuple[list[int], int]], disable_tqdm: bool, desc: str) -> list[tuple[float, bool]]:
        """(tokens, n) rows -> (sum of the log-probs of the last n tokens, whether each was the argmax), in order.

        Rows run longest first in batches of batch_size; each batch is one `score` call over ragged rows.
        """
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc=desc)
        for start in range(0, len(order), self.batch_size_per_call):
            idx = order[start:start + self.batch_size_per_call]
            tokens = [rows[i][0] for i in idx]
            n_last = max(rows[i][1] for i in idx)
            logps, argmax = score(self.model, tokens, last=n_last, return_argmax=True)
            for i, lp, am in zip(idx, logps, argmax):
                row, n = rows[i]
                n = min(n, len(row) - 1)
                target = torch.tensor(row[len(row) - n:], device=am.device)
                out[i] = (float(lp[lp.numel() - n:].double().sum()), bool((am[am.numel() - n:] == target).all()))
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("mambakit lm-eval model: a loglikelihood request with an empty continuation")
            rows.append(((context_enc + continuation_enc)[-(self.max_length + 1):], len(continuation_enc)))
        results = self._score_rows(rows, disable_tqdm, "loglikelihood")
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            for context, predicted in map(lm_utils.make_disjoint_window, windows):
                rows.append((context + predicted, len(predicted)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._score_rows(rows, disable_tqdm, "loglikelihood_rolling")):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            gen_kwargs = dict(args[members[0]][1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            keep = max(1, self.max_length - max_new)  # context tokens that leave room for the new ones
            encoded = {i: (self.tok_encode(args[i][0]) or [self.eot_token_id])[-keep:] for i in members}
            members = sorted(members, key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self.batch_size_per_call):
                idx = members[start:start + self.batch_size_per_call]
                new = generate(self.model, [encoded[i] for i in idx], max_new, temperature=temperature,
                               eos_token_id=self.eot_token_id, stop_strings=until or None,
                               decode=self.tok_decode if until else None, seed=0 if temperature > 0 else None)
                for i, tokens in zip(idx, new):
                    out[i] = _cut(self.tok_decode([t for t in tokens if t != self.eot_token_id]), until)
                    self.cache_hook.add_partial("generate_until", args[i], out[i])
                bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]


def _cut(text: str, until: list[str]) -> str:
    """The text before the earliest stop string (lm-eval's convention: the stop string itself is not returned)."""
    cuts = [text.find(s) for s in until if s and s in text]
    return text[:min(cuts)] if cuts else text

