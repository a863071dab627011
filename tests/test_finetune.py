"""Fine-tuning (`TrainConfig.init_from`, `mambakit train --init-from`): the run starts from the loaded weights with the
loaded model's tokenizer, trains every weight or only peft LoRA adapters, publishes a plain merged model beside the
adapter in peft's layout, and a LoRA run resumes exactly (refused when its base changed)."""

from __future__ import annotations

import json
import logging

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit.cli.__main__ import main
from mambakit.models import MambaLM
from mambakit.training import Run, TrainConfig, load_train_state, train
from mambakit.training.finetune import add_lora, merged_model, weights_fingerprint

LAYERS = ["Mamba1", "Mamba2"]


def _corpus(directory, lines) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(16):
        (directory / f"doc{i:02d}.txt").write_text("".join(lines[(i + j) % len(lines)] for j in range(10)))
    return str(directory)


def _base(tmp_path, layer: str, tokenizer: str = "bytes") -> str:
    """A trained model directory (a `mambakit train` run of a few steps; byte-level unless `tokenizer` is a file)."""
    out = tmp_path / f"base-{layer}"
    cfg = TrainConfig(recipe="base", data=_corpus(tmp_path / "verse", ["to be or not to be\n", "the rest is silence\n"]),
                      tokenizer=tokenizer,
                      layer=layer, d_model=16, n_layer=2, d_state=8, expand=2, headdim=8, chunk_size=16, seqlen=32,
                      batch_size=4, lr=1e-2, warmup_steps=2, max_steps=6, eval_every=0, eval_tokens=256,
                      final_eval_tokens=256, eval_batch_size=4, progress=False, sample_tokens=0, out_dir=str(out))
    train(cfg)
    return str(out)


def _finetune(tmp_path, base: str, name: str, **changes) -> TrainConfig:
    data = _corpus(tmp_path / "prose", ["it was the best of times\n", "it was the worst of times\n"])
    cfg = TrainConfig(recipe="ft", init_from=base, tokenizer="init", data=data, seqlen=32, batch_size=4, lr=1e-2,
                      warmup_steps=2, max_steps=8, weight_decay=0.0, eval_every=0, eval_tokens=256,
                      final_eval_tokens=256, eval_batch_size=4, log_every=2, progress=False, sample_tokens=0,
                      out_dir=str(tmp_path / name))
    return cfg.replace(**changes)


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors") if hasattr(directory, "is_dir") else f"{directory}/model.safetensors")


@pytest.mark.parametrize("layer", LAYERS)
def test_a_full_fine_tune_starts_from_the_loaded_weights_and_scores_them_at_step_0(tmp_path, layer, caplog):
    base = _base(tmp_path, layer)
    cfg = _finetune(tmp_path, base, "ft")
    run = Run(cfg)
    try:
        loaded = MambaLM.from_pretrained(base)
        start = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
        assert start.keys() == loaded.state_dict().keys()
        assert all(torch.equal(start[k], v) for k, v in loaded.state_dict().items())
        # the model's shape, not the TrainConfig defaults (d_model 128), is what the run says it trains
        assert (run.cfg.d_model, run.cfg.n_layer, run.cfg.layer, run.cfg.d_state) == (16, 2, layer, 8)
        step0 = run.history["evals"][0]
        assert step0["step"] == 0 and step0["bpb"] > 0
        with caplog.at_level(logging.INFO, logger="mambakit.training"):
            while run.stop_reason() is None:
                run.step()
            result = run.finish()
    finally:
        run.close()
    changed = [k for k, v in run.raw_model.state_dict().items() if not torch.equal(v, start[k])]
    assert len(changed) == len(start)  # every weight trained (no decay, but every one has a gradient)
    assert result.val_bpb < step0["bpb"]  # fine-tuning on the new text helped on its held-out part
    saved = TrainConfig.from_dict(load_train_state(cfg.out_dir)["config"])
    assert saved.d_model == 16 and saved.init_from == base and saved.lora_rank == 0
    metrics = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["eval_bits_per_byte"] == pytest.approx(step0["bpb"])


@pytest.mark.parametrize("layer", LAYERS)
def test_lora_trains_only_the_adapters_and_publishes_the_merged_model_and_the_adapter(tmp_path, layer):
    base = _base(tmp_path, layer)
    cfg = _finetune(tmp_path, base, "lora", lora_rank=4, lora_alpha=8.0)
    run = Run(cfg)
    try:
        trainable = [n for n, p in run.raw_model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
        assert adapted == ({"in_proj", "x_proj", "dt_proj"} if layer == "Mamba1" else {"in_proj"})
        while run.stop_reason() is None:
            run.step()
        run.finish()
        peft_model = run.adapter
    finally:
        run.close()
    out = tmp_path / "lora"
    base_weights = _weights(base)
    # the base is untouched: the published model differs from it exactly in the adapted layers' weights
    merged = _weights(out)
    assert merged.keys() == base_weights.keys()
    differs = {k for k in merged if not torch.equal(merged[k], base_weights[k])}
    assert differs and all(k.rsplit(".", 2)[-2] in adapted and k.endswith(".weight") for k in differs)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(ids)
        plain = MambaLM.from_pretrained(out)
        assert not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(ids), expected, rtol=1e-4, atol=1e-4)
        # peft reads the adapter the run published, onto the base it names
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base and config["r"] == 4
        reloaded = peft.PeftModel.from_pretrained(MambaLM.from_pretrained(config["base_model_name_or_path"]), str(out))
        torch.testing.assert_close(reloaded(ids), expected, rtol=1e-5, atol=1e-5)
    assert main(["generate", "--model", str(out), "--prompt", "it was", "--max-new-tokens", "8", "--seed", "0"]) == 0


def test_merged_model_equals_the_adapted_model_with_every_target():
    from mambakit import MambaConfig

    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba1"}))
    peft_model = add_lora(lm, TrainConfig(init_from="unused", lora_rank=4, lora_alpha=8.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)  # peft starts B at zero: make every adapter count
    before = weights_fingerprint(peft_model)
    plain = merged_model(peft_model)
    assert weights_fingerprint(peft_model) == before  # merging leaves the adapters (and the base) as they were
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), peft_model(ids), rtol=1e-4, atol=1e-5)
        delta = (plain.backbone.layers[0].mixer.x_proj.weight - lm.backbone.layers[0].mixer.x_proj.base_layer.weight)
    assert delta.abs().max() > 1e-3


def test_a_lora_run_resumes_exactly_and_refuses_a_changed_base(tmp_path):
    base = _base(tmp_path, "Mamba1")
    whole = train(_finetune(tmp_path, base, "whole", lora_rank=2))
    cfg = _finetune(tmp_path, base, "parts", lora_rank=2)
    train(cfg, stop_at_step=3)
    resumed_cfg = TrainConfig.from_dict(load_train_state(cfg.out_dir)["config"])
    rest = train(resumed_cfg, resume=True)
    assert rest.step == whole.step == 8
    assert rest.losses == pytest.approx(whole.losses, abs=0, rel=0)
    for name in ("adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "parts" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the base moved: `--resume --init-from NEW` finds it (the fingerprint says it is the same model)
    import shutil

    moved = shutil.copytree(base, tmp_path / "moved-base")
    assert main(["train", "--resume", "--out", str(tmp_path / "parts"), "--init-from", str(moved), "--max-steps", "9",
                 "--no-progress"]) == 2  # max_steps is not resumable; init_from is
    assert main(["train", "--resume", "--out", str(tmp_path / "parts"), "--init-from", str(moved),
                 "--no-progress"]) == 0
    # the base changed on disk since the run started: resuming would train another model, so it is refused
    weights = _weights(base)
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, f"{base}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not the one this LoRA run started from"):
        train(resumed_cfg.replace(max_steps=9), resume=True)


def test_a_tokenizer_other_than_the_models_is_warned_about(tmp_path, caplog):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = tmp_path / "bpe" / "tokenizer.json"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["to be or not to be, the rest is silence"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.parent.mkdir()
    tok.save(str(bpe))
    base = _base(tmp_path, "Mamba2", tokenizer=str(bpe))
    with caplog.at_level(logging.WARNING, logger="mambakit.training"):
        train(_finetune(tmp_path, base, "bytes", tokenizer="bytes", max_steps=1))
    assert any("is not the one saved with" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mambakit.training"):
        result = train(_finetune(tmp_path, base, "own", max_steps=1))  # tokenizer "init": the model's BPE
    assert not any("is not the one saved with" in r.getMessage() for r in caplog.records)
    assert result.val_bpb > 0
    assert (tmp_path / "own" / "tokenizer.json").is_file()  # published with the model, for generate


def test_lora_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="give init_from"):
        Run(TrainConfig(lora_rank=4))
    with pytest.raises(ValueError, match="lora_rank must be"):
        TrainConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="lora_targets"):
        TrainConfig(lora_targets=[])
    with pytest.raises(ValueError, match="'ddp', not 'fsdp'"):
        TrainConfig(init_from="x", lora_rank=4, parallel="fsdp")
    base = _base(tmp_path, "Mamba2")
    with pytest.raises(ValueError, match=r"lora_targets \['nothing_here'\]"):
        train(_finetune(tmp_path, base, "none", lora_rank=2, lora_targets=["nothing_here"]))


@pytest.mark.slow
def test_cli_fine_tunes_with_the_models_tokenizer_then_generates(tmp_path, capsys):
    base = _base(tmp_path, "Mamba2")
    data = _corpus(tmp_path / "prose", ["it was the best of times\n"])
    out = tmp_path / "run"
    argv = ["train", "--init-from", base, "--data", data, "--lora-rank", "2", "--max-steps", "4", "--seqlen", "32",
            "--batch-size", "2", "--out", str(out), "--no-progress", "--eval-tokens", "128", "--final-eval-tokens",
            "256", "--sample-tokens", "0"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"from {base}, LoRA rank 2 on in_proj" in text and "step 0 (" in text
    saved = TrainConfig.from_dict(load_train_state(out)["config"])
    assert saved.recipe == "prose" and saved.tokenizer == "init" and saved.lr == 1e-3  # the lora recipe's
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert main(["generate", "--model", str(out), "--prompt", "it was", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("it was")


@pytest.mark.parametrize("argv, message", [
    (["--init-from", "BASE", "--d-model", "64"], "--d-model: a fine-tuning run (--init-from) trains the model it loads"),
    (["--init-from", "BASE", "--model.ssm-cfg", "{d_conv: 3}"], "--model.ssm-cfg: a fine-tuning run"),
    (["--lora-rank", "4"], "--lora-rank 4 trains LoRA adapters on a trained model: give --init-from"),
    (["--init-from", "no/such/dir/here"], "--init-from no/such/dir/here: no such model directory"),
])
def test_cli_fine_tuning_usage_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("BASE", str(tmp_path)) for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_lora_run_on_two_processes_equals_one_with_the_same_global_batch(tmp_path):
    from tests.helpers import assert_close
    from tests.test_training_scale import _spawn

    base = _base(tmp_path, "Mamba1")
    one = train(_finetune(tmp_path, base, "one", lora_rank=2, batch_size=4, max_steps=4))
    two = _spawn(_finetune(tmp_path, base, "two", lora_rank=2, batch_size=2, max_steps=4), tmp_path)
    assert_close(torch.tensor(two), torch.tensor(one.losses), name="losses", rel=1e-4)
    a, b = load_file(str(tmp_path / "one" / "adapter_model.safetensors")), load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)
    for k in a:
        assert_close(b[k], a[k], name=k, rel=1e-3)


def test_print_config_of_a_fine_tuning_run_gives_the_loaded_models_shape(tmp_path, capsys):
    import yaml

    base = _base(tmp_path, "Mamba1")
    capsys.readouterr()
    assert main(["train", "--init-from", base, "--print-config", "--out", str(tmp_path / "run")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["layer"], printed["d_model"], printed["n_layer"], printed["d_state"]) == ("Mamba1", 16, 2, 8)
    assert (printed["recipe"], printed["init_from"], printed["tokenizer"], printed["lr"]) == ("finetune", base, "init",
                                                                                               3e-4)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--init-from", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_a_full_fine_tune_resumes_without_its_base_and_repeats_an_uninterrupted_run(tmp_path):
    import shutil

    base = _base(tmp_path, "Mamba2")
    whole = train(_finetune(tmp_path, base, "whole"))
    cfg = _finetune(tmp_path, base, "parts")
    train(cfg, stop_at_step=3)
    shutil.rmtree(base)  # the weights and the tokenizer ("init") now come from the run's own checkpoint
    rest = train(TrainConfig.from_dict(load_train_state(cfg.out_dir)["config"]), resume=True)
    assert rest.losses == whole.losses and rest.step == 8
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _bpe_with_chat_tokens(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = tmp_path / "bpe" / "tokenizer.json"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["to be or not to be, the rest is silence"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.parent.mkdir()
    tok.save(str(bpe))
    return bpe, tok


@pytest.mark.parametrize("lora", [False, True])
def test_a_fine_tuned_chat_model_keeps_its_chat_template_special_tokens_and_stop_ids(tmp_path, lora):
    """The fields a checkpoint's configs give its tokenizer (chat template, special token names, pad and every stop
    id) were dropped by every checkpoint the run wrote: a fine-tuned chat model came out without its template."""
    from mambakit.checkpoints import load_checkpoint_tokenizer

    bpe, tok = _bpe_with_chat_tokens(tmp_path)
    base = _base(tmp_path, "Mamba2", tokenizer=str(bpe))
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|im_end|>{% endfor %}"
    (tmp_path / "base-Mamba2" / "chat_template.jinja").write_text(template)
    cfg_path = tmp_path / "base-Mamba2" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "pad_token": "<|pad|>"}))
    eos, im_end, pad = (tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|pad|>"))
    (tmp_path / "base-Mamba2" / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, im_end],
                                                                                 "pad_token_id": pad}))
    before = load_checkpoint_tokenizer(base)
    assert before.chat_template == template and before.stop_ids == (eos, im_end) and before.pad_id == pad

    train(_finetune(tmp_path, base, "chat", max_steps=2, save_every=1, **({"lora_rank": 2} if lora else {})))
    run_dir = tmp_path / "chat"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints
    for directory in [run_dir, *checkpoints]:  # the published model and every checkpoint
        after = load_checkpoint_tokenizer(directory)
        assert after.chat_template == template, directory
        assert (after.eos_id, after.stop_ids, after.pad_id) == (eos, (eos, im_end), pad), directory
        assert after.special_tokens["pad_token"] == "<|pad|>"
        assert after.special_tokens["eos_token"] == "<|endoftext|>"


def test_a_plain_tokenizer_writes_no_extra_files(tmp_path):
    _base(tmp_path, "Mamba1")  # bytes: no template, no special names, no ids beyond eos
    assert not (tmp_path / "base-Mamba1" / "chat_template.jinja").exists()
    assert not (tmp_path / "base-Mamba1" / "generation_config.json").exists()
    assert json.loads((tmp_path / "base-Mamba1" / "tokenizer_config.json").read_text()) == {"type": "bytes"}
