"""The synthetic tasks' specs (data/synthetic.py): shapes, id ranges, target positions, seeding."""

import pytest
import torch

from mambakit.data.synthetic import (
    IGNORE,
    IH_TRIGGER,
    INDUCTION_VOCAB,
    MQAR_FILLER,
    SC_MARKER,
    SC_NOISE,
    SELECTIVE_COPYING_VOCAB,
    induction_heads,
    mqar,
    selective_copying,
)


@pytest.mark.parametrize("seqlen, n_tokens", [pytest.param(4096, 16, id="paper-L4096"), pytest.param(40, 16, id="L40"),
                                              pytest.param(16, 16, id="all-content"), pytest.param(20, 3, id="n3")])
def test_selective_copying_spec(seqlen, n_tokens):
    b = selective_copying(8, seqlen, n_tokens, generator=0)
    assert b.inputs.shape == b.targets.shape == (8, seqlen + n_tokens)
    assert b.inputs.dtype == b.targets.dtype == torch.long
    assert SELECTIVE_COPYING_VOCAB == 18 and (SC_NOISE, SC_MARKER) == (0, 17)
    body, tail = b.inputs[:, :seqlen], b.inputs[:, seqlen:]
    assert bool((tail == SC_MARKER).all())  # n_tokens markers at the end
    assert bool(((body >= 0) & (body <= 16)).all())  # noise or content, never a marker inside
    content = body != SC_NOISE
    assert content.sum(1).tolist() == [n_tokens] * 8  # exactly n_tokens content tokens, at distinct positions
    for row in range(8):
        in_order = body[row][content[row]]  # the content tokens in position order
        assert torch.equal(b.targets[row, seqlen:], in_order)  # the k-th marker's target is the k-th content token
    assert bool((b.targets[:, :seqlen] == IGNORE).all())
    assert bool(((b.targets[:, seqlen:] >= 1) & (b.targets[:, seqlen:] <= 16)).all())


def test_selective_copying_positions_and_tokens_are_uniform():
    b = selective_copying(2000, 64, 16, generator=1)
    pos = (b.inputs[:, :64] != SC_NOISE).float().mean(0)  # each position holds content with probability 16/64
    assert float((pos - 0.25).abs().max()) < 0.05
    counts = torch.bincount(b.targets[:, 64:].flatten(), minlength=17)[1:].float()
    assert float(counts.min() / counts.max()) > 0.85  # ids 1..16 equally likely


@pytest.mark.parametrize("seqlen", [pytest.param(3, id="T3"), pytest.param(256, id="T256"), pytest.param(1000, id="T1000")])
def test_induction_heads_spec(seqlen):
    b = induction_heads(64, seqlen, generator=0)
    assert b.inputs.shape == b.targets.shape == (64, seqlen)
    assert INDUCTION_VOCAB == 17 and IH_TRIGGER == 16
    assert bool(((b.inputs >= 0) & (b.inputs <= 16)).all())
    assert bool((b.inputs[:, -1] == IH_TRIGGER).all())  # the last token is the trigger
    triggers = b.inputs == IH_TRIGGER
    assert triggers.sum(1).tolist() == [2] * 64  # one inside the row, one at the end
    p = triggers[:, :-1].float().argmax(1)  # the inner trigger's position
    assert bool((p <= seqlen - 3).all())
    value = b.inputs.gather(1, (p + 1)[:, None])[:, 0]
    assert torch.equal(b.targets[:, -1], value)  # the target at the last position is the token after the trigger
    assert bool((value < 16).all())
    assert bool((b.targets[:, :-1] == IGNORE).all())


def test_induction_heads_trigger_position_covers_its_range():
    b = induction_heads(4000, 8, generator=3)
    p = (b.inputs[:, :-1] == IH_TRIGGER).float().argmax(1)
    assert set(p.tolist()) == set(range(6))  # uniform in [0, T - 3]


@pytest.mark.parametrize("seqlen, pairs, vocab", [pytest.param(256, 32, 8192, id="T256-K32"),
                                                  pytest.param(64, 16, 64, id="T64-K16-tight"),
                                                  pytest.param(100, 5, 20, id="T100-K5")])
def test_mqar_spec(seqlen, pairs, vocab):
    b = mqar(16, seqlen, pairs, vocab, generator=0)
    assert b.inputs.shape == b.targets.shape == (16, seqlen)
    half = vocab // 2
    keys, values = b.inputs[:, 0:2 * pairs:2], b.inputs[:, 1:2 * pairs:2]
    assert bool(((keys >= 1) & (keys < half)).all()) and bool(((values >= half) & (values < vocab)).all())
    assert all(len(set(row.tolist())) == pairs for row in keys)  # distinct keys per row
    rest, rest_targets = b.inputs[:, 2 * pairs:], b.targets[:, 2 * pairs:]
    queries = rest != MQAR_FILLER
    assert queries.sum(1).tolist() == [pairs] * 16  # every key queried once, filler elsewhere
    assert bool((queries.nonzero()[:, 1] % 2 == 0).all())  # at even offsets of the query region
    assert torch.equal(queries, rest_targets != IGNORE)  # a target exactly at each query
    assert bool((b.targets[:, :2 * pairs] == IGNORE).all())
    for row in range(16):
        value_of = dict(zip(keys[row].tolist(), values[row].tolist()))
        asked = rest[row][queries[row]].tolist()
        assert sorted(asked) == sorted(value_of)
        assert rest_targets[row][queries[row]].tolist() == [value_of[k] for k in asked]


def test_same_seed_same_rows_and_generators_advance():
    a, b = induction_heads(4, 32, generator=7), induction_heads(4, 32, generator=7)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    g = torch.Generator().manual_seed(7)
    first, second = mqar(4, 64, 8, 64, generator=g), mqar(4, 64, 8, 64, generator=g)
    assert not torch.equal(first.inputs, second.inputs)
    assert torch.equal(selective_copying(2, 32, generator=5).inputs, selective_copying(2, 32, generator=5).inputs)


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda: selective_copying(2, 8, 16), "seqlen must be an int >= n_tokens", id="sc-short"),
    pytest.param(lambda: selective_copying(0, 64), "batch_size must be a positive int", id="sc-batch"),
    pytest.param(lambda: induction_heads(2, 2), "seqlen must be an int >= 3", id="ih-short"),
    pytest.param(lambda: mqar(2, 60, 16, 64), r"seqlen must be an int >= 4 \* num_kv_pairs = 64", id="mqar-short"),
    pytest.param(lambda: mqar(2, 64, 16, 31), "vocab_size must be even", id="mqar-odd-vocab"),
    pytest.param(lambda: mqar(2, 256, 40, 64), "vocab_size must be even with vocab_size / 2 - 1 >= num_kv_pairs",
                 id="mqar-few-keys"),
])
def test_bad_arguments_name_themselves(call, message):
    with pytest.raises(ValueError, match=message):
        call()
