"""Per-token log-probabilities (evaluation.score, generate(return_logprobs=True)) and the lm-evaluation-harness model
"mambakit" (evaluation/lm_eval.py, cli/eval_tasks.py) on a local multiple-choice task made here."""

import json
import math

import pytest
import torch

from mambakit.data import ByteTokenizer
from mambakit.evaluation import score
from mambakit.generation import generate
from mambakit.models import MambaConfig, TransformerConfig, build_model

from .helpers import assert_close

CONFIGS = {
    "mamba2": MambaConfig(d_model=32, n_layer=2, vocab_size=256,
                          ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}),
    "mamba1": MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "transformer++": TransformerConfig(d_model=32, n_layer=2, vocab_size=256, num_heads=4),
    "gpt3": TransformerConfig(arch="gpt3", d_model=32, n_layer=2, vocab_size=256, num_heads=4),
    # a padded vocabulary (61 -> 64): the padded logits are no tokens and get no probability
    "hybrid-padded-vocab": MambaConfig(d_model=32, n_layer=2, vocab_size=61, d_intermediate=64, attn_layer_idx=[1],
                                       attn_cfg={"num_heads": 2, "rotary_emb_dim": 16},
                                       ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}),
}
MODELS = [pytest.param(name, id=name) for name in CONFIGS]


def _model(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = build_model(CONFIGS[name]).to(dtype).eval()
    with torch.no_grad():  # unit norms and zero biases at init hide mistakes
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", MODELS)
def test_score_is_the_log_softmax_of_the_forward_at_the_targets(name):
    model = _model(name)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 17))
    with torch.no_grad():
        logits = model(ids)[..., :vocab]
    expected = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    got = score(model, ids)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    assert_close(got, expected, name="score", rel=1e-6)
    assert_close(score(model, ids, last=5), expected[:, -5:], name="score last=5", rel=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_score_of_ragged_rows_equals_each_row_alone(name):
    """Left padding leaks into no row: a batch of rows of lengths 1 to 13 scores each row as it scores alone."""
    model = _model(name)
    vocab = model.config.vocab_size
    rows = [torch.randint(0, vocab, (n,)).tolist() for n in (13, 1, 6, 2)]
    batch, argmax = score(model, rows, return_argmax=True)
    for row, lp, am in zip(rows, batch, argmax):
        alone, alone_argmax = score(model, torch.tensor([row]), return_argmax=True)
        assert lp.shape == (len(row) - 1,)
        assert_close(lp, alone[0], name=f"row of {len(row)}", rel=1e-9)
        assert torch.equal(am, alone_argmax[0])
    tails = score(model, rows, last=3)
    assert [t.numel() for t in tails] == [3, 0, 3, 1]
    assert_close(tails[0], batch[0][-3:], name="last=3", rel=0)


@pytest.mark.parametrize("name", MODELS)
def test_generate_return_logprobs_equals_score_of_the_new_tokens(name):
    model = _model(name)
    prompts = [[5, 9, 2, 7], [3], [11, 12]]
    new, logprobs = generate(model, prompts, 6, return_logprobs=True)
    assert new == generate(model, prompts, 6)
    for prompt, tokens, lps in zip(prompts, new, logprobs):
        expected = score(model, [prompt + tokens], last=len(tokens))[0]
        assert_close(torch.tensor(lps), expected, name="generated log-probs", rel=1e-9)
    sampled, sampled_lp = generate(model, prompts, 4, temperature=1.0, top_k=5, seed=1, return_logprobs=True)
    for prompt, tokens, lps in zip(prompts, sampled, sampled_lp):  # the model's distribution, not the filtered one
        assert_close(torch.tensor(lps), score(model, [prompt + tokens], last=len(tokens))[0], name="sampled", rel=1e-9)


@pytest.mark.parametrize("ids, message", [
    pytest.param(torch.zeros(2, 3), "integer tensor", id="float-tensor"),
    pytest.param([[1, 2], []], r"ids\[1\] is empty", id="empty-row"),
    pytest.param([[1, 300]], r"must lie in \[0, 256\)", id="out-of-vocab"),
    pytest.param("hello", "list of token-id lists", id="string"),
])
def test_score_bad_input_is_a_value_error(ids, message):
    with pytest.raises(ValueError, match=message):
        score(_model("mamba2"), ids)


# ---------------------------------------------------------------- lm-evaluation-harness

QUESTIONS = [
    {"question": "Q: The sky is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"question": "Q: Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Q: Which is a colour of a traffic light, the one that means stop?", "choices": ["red", "blue", "x"],
     "answer": 0},
    {"question": "Q: A", "choices": ["b", "a much longer answer than the others", "c"], "answer": 1},
]


def _task_dir(tmp_path):
    """A multiple-choice task: a jsonl of questions and the task YAML that reads it (no download anywhere)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "mk_choice.yaml").write_text(f"""task: mk_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return folder


def _checkpoint(tmp_path, name: str):
    model = _model(name, torch.float32)
    model.save_pretrained(tmp_path / name, tokenizer=ByteTokenizer())
    return model, tmp_path / name


def _expected_loglikelihood(model, context: str, continuation: str) -> float:
    """What lm-eval asks for, from `score`: the continuation's tokens after the context's, summed (one row alone)."""
    tok = ByteTokenizer()
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    return float(score(model, torch.tensor([ctx + cont]), last=len(cont))[0].double().sum())


@pytest.mark.parametrize("name", [pytest.param("mamba2", id="mamba2", marks=pytest.mark.slow),
                                  pytest.param("transformer++", id="transformer++", marks=pytest.mark.slow)])
def test_simple_evaluate_multiple_choice_gives_the_log_likelihoods_of_score(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import mambakit.evaluation.lm_eval  # noqa: F401  registers "mambakit"

    model, ckpt = _checkpoint(tmp_path, name)
    # batch_size 3: the 11 (question, choice) rows of 4 lengths share batches, padded, as lm-eval sends them
    tasks = TaskManager(include_path=str(_task_dir(tmp_path)), include_defaults=False)
    out = lm_eval.simple_evaluate(model="mambakit", model_args=f"pretrained={ckpt},device=cpu,batch_size=3",
                                  tasks=["mk_choice"], task_manager=tasks, log_samples=True, bootstrap_iters=0)
    samples = out["samples"]["mk_choice"]
    assert len(samples) == len(QUESTIONS)
    hits = 0
    for sample in samples:
        doc = sample["doc"]
        got = [resp[0][0] for resp in sample["resps"]]  # one (loglikelihood, is_greedy) per choice
        expected = [_expected_loglikelihood(model, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
        hits += int(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert out["results"]["mk_choice"]["acc,none"] == pytest.approx(hits / len(QUESTIONS))


@pytest.mark.parametrize("name", [pytest.param("mamba1", id="mamba1"), pytest.param("gpt3", id="gpt3")])
def test_rolling_loglikelihood_is_the_sum_of_score_and_generate_until_stops(tmp_path, name):
    from lm_eval.api.instance import Instance

    from mambakit.evaluation.lm_eval import MambakitLM

    model = _model(name, torch.float32)
    lm = MambakitLM(model=model, tokenizer=ByteTokenizer(), batch_size=2)
    with pytest.raises(ValueError, match=r"unknown model_args \['max_lenght'\]"):
        MambakitLM(model=model, tokenizer=ByteTokenizer(), max_lenght=16)
    texts = ["To be, or not to be, that is the question.", "Ay, there's the rub.", "O"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    for text, value in zip(texts, got):
        expected = float(score(model, [[0] + list(text.encode())])[0].double().sum())  # after the EOD token, id 0
        assert value == pytest.approx(expected, rel=1e-5)
    # documents longer than max_length go in lm-eval's disjoint windows: each window is one row, the sum of them all
    short = MambakitLM(model=model, tokenizer=ByteTokenizer(), batch_size=2, max_length=16)
    windows = short.loglikelihood_rolling(requests[:1], disable_tqdm=True)[0]
    ids = list(texts[0].encode())
    # lm-eval's windows of 42 tokens at max_length 16: 16 predictions after EOD, 16 after one token of context, and
    # the last 10 after as much context as fills the window
    pieces = [([0] + ids[:16], 16), (ids[15:32], 16), (ids[25:], 10)]
    expected = sum(float(score(model, [p], last=n)[0].double().sum()) for p, n in pieces)
    assert windows == pytest.approx(expected, rel=1e-5) and math.isfinite(windows)

    # generate_until: greedy text, the same alone or in a batch, cut before the first stop string
    gen = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6}), i)
           for i, c in enumerate(["To be", "Ay", "O"])]
    together = lm.generate_until(gen, disable_tqdm=True)
    for inst, text in zip(gen, together):
        new = generate(model, [list(inst.args[0].encode())], 6, eos_token_id=0)[0]
        full = bytes(t for t in new if t != 0).decode("utf-8", errors="replace")
        assert text == full.split("\n")[0]


@pytest.mark.slow  # 15-35 s on 2 cores: out of the fast lane, CI runs it
def test_eval_tasks_cli_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from mambakit.cli.eval_tasks import add_task_arguments, run_tasks
    from mambakit.cli.errors import Parser

    _, ckpt = _checkpoint(tmp_path, "mamba2")
    parser = Parser(prog="mambakit eval")
    parser.add_argument("--model", required=True)
    add_task_arguments(parser)
    out_json = tmp_path / "results.json"
    args = parser.parse_args(["--model", str(ckpt), "--tasks", "mk_choice", "--include-path", str(_task_dir(tmp_path)),
                              "--device", "cpu", "--limit", "2", "--output", str(out_json)])
    assert run_tasks(args) == 0
    printed = capsys.readouterr().out
    assert "mk_choice" in printed and "acc" in printed and "|" in printed
    saved = json.loads(out_json.read_text())
    assert "acc,none" in saved["results"]["mk_choice"]
    # an eval main(**flags) passes keywords instead of the namespace
    assert run_tasks(model=str(ckpt), tasks="mk_choice", include_path=str(tmp_path / "tasks"), device="cpu", limit=1) == 0
    assert "mk_choice" in capsys.readouterr().out
    # and as `mambakit eval --tasks`
    from mambakit.cli.__main__ import main

    assert main(["eval", "--model", str(ckpt), "--tasks", "mk_choice", "--include-path", str(tmp_path / "tasks"),
                 "--device", "cpu", "--limit", "1"]) == 0
    assert "mk_choice" in capsys.readouterr().out
