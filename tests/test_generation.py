"""Generation: greedy == argmax of the parallel forward, ragged and chunked prefill, sampling filters, EOS and stop
strings, stream == generate, CUDA-graph decoding == eager (GPU), and the benchmark's Transformer baseline."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.generation import (
    CUDAGraphDecoder,
    allocate_cache,
    apply_repetition_penalty,
    decode_one_token,
    generate,
    greedy,
    logits_to_probs,
    prefill,
    sample,
    seen_tokens,
    stream,
)

from .helpers import assert_close

LAYERS = [
    pytest.param({"layer": "Mamba1", "d_state": 8}, id="mamba1"),
    pytest.param({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}, id="mamba2"),
]
VOCAB = 37  # padded to 40: ids 37..39 exist in the logits but must never be produced


def _model(ssm_cfg, vocab=VOCAB, device="cpu") -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, ssm_cfg=ssm_cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # sharper logits: greedy ties become impossible in practice
    return model.to(device)


def _states(cache):
    return [t for s in cache.layers for t in (s.conv_state, s.ssm_state)]


def _assert_row_matches(cache, logits, i, alone, alone_logits, rel=1e-5):
    """Row i of a batch prefill (cache, logits (B, V)) equals a one-row prefill of that row alone."""
    assert_close(logits[i], alone_logits[0], name=f"row {i} logits", rel=rel)
    for j, (a, b) in enumerate(zip(_states(cache), _states(alone))):
        assert_close(a[i], b[0], name=f"row {i} state {j}", rel=rel)


def _decode_text(ids):
    """A one-character-per-token 'tokenizer' for stop strings: id i is chr(65 + i)."""
    return "".join(chr(65 + i) for i in ids)


# ---- low-precision states ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_bf16_states_track_float32_states(ssm_cfg):
    """A bfloat16 SSM-state cache (state_dtype) decodes what the float32 one does, up to bf16 rounding of
    the state: prefill + 12 steps, logits within a few bf16 ulps, the same greedy tokens; the cache holds
    bfloat16 states and prefill/decode update them in place (Mamba-1 since session 39, as mamba_ssm keeps it)."""
    model = _model(ssm_cfg)
    prompt = torch.randint(0, VOCAB, (3, 11))
    fp32, logits32 = prefill(model, prompt)
    bf16 = model.allocate_cache(3, state_dtype=torch.bfloat16)
    ptrs = [s.ssm_state.data_ptr() for s in bf16.layers]
    bf16, logits16 = prefill(model, prompt, cache=bf16)
    assert all(s.ssm_state.dtype == torch.bfloat16 for s in bf16.layers)
    assert [s.ssm_state.data_ptr() for s in bf16.layers] == ptrs
    assert_close(logits16, logits32, name="prefill logits", rel=2e-2)
    tokens = logits32.argmax(-1)
    for step in range(12):
        logits32 = decode_one_token(model, tokens, fp32)
        logits16 = decode_one_token(model, tokens, bf16)
        assert_close(logits16, logits32, name=f"step {step} logits", rel=3e-2)
        for a, b in zip(fp32.layers, bf16.layers):
            assert_close(b.ssm_state.float(), a.ssm_state, name=f"step {step} state", rel=2e-2)
        tokens = logits32.argmax(-1)
    new32 = generate(model, prompt, max_new_tokens=10)
    assert generate(model, prompt, max_new_tokens=10, state_dtype=torch.bfloat16) == new32
    assert list(stream(model, prompt[0].tolist(), 10, state_dtype=torch.bfloat16)) == new32[0]


def test_state_dtype_is_checked():
    with pytest.raises(ValueError, match="Mamba1.allocate_state: state_dtype must be float32, float64, bfloat16"):
        allocate_cache(_model(LAYERS[0].values[0]), 2, state_dtype=torch.int8)
    assert allocate_cache(_model(LAYERS[0].values[0]), 2, state_dtype=torch.float16).layers[0].ssm_state.dtype == \
        torch.float16
    with pytest.raises(ValueError, match="Mamba2.allocate_state: state_dtype must be float32, float64, bfloat16"):
        allocate_cache(_model(LAYERS[1].values[0]), 2, state_dtype=torch.int8)


# ---- greedy, prefill ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_greedy_equals_argmax_of_parallel_forward(ssm_cfg):
    model = _model(ssm_cfg)
    prompt = torch.randint(0, VOCAB, (2, 9))
    new = torch.tensor(generate(model, prompt, max_new_tokens=12))
    seq = torch.cat([prompt, new], dim=1)
    with torch.no_grad():
        logits = model(seq)[:, 8:-1, :VOCAB]
    assert torch.equal(logits.argmax(-1), new)


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_prefill_in_several_calls_equals_one_shot(ssm_cfg):
    """Chunks inside one call, and a long input streamed through several calls, give one-shot's logits and states."""
    model = _model(ssm_cfg)
    ids = torch.randint(0, VOCAB, (2, 50))
    one_cache, one_logits = prefill(model, ids, tokens_per_call=None)
    with torch.no_grad():
        assert_close(one_logits, model(ids)[:, -1].float(), name="one-shot prefill vs forward", rel=1e-5)
    chunked_cache, chunked_logits = prefill(model, ids, tokens_per_call=7)
    streamed, logits = None, None
    for piece in torch.split(ids, 13, dim=1):
        streamed, logits = prefill(model, piece, streamed, tokens_per_call=5)
    for name, cache, got in (("7 tokens per call", chunked_cache, chunked_logits), ("streamed", streamed, logits)):
        assert cache.seqlen_offset == 50
        assert_close(got, one_logits, name=f"logits, {name}", rel=1e-5)
        for i, (a, b) in enumerate(zip(_states(cache), _states(one_cache))):
            assert_close(a, b, name=f"state {i}, {name}", rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
@pytest.mark.parametrize("tokens_per_call", [pytest.param(None, id="one-call"), pytest.param(3, id="3-per-call")])
def test_ragged_prefill_gives_each_row_its_own_state(ssm_cfg, tokens_per_call):
    """Left padding + seq_idx: each row's logits and states equal those of the row alone. Chunk 3 cuts the
    batch so that rows start mid-call, exactly at a call boundary (pads 3 and 6), and in the last call."""
    model = _model(ssm_cfg)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14, 15], [16, 17]]  # pads 0, 6, 4, 3, 5
    cache, logits = prefill(model, prompts, tokens_per_call=tokens_per_call)
    assert cache.seqlen_offset == 7
    for i, p in enumerate(prompts):
        _assert_row_matches(cache, logits, i, *prefill(model, [p], tokens_per_call=None))


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_ragged_continuation_leaves_other_rows_untouched(ssm_cfg):
    """Continuing a cache with prompts of different lengths: each row continues its own state only."""
    model = _model(ssm_cfg)
    first = torch.randint(0, VOCAB, (3, 6))
    more = [[1, 2, 3, 4], [5], [6, 7]]
    cache, _ = prefill(model, first)
    cache, logits = prefill(model, more, cache)
    for i in range(3):
        alone, _ = prefill(model, first[i:i + 1])
        _assert_row_matches(cache, logits, i, *prefill(model, [more[i]], alone))


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_ragged_batch_generates_what_each_row_generates_alone(ssm_cfg):
    model = _model(ssm_cfg)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14]]
    batched = generate(model, prompts, max_new_tokens=10)
    alone = [generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone


@pytest.mark.slow
def test_decode_one_token_matches_forward_and_updates_cache_in_place():
    model = _model({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8})
    ids = torch.randint(0, VOCAB, (2, 8))
    cache, _ = prefill(model, ids[:, :7])
    addresses = [t.data_ptr() for t in _states(cache)]
    logits = decode_one_token(model, ids[:, 7], cache)
    with torch.no_grad():
        assert_close(logits, model(ids)[:, -1], name="decode step vs forward", rel=1e-5)
    assert [t.data_ptr() for t in _states(cache)] == addresses  # what a CUDA graph relies on
    assert cache.seqlen_offset == 8


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_decode_sees_parameter_updates(ssm_cfg):
    """The step path keeps fp32 copies of A, D and the dt bias; an in-place update (an optimizer step) or a
    rebound parameter (load with assign) must reach the next decode step."""
    model = _model(ssm_cfg)
    ids = torch.randint(0, VOCAB, (2, 6))
    generate(model, ids, 3)  # fills the copies
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.A_log.add_(0.7)
        mixer.D.mul_(1.5)
    mixer.A_log = torch.nn.Parameter(mixer.A_log.detach().clone() * 0.9)
    cache, _ = prefill(model, ids[:, :5])
    logits = decode_one_token(model, ids[:, 5], cache)
    with torch.no_grad():
        assert_close(logits, model(ids)[:, -1], name="decode after parameter updates", rel=1e-5)


# ---- sampling ----------------------------------------------------------------------------------------------


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
    # filters compose in order: top-k 4 renormalises to /0.95, then top-p 0.7 needs 0.5/.95 + 0.2/.95 = 0.737
    assert_close(logits_to_probs(logits, top_k=4, top_p=0.7), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]), rel=1e-6)
    # rows are filtered independently
    two = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]]))
    assert_close(logits_to_probs(two, top_k=1), torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0]]), rel=1e-6)


def test_repetition_penalty_and_sampler_distribution():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5]]), rel=0)
    # the penalised distribution: softmax([1, -2, 0.5])
    expected = torch.softmax(torch.tensor([[1.0, -2.0, 0.5]]), -1)
    assert_close(logits_to_probs(apply_repetition_penalty(logits, seen, 2.0)), expected, rel=1e-6)
    probs = torch.tensor([[0.6, 0.3, 0.1]]).expand(20000, 3)
    draws = sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 20000
    assert_close(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.015, rel=0)
    assert torch.equal(greedy(torch.tensor([[0.1, 3.0, 2.0], [5.0, 0.0, 1.0]])), torch.tensor([1, 0]))


def test_seen_tokens_ignores_padding():
    ids = torch.tensor([[0, 0, 5, 5], [3, 0, 4, 7]])
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    seen = seen_tokens(ids, valid, 8)
    assert seen[0].nonzero().flatten().tolist() == [5]
    assert seen[1].nonzero().flatten().tolist() == [0, 3, 4, 7]


@pytest.mark.slow
def test_repetition_penalty_in_generate_follows_the_hand_loop():
    """Greedy with a penalty equals a loop over the parallel forward that penalises every token seen so far
    (the row's own prompt, without the padding of the ragged batch, and its output)."""
    model = _model({"layer": "Mamba1", "d_state": 8})
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10]]
    got = generate(model, prompts, 10, repetition_penalty=1.7)
    for prompt, row in zip(prompts, got):
        seq = list(prompt)
        for _ in range(10):
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[:, -1, :VOCAB]
            seen = torch.zeros(1, VOCAB, dtype=torch.bool)
            seen[0, seq] = True
            seq.append(int(apply_repetition_penalty(logits, seen, 1.7).argmax()))
        assert row == seq[len(prompt):]
    assert got != generate(model, prompts, 10)  # the penalty changed something


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_never_yields_padded_ids():
    model = _model({"layer": "Mamba1", "d_state": 8})
    a = generate(model, [[1, 2], [3, 4]], 30, temperature=1.5, seed=11)
    assert a == generate(model, [[1, 2], [3, 4]], 30, temperature=1.5, seed=11)
    assert a != generate(model, [[1, 2], [3, 4]], 30, temperature=1.5, seed=12)
    assert all(0 <= t < VOCAB for row in a for t in row)  # padded vocab ids (37..39) are never produced


# ---- stopping ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eos_stops_each_row_separately():
    model = _model({"layer": "Mamba1", "d_state": 8})
    prompts = [[1, 2, 3], [20, 21]]
    free = generate(model, prompts, 16)
    eos = next(t for t in free[0][2:] if t not in free[1])  # ends row 0 early, never row 1
    stopped = generate(model, prompts, 16, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    assert stopped[1] == free[1]
    # a list of EOS ids: the first of them to appear ends the row
    both = generate(model, prompts, 16, eos_token_id=[eos, free[1][5]])
    assert both[1] == free[1][: free[1].index(free[1][5]) + 1]
    # sampled rows stop at their own EOS too
    sampled = generate(model, prompts, 40, temperature=1.0, seed=3)
    eos_s = sampled[0][4]
    cut = generate(model, prompts, 40, temperature=1.0, seed=3, eos_token_id=eos_s)
    for row, full in zip(cut, sampled):
        assert row == (full[: full.index(eos_s) + 1] if eos_s in full else full)


@pytest.mark.slow
def test_stop_strings_end_rows_at_the_completing_token():
    model = _model({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8})
    prompts = [[1, 2, 3], [20, 21, 22, 23]]
    free = generate(model, prompts, 20)
    stop = _decode_text(free[0][3:5])  # two characters that occur in row 0
    got = generate(model, prompts, 20, stop_strings=[stop], decode=_decode_text)
    for row, full in zip(got, free):
        text = _decode_text(full)
        end = text.find(stop)
        assert row == (full[: end + len(stop)] if end >= 0 else full)
    assert len(got[0]) <= 5
    # stream stops at the same token
    assert list(stream(model, prompts[0], 20, stop_strings=[stop], decode=_decode_text)) == got[0]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(temperature=0.9, top_k=10, top_p=0.9, seed=7), id="sampled"),
    pytest.param(dict(temperature=0.0, repetition_penalty=1.3), id="greedy-penalty"),
    pytest.param(dict(temperature=1.2, min_p=0.05, seed=1, eos_token_id=[5, 6]), id="eos"),
])
def test_stream_yields_what_generate_returns(kwargs):
    model = _model({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8})
    prompt = [3, 1, 4, 1, 5]
    streamed = list(stream(model, prompt, 25, **kwargs))
    assert streamed == generate(model, [prompt], 25, **kwargs)[0]
    assert _decode_text(streamed) == _decode_text(generate(model, torch.tensor([prompt]), 25, **kwargs)[0])


# ---- CUDA graphs -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cuda_graph_decoder_falls_back_to_eager_on_cpu():
    model = _model({"layer": "Mamba1", "d_state": 8})
    prompts = [[1, 2, 3], [4, 5]]
    decoder = CUDAGraphDecoder(model, batch_size=2)
    assert not decoder.graphed
    eager = generate(model, prompts, 8)
    assert generate(model, prompts, 8, cuda_graph=True) == eager
    assert generate(model, prompts, 8, cuda_graph=decoder) == eager
    assert generate(model, prompts, 8, cuda_graph=decoder) == eager  # a reused decoder starts afresh
    with pytest.raises(ValueError, match="captured for batch 2"):
        generate(model, [[1]], 3, cuda_graph=decoder)


@pytest.mark.gpu
@pytest.mark.parametrize("ssm_cfg", LAYERS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_graph_decoding_equals_eager(ssm_cfg, dtype):
    model = _model(ssm_cfg, device="cuda").to(dtype)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    eager = generate(model, prompts, 24)
    decoder = CUDAGraphDecoder(model, batch_size=3)
    assert decoder.graphed
    assert generate(model, prompts, 24, cuda_graph=decoder) == eager
    assert generate(model, prompts, 24, cuda_graph=decoder) == eager  # replayed again from a reset cache
    assert generate(model, prompts, 24, cuda_graph=True) == eager
    sampled = dict(temperature=1.0, top_p=0.9, seed=5)
    assert generate(model, prompts, 24, cuda_graph=True, **sampled) == generate(model, prompts, 24, **sampled)


@pytest.mark.gpu
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_ragged_and_chunked_prefill_on_gpu(ssm_cfg):
    """The Triton kernels' seq_idx + initial-state path: ragged rows equal each row alone, chunks equal one shot."""
    model = _model(ssm_cfg, device="cuda")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14, 15]]
    cache, logits = prefill(model, prompts, tokens_per_call=3)
    for i, p in enumerate(prompts):
        _assert_row_matches(cache, logits, i, *prefill(model, [p], tokens_per_call=None), rel=1e-3)
    ids = torch.randint(0, VOCAB, (2, 300), device="cuda")
    one, one_logits = prefill(model, ids, tokens_per_call=None)
    chunked, chunked_logits = prefill(model, ids, tokens_per_call=64)
    assert_close(chunked_logits, one_logits, name="chunked logits", rel=1e-3)
    for j, (a, b) in enumerate(zip(_states(chunked), _states(one))):
        assert_close(a, b, name=f"chunked state {j}", rel=1e-3)


# ---- arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(top_p=0.0), "top_p must be in", id="top_p-0"),
    pytest.param(dict(top_p=1.5), "top_p must be in", id="top_p-above-1"),
    pytest.param(dict(temperature=-1), "temperature must be", id="temperature"),
    pytest.param(dict(top_k=-2), "top_k must be", id="top_k"),
    pytest.param(dict(min_p=1.0), "min_p must be", id="min_p"),
    pytest.param(dict(repetition_penalty=0.0), "repetition_penalty must be", id="penalty"),
    pytest.param(dict(eos_token_id="x"), "eos_token_id must be", id="eos"),
    pytest.param(dict(stop_strings=["\n"]), "needs decode=", id="stop-without-decode"),
    pytest.param(dict(stop_strings=[""], decode=_decode_text), "non-empty strings", id="empty-stop"),
    pytest.param(dict(cuda_graph="yes"), "cuda_graph must be", id="cuda_graph"),
    pytest.param(dict(prefill_tokens_per_call=0), "prefill_tokens_per_call must be", id="tokens-per-call"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    model = _model({"layer": "Mamba1", "d_state": 8})
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2]], 3, **kwargs)


def test_generate_and_prefill_reject_bad_prompts():
    model = _model({"layer": "Mamba1", "d_state": 8})
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 40\)"):
        generate(model, [[1, 99]], 3)
    with pytest.raises(ValueError, match="integer"):
        generate(model, torch.rand(1, 4), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], -1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream(model, [1], 2.5)
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        prefill(model, [[1, 2]], allocate_cache(model, 2))
    with pytest.raises(ValueError, match="top_p"):
        logits_to_probs(torch.zeros(1, 4), top_p=0)
    assert generate(model, [[1], [2, 3]], 0) == [[], []]


# ---- the benchmark's Transformer baseline ------------------------------------------------------------------


def _baseline_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "transformer_baseline.py"
    name = "_bench_transformer_baseline"
    if name not in sys.modules:  # dataclasses look their module up in sys.modules while it executes
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.slow
def test_transformer_baseline_cached_decoding_equals_parallel_forward():
    tb = _baseline_module()
    torch.manual_seed(0)
    model = tb.TransformerLM(tb.TransformerConfig(d_model=32, n_layer=2, n_head=4, d_ff=48, vocab_size=53)).eval()
    ids = torch.randint(0, 53, (3, 19))
    with torch.no_grad():
        full = model(ids)
    decoder = tb.TransformerDecoder(model, batch_size=3, max_len=24, bucket=4)
    logits = [model.prefill(ids[:, :6], decoder.cache, rows_per_call=2)]
    logits += [decoder(ids[:, pos], pos).clone() for pos in range(6, 19)]
    assert_close(torch.stack(logits, dim=1), full[:, 5:], name="prefill + cached steps", rel=1e-5)
    assert [tb.bucket_len(p, 4, 24) for p in (0, 3, 4, 22, 23)] == [4, 4, 8, 24, 24]
