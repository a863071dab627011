"""Training loop, evaluation (bits per byte), checkpoint/resume and DDP gradient equivalence (CPU, gloo)."""

from __future__ import annotations

import logging
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mambakit.data import ByteTokenizer, Document, HFTokenizer, RandomWindows, TokenStream, load_corpus
from mambakit.evaluation import evaluate_bits_per_byte, token_nll_sum
from mambakit.models import MambaLM
from mambakit.training import (
    TrainConfig,
    build_optimizer,
    forward_backward,
    load_train_state,
    lr_at,
    model_config,
    read_metrics,
    train,
)
from mambakit.training.loop import steady_rate
from tests.helpers import assert_close

LAYERS = [pytest.param("mamba2", id="mamba2"), pytest.param("mamba1", id="mamba1")]


def _corpus(directory) -> str:
    """A small learnable corpus: 24 short documents of repeated verse."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["to be or not to be that is the question\n", "the rest is silence\n", "all the world's a stage\n"]
    for i in range(24):
        (directory / f"doc{i:02d}.txt").write_text("".join(lines[(i + j) % 3] for j in range(12)))
    return str(directory)


def _tiny(tmp_path, layer: str = "mamba2", **changes) -> TrainConfig:
    cfg = TrainConfig(recipe="test", data=_corpus(tmp_path / "data"), layer=layer, d_model=16, n_layer=1, d_state=8,
                      expand=2, headdim=8, chunk_size=16, seqlen=32, batch_size=4, lr=1e-2, warmup_steps=3,
                      max_steps=30, eval_every=0, eval_tokens=256, final_eval_tokens=512, eval_batch_size=4,
                      log_every=5, progress=False, sample_tokens=0, val_fraction=0.1, out_dir=str(tmp_path / "run"))
    return cfg.replace(**changes)


def _tiny_model(layer: str = "mamba2", vocab: int = 256) -> MambaLM:
    torch.manual_seed(0)
    return MambaLM(model_config(TrainConfig(layer=layer, d_model=16, n_layer=1, d_state=8, headdim=8, chunk_size=16), vocab))


# ---------------------------------------------------------------- schedule and optimizer

def test_lr_schedule_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


@pytest.mark.parametrize("layer", LAYERS)
def test_optimizer_groups_keep_ssm_params_norms_and_embeddings_out_of_weight_decay(layer):
    model = _tiny_model(layer)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names.values())
    for name in no_decay:
        assert any(k in name for k in ("A_log", ".D", "dt_bias", "norm", "bias", "embedding")), name
    for suffix in ("A_log", "mixer.D", "embedding.weight", "norm_f.weight"):
        assert any(n.endswith(suffix) for n in no_decay), suffix
    assert any(n.endswith("in_proj.weight") for n in decay) and any(n.endswith("out_proj.weight") for n in decay)


# ---------------------------------------------------------------- evaluation

def test_token_nll_sum_ignores_padded_vocab_columns():
    logits = torch.randn(2, 5, 11)
    logits[..., 8:] = 50.0  # padding columns that would swallow the probability mass
    targets = torch.randint(0, 8, (2, 5))
    expected = F.cross_entropy(logits[..., :8].reshape(-1, 8), targets.reshape(-1), reduction="sum")
    assert_close(token_nll_sum(logits, targets, vocab_size=8), expected, name="nll")


@pytest.mark.parametrize("max_tokens", [pytest.param(None, id="whole-stream"), pytest.param(40, id="max-tokens")])
def test_bits_per_byte_of_a_byte_model_is_nats_over_ln2(max_tokens):
    model = _tiny_model()
    tokens = torch.randint(1, 256, (97,), dtype=torch.uint8)
    stream = TokenStream(tokens, ByteTokenizer())
    nats, bpb = evaluate_bits_per_byte(model, stream, seqlen=16, batch_size=3, max_tokens=max_tokens)
    n = 96 if max_tokens is None else max_tokens
    # independent computation: windows of 16 (and one shorter tail) scored one at a time
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, 16):
            stop = min(start + 16, n)
            ids = tokens[start:stop + 1].long()[None]
            logp = torch.log_softmax(model(ids[:, :-1])[..., :256].double(), dim=-1)
            total -= logp.gather(-1, ids[:, 1:, None]).sum().item()
    assert nats == pytest.approx(total / n, rel=1e-5)
    assert bpb == pytest.approx(total / n / math.log(2), rel=1e-5)


def test_bits_per_byte_of_a_bpe_model_divides_by_decoded_bytes(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["the rest is silence, né"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    docs = [Document("a", "the rest is silence, né"), Document("b", "silence is the rest")]
    stream = TokenStream.from_documents(docs, tok)
    model = _tiny_model(vocab=tok.vocab_size)
    nats, bpb = evaluate_bits_per_byte(model, stream, seqlen=8, batch_size=2)
    n = len(stream) - 1
    # the scored text: document b whole, document a whole, and one separator (the first token is context only)
    n_bytes = len("the rest is silence, né".encode()) + len("silence is the rest".encode()) + 1
    assert tok.count_bytes(stream.tokens[1:].tolist()) == n_bytes
    assert bpb == pytest.approx(nats * n / (math.log(2) * n_bytes), rel=1e-12)
    assert n_bytes > n  # BPE merges: fewer tokens than bytes, so bits/byte < bits/token


# ---------------------------------------------------------------- the loop

@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS)
def test_training_reduces_the_loss_and_writes_a_checkpoint(tmp_path, layer):
    cfg = _tiny(tmp_path, layer, max_steps=30)
    result = train(cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert len(result.losses) == 30 and result.step == 30
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f}"
    assert result.val_bpb is not None and result.val_bpb < math.log2(256)
    out = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "metrics.json"):
        assert (out / name).is_file(), name
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "train_state.pt", "manifest.json"):
        assert (out / "checkpoints" / "step-000030" / name).is_file(), name
    # the checkpoint reloads to the model that was evaluated: same held-out loss
    reloaded = MambaLM.from_pretrained(out)
    _, val_docs = load_corpus(cfg.data, cfg.val_fraction)
    stream = TokenStream.from_documents(val_docs, ByteTokenizer())
    nats, bpb = evaluate_bits_per_byte(reloaded, stream, cfg.seqlen, cfg.eval_batch_size, cfg.final_eval_tokens)
    assert (nats, bpb) == (result.val_loss, result.val_bpb)
    state = load_train_state(out)
    assert state["step"] == 30 and state["history"]["losses"] == result.losses


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    full = train(_tiny(tmp_path, max_steps=12, out_dir=str(tmp_path / "a")))
    # interrupted at step 5 (as a time budget would), then resumed from the checkpoint
    cfg = _tiny(tmp_path, max_steps=12, out_dir=str(tmp_path / "b"))
    part = train(cfg, stop_at_step=5)
    assert part.step == 5 and load_train_state(cfg.out_dir)["step"] == 5
    resumed_cfg = TrainConfig.from_dict(load_train_state(cfg.out_dir)["config"])
    rest = train(resumed_cfg, resume=True)
    assert rest.step == 12
    assert rest.losses == full.losses  # every step's loss, bit for bit
    weights_full = load_file(str(tmp_path / "a" / "model.safetensors"))
    weights_resumed = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert weights_full.keys() == weights_resumed.keys()
    for name in weights_full:
        assert torch.equal(weights_full[name], weights_resumed[name]), name
    assert rest.val_loss == full.val_loss


def test_recompute_trains_the_same_model(tmp_path, monkeypatch):
    """--recompute only trades compute for memory: the same losses step by step and the same weights."""
    import mambakit.modules.mamba2 as mamba2_module

    calls = []
    real = mamba2_module.checkpoint
    monkeypatch.setattr(mamba2_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = train(_tiny(tmp_path, max_steps=6, out_dir=str(tmp_path / "plain")))
    assert not calls
    recomputed = train(_tiny(tmp_path, max_steps=6, out_dir=str(tmp_path / "rc"), recompute=True))
    assert len(calls) >= 6  # every training forward went through the recomputing path
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "rc" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_time_budget_stops_gracefully_with_a_checkpoint(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mambakit.training"):
        result = train(_tiny(tmp_path, max_steps=10_000, time_budget_s=1e-3))
    assert result.stopped_by_budget and result.step < 10_000
    assert load_train_state(tmp_path / "run")["step"] == result.step
    # a budget spent before the first step says so (kernel compiles on a fresh GPU machine can take it all)
    idle = [r for r in caplog.records if r.getMessage().startswith("no step was trained")]
    assert len(idle) == (result.step == 0) and all(r.levelno == logging.WARNING for r in idle)


def test_the_final_report_gives_the_steady_rate_the_median_of_the_metrics_windows(tmp_path, caplog):
    """The overall tokens/s counts first compiles and evaluations; the steady rate beside it is the median of the
    tokens/s that metrics.jsonl records for each window of `log_every` steps."""
    assert steady_rate([1000.0, 5000.0, 5200.0, 900.0, 5100.0], 10) == \
        " (steady: 5,000 tokens/s, the median of 5 windows of 10 steps)"
    assert steady_rate([1.0, 3.0, 2.0, 10.0], 4) == " (steady: 2 tokens/s, the median of 4 windows of 4 steps)"
    assert steady_rate([7.0, 8.0], 10) == ""  # too few windows to say
    with caplog.at_level(logging.INFO, logger="mambakit.training"):
        train(_tiny(tmp_path, max_steps=30, log_every=5))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("trained 30 steps"))
    rates = sorted(r["tokens_per_s"] for r in read_metrics(tmp_path / "run") if "tokens_per_s" in r)
    assert len(rates) == 6
    assert f"(steady: {(rates[2] + rates[3]) / 2:,.0f} tokens/s, the median of 6 windows of 5 steps)" in line


# ---------------------------------------------------------------- DDP (2 processes, gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    """One torchrun-like process: the gradients of one DDP step, then a short train() run."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        stream = TokenStream(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(1)).to(torch.uint8),
                             ByteTokenizer())
        windows = RandomWindows(stream, seqlen=24, batch_size=3, seed=5, rank=rank, world_size=world_size)
        model = DistributedDataParallel(_tiny_model())
        forward_backward(model, windows.next_batch(), 256)
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, os.path.join(tmp, "ddp_grads.pt"))
        # the wrapper's Reducer holds the process group: freed only after destroy_process_group (at this function's
        # return), gloo's teardown joined threads that never ended and hung CI (session 27, both ranks' work done)
        del model
        cfg = TrainConfig.from_dict(torch.load(os.path.join(tmp, "cfg.pt")))
        result = train(cfg)
        torch.save(result.losses, os.path.join(tmp, f"losses{rank}.pt"))
        dist.barrier()  # leave together: a rank tearing down ahead of the other can take the store from it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process_large_batch(tmp_path):
    import torch.multiprocessing as mp

    cfg = _tiny(tmp_path, max_steps=3, batch_size=2, out_dir=str(tmp_path / "ddp_run"))
    torch.save(cfg.to_dict(), tmp_path / "cfg.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    # the same step in one process with the global batch (2 x 3 windows, the same ones)
    stream = TokenStream(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(1)).to(torch.uint8),
                         ByteTokenizer())
    model = _tiny_model()
    forward_backward(model, RandomWindows(stream, seqlen=24, batch_size=6, seed=5).next_batch(), 256)
    ddp_grads = torch.load(tmp_path / "ddp_grads.pt")
    for name, p in model.named_parameters():
        assert_close(ddp_grads[name], p.grad, name=f"grad {name}", rel=1e-5)

    # train() under torchrun: both ranks report the same (all-reduced) losses, and they match a
    # single process reading the same global batch of 4 windows per step
    losses0, losses1 = torch.load(tmp_path / "losses0.pt"), torch.load(tmp_path / "losses1.pt")
    assert losses0 == losses1 and len(losses0) == 3
    single = train(cfg.replace(batch_size=4, out_dir=str(tmp_path / "single_run")))
    assert_close(torch.tensor(losses0), torch.tensor(single.losses), name="losses", rel=1e-4)
    ddp_weights = load_file(str(tmp_path / "ddp_run" / "model.safetensors"))
    single_weights = load_file(str(tmp_path / "single_run" / "model.safetensors"))
    for name, w in single_weights.items():
        assert_close(ddp_weights[name], w, name=name, rel=1e-3)


def test_the_chunked_loss_step_equals_the_logits_step_and_the_config_names_both():
    """`loss: chunked` (the model's own loss, ops.linear_cross_entropy) and `loss: logits` give one step's loss and
    gradients alike; any other value is refused."""
    from mambakit import MambaConfig, MambaLM
    from mambakit.training import forward_backward
    from mambakit.training.config import TrainConfig

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg={"layer": "Mamba1"}))
    window = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(2))
    runs = []
    for chunked in (True, False):
        model.zero_grad()
        loss = forward_backward(model, window, vocab_size=61, chunked_loss=chunked)
        runs.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert TrainConfig(loss="logits").loss == "logits" and TrainConfig().loss == "chunked"
    with pytest.raises(ValueError, match="loss must be"):
        TrainConfig(loss="fused")


@pytest.mark.parametrize("layer", ["mamba1", "mamba2"])
def test_bf16_autocast_on_a_cpu_only_when_asked(tmp_path, layer, monkeypatch, caplog):
    """autocast "bf16" leaves a CPU in float32 (as before); "bf16+cpu" runs the CPU's steps under bf16 autocast:
    the projections see bf16, the run still learns, and a CPU without native bf16 gets a warning."""
    from mambakit.training.loop import autocast_dtype_for

    cpu = torch.device("cpu")
    assert autocast_dtype_for("bf16", cpu) is None and autocast_dtype_for("none", cpu) is None
    assert autocast_dtype_for("bf16+cpu", cpu) is torch.bfloat16
    assert autocast_dtype_for("bf16", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="'bf16\\+cpu'"):
        TrainConfig(autocast="cpu")
    from mambakit.training import loop

    seen, original = [], loop.forward_backward

    def spy(model, batch, vocab, autocast_dtype, *args, **kwargs):
        seen.append(autocast_dtype)
        return original(model, batch, vocab, autocast_dtype, *args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", spy)
    result = train(_tiny(tmp_path, layer, autocast="bf16+cpu", max_steps=20))
    assert seen == [torch.bfloat16] * 20  # every step under bf16 autocast
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert math.isfinite(result.val_loss) and last < first - 0.5, f"loss {first:.3f} -> {last:.3f}"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level("WARNING", logger="mambakit.training"):
        assert autocast_dtype_for("bf16+cpu", cpu) is torch.bfloat16
    assert "no native bf16" in caplog.text
