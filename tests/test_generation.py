"""Generation: greedy == argmax of the parallel forward, ragged batches, sampling filters, stream == generate."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.generation import apply_repetition_penalty, generate, logits_to_probs, sample, stream

from .helpers import assert_close

LAYERS = [
    pytest.param({"layer": "Mamba1", "d_state": 8}, id="mamba1"),
    pytest.param({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}, id="mamba2"),
]


def _model(ssm_cfg, vocab=37) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, ssm_cfg=ssm_cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # sharper logits: greedy ties become impossible in practice
    return model


@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_greedy_equals_argmax_of_parallel_forward(ssm_cfg):
    model = _model(ssm_cfg)
    prompt = torch.randint(0, 37, (2, 9))
    new = torch.tensor(generate(model, prompt, max_new_tokens=12))
    seq = torch.cat([prompt, new], dim=1)
    with torch.no_grad():
        logits = model(seq)[:, 8:-1, :37]
    assert torch.equal(logits.argmax(-1), new)


@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_ragged_batch_rows_equal_each_row_alone(ssm_cfg):
    model = _model(ssm_cfg)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14]]
    batched = generate(model, prompts, max_new_tokens=10)
    alone = [generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    sampled = generate(model, prompts, 6, temperature=1.0, seed=3)
    assert [len(r) for r in sampled] == [6] * 4


@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_stream_yields_what_generate_returns(ssm_cfg):
    model = _model(ssm_cfg)
    kwargs = dict(temperature=0.9, top_k=10, top_p=0.9, seed=7)
    assert list(stream(model, [3, 1, 4, 1, 5], 15, **kwargs)) == generate(model, [[3, 1, 4, 1, 5]], 15, **kwargs)[0]


def test_seeded_sampling_is_reproducible_and_eos_stops_rows():
    model = _model({"layer": "Mamba1", "d_state": 8})
    a = generate(model, [[1, 2], [3, 4]], 20, temperature=1.5, seed=11)
    assert a == generate(model, [[1, 2], [3, 4]], 20, temperature=1.5, seed=11)
    eos = a[0][3]
    stopped = generate(model, [[1, 2], [3, 4]], 20, temperature=1.5, seed=11, eos_token_id=eos)
    assert stopped[0] == a[0][: a[0].index(eos) + 1]
    assert all(t < 37 for row in a for t in row)  # padded vocab ids (37..39) are never produced


def test_logits_to_probs_filters_match_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert_close(logits_to_probs(logits), torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]), rel=1e-6)
    assert_close(logits_to_probs(logits, top_k=2), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]), rel=1e-6)
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 is not
    assert_close(logits_to_probs(logits, top_p=0.8), torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85, rel=1e-6)
    # min_p 0.25: keep p >= 0.125
    assert_close(logits_to_probs(logits, min_p=0.25), torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85, rel=1e-6)
    # temperature 0.5 squares the odds
    sq = torch.tensor([[0.25, 0.04, 0.0225, 0.01, 0.0025]])
    assert_close(logits_to_probs(logits, temperature=0.5), sq / sq.sum(), rel=1e-6)


def test_repetition_penalty_and_sampler_distribution():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5]]), rel=0)
    probs = torch.tensor([[0.6, 0.3, 0.1]]).expand(20000, 3)
    draws = sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 20000
    assert_close(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.015, rel=0)


def test_generate_validates_arguments():
    model = _model({"layer": "Mamba1", "d_state": 8})
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 3, temperature=-1)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 40\)"):
        generate(model, [[1, 99]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], -1)
