"""The serving parts on their own: prefix-state store, per-row seeded sampling, stop sequences, the scheduler."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.data import ByteTokenizer
from mambakit.generation import ChunkPrefillGraphs, InferenceCache, allocate_cache, generate, logits_to_probs, prefill
from mambakit.modules.state import MixerState
from mambakit.serving import BatchSampler, GenerationRequest, PrefixCache, RowParams, Scheduler, request_key
from mambakit.serving.heap import freeze_heap, gc_pauses
from mambakit.serving.prefix_cache import prefix_digest
from mambakit.serving.sampler import exponential_noise
from mambakit.serving.text import TextStream


def _model(layer: str = "Mamba2") -> MambaLM:
    torch.manual_seed(0)
    ssm = {"layer": layer, "d_state": 8, "headdim": 16, "chunk_size": 8} if layer == "Mamba2" else \
        {"layer": layer, "d_state": 8}
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg=ssm)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_prefix_cache_evicts_least_recently_used_within_its_byte_budget():
    model = _model()
    cache, logits = prefill(model, [[1, 2, 3]])
    keys = [[1], [1, 2], [1, 2, 3]]
    entry_bytes = cache.nbytes() + logits.nbytes + 8 * 2  # the state, the logits and the ids (int64) of [1, 2]
    store = PrefixCache(2 * entry_bytes)
    assert store.put(keys[0], prefix_digest(keys[0]).digest(), cache, logits)
    assert store.put(keys[1], prefix_digest(keys[1]).digest(), cache, logits)
    assert store.get(keys[0], prefix_digest(keys[0]).digest()) is not None  # [1] is now the most recent
    assert store.put(keys[2], prefix_digest(keys[2]).digest(), cache, logits)
    # [1] (8 bytes of ids) and [1, 2, 3] (24) fill the budget exactly: [1, 2] had to go
    assert len(store) == 2 and store.nbytes == 2 * entry_bytes
    assert store.get(keys[1], prefix_digest(keys[1]).digest()) is None  # evicted
    hit = store.get(keys[2], prefix_digest(keys[2]).digest())
    assert torch.equal(hit.cache.layers[0].ssm_state, cache.layers[0].ssm_state)
    # a stored copy, not a reference: the live cache moving on does not change it
    with torch.inference_mode():
        cache.layers[0].ssm_state.add_(1.0)
    assert not torch.equal(hit.cache.layers[0].ssm_state, cache.layers[0].ssm_state)
    # a key whose digest matches but whose ids differ is not a hit (verified token for token)
    assert store.get([9, 9, 9], prefix_digest(keys[2]).digest()) is None
    assert not PrefixCache(0).put(keys[0], b"", cache, logits)



def test_prefix_cache_without_copy_shares_the_batch_until_an_entry_is_used_again():
    model = _model()
    cache, logits = prefill(model, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])  # one prefill call, three rows
    logits = logits.reshape(3, -1)

    def row(r: int):
        return InferenceCache([MixerState(s.conv_state[r:r + 1], s.ssm_state[r:r + 1]) for s in cache.layers]), \
            logits[r:r + 1]

    keys = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    one_row = row(0)[0].nbytes() + logits[:1].nbytes + 8 * 3
    store = PrefixCache(2 * one_row)
    for r, key in enumerate(keys[:2]):
        assert store.put(key, prefix_digest(key).digest(), *row(r), copy=False)
    assert store.nbytes == 2 * one_row  # each row is charged its own bytes, not the batch tensor's
    first = store._entries[(3, prefix_digest(keys[0]).digest())]
    assert first.cache.layers[0].ssm_state.data_ptr() == cache.layers[0].ssm_state.data_ptr()  # no copy made
    # a hit gives the entry storage of its own (equal values), so it no longer pins the batch tensor
    hit = store.get(keys[0], prefix_digest(keys[0]).digest())
    assert hit.cache.layers[0].ssm_state.untyped_storage().nbytes() == hit.cache.layers[0].ssm_state.nbytes
    assert hit.logits.untyped_storage().nbytes() == hit.logits.nbytes
    for got, want in zip(hit.cache.layers, row(0)[0].layers):
        assert torch.equal(got.conv_state, want.conv_state) and torch.equal(got.ssm_state, want.ssm_state)
    assert torch.equal(hit.logits, logits[:1])
    # the budget still holds: the third row evicts the least recently used one ([4, 5, 6], never used again)
    assert store.put(keys[2], prefix_digest(keys[2]).digest(), *row(2), copy=False)
    assert len(store) == 2 and store.nbytes == 2 * one_row
    assert store.get(keys[1], prefix_digest(keys[1]).digest()) is None
    # storing a key again also gives it its own storage
    assert store.put(keys[2], prefix_digest(keys[2]).digest(), *row(2), copy=False)
    again = store._entries[(3, prefix_digest(keys[2]).digest())]
    assert again.cache.layers[-1].conv_state.untyped_storage().nbytes() == again.cache.layers[-1].conv_state.nbytes

def test_incremental_prefix_digest_equals_the_digest_of_the_whole_prefix():
    ids = list(range(40))
    h = prefix_digest(ids[:16])
    h = prefix_digest(ids[16:40], h)
    assert h.digest() == prefix_digest(ids).digest()


def test_seeded_noise_does_not_depend_on_the_batch_or_the_slot():
    keys = torch.tensor([request_key(1), request_key(1, 1), request_key(2)])
    steps = torch.tensor([0, 5, 3])
    batch = exponential_noise(keys, steps, 1000)
    for i in range(3):
        assert torch.equal(exponential_noise(keys[i:i + 1], steps[i:i + 1], 1000)[0], batch[i])
    assert not torch.equal(batch[0], exponential_noise(keys[:1], torch.tensor([1]), 1000)[0])  # next step differs
    big = exponential_noise(keys[:1], steps[:1], 200_000)[0]
    assert abs(big.mean().item() - 1.0) < 0.02 and abs(big.std().item() - 1.0) < 0.02 and big.min() > 0


ROW_SETTINGS = [
    pytest.param(RowParams(), id="greedy"),
    pytest.param(RowParams(temperature=0.8, key=request_key(3)), id="temperature"),
    pytest.param(RowParams(temperature=1.0, top_k=3, key=request_key(4)), id="top-k"),
    pytest.param(RowParams(temperature=1.0, top_p=0.5, key=request_key(5)), id="top-p"),
    pytest.param(RowParams(temperature=1.0, min_p=0.2, key=request_key(6)), id="min-p"),
]


@pytest.mark.parametrize("row", ROW_SETTINGS)
def test_a_row_samples_the_same_tokens_alone_and_inside_a_mixed_batch(row):
    torch.manual_seed(1)
    logits = torch.randn(6, 256) * 3
    others = [RowParams(temperature=0.5, top_k=7, key=request_key(9)), RowParams(), RowParams(temperature=2.0, top_p=0.9,
                                                                                           key=request_key(10))]
    batch = BatchSampler(4, 256, 256, torch.device("cpu"))
    alone = BatchSampler(1, 256, 256, torch.device("cpu"))
    batch.set_rows(others[:2] + [row] + others[2:])
    alone.set_rows([row])
    for step in range(6):
        steps = torch.full((4,), step)
        rows = torch.stack([logits[(step + i) % 6] for i in (1, 2, 0, 3)])
        together = batch.sample(rows, steps)
        assert together[2] == alone.sample(logits[step][None], steps[:1])[0]


def test_sampled_rows_follow_the_filters():
    torch.manual_seed(2)
    logits = torch.randn(1, 256) * 2
    allowed_top_k = set(torch.topk(logits[0], 3).indices.tolist())
    allowed_top_p = set(logits_to_probs(logits, top_p=0.5)[0].nonzero().flatten().tolist())
    counts_first = torch.zeros(256)
    for key in range(200):
        sampler = BatchSampler(2, 256, 256, torch.device("cpu"))
        sampler.set_rows([RowParams(temperature=1.0, top_k=3, key=key), RowParams(temperature=1.0, top_p=0.5, key=key)])
        tokens = sampler.sample(logits.expand(2, 256), torch.zeros(2, dtype=torch.long))
        assert tokens[0].item() in allowed_top_k and tokens[1].item() in allowed_top_p
        counts_first[tokens[0]] += 1
    # the top-k draws follow the renormalised distribution (loosely: 200 draws)
    probs = logits_to_probs(logits, top_k=3)[0]
    assert (counts_first / 200 - probs).abs().max() < 0.12


def test_greedy_with_repetition_penalty_equals_generate():
    model = _model()
    prompt = [0] + list(b"to be or not")
    expected = generate(model, [prompt], 12, repetition_penalty=1.5)[0]
    sampler = BatchSampler(1, 256, 256, torch.device("cpu"))
    sampler.set_rows([RowParams(repetition_penalty=1.5)])
    sampler.reset_row(0, prompt)
    cache, logits = prefill(model, [prompt])
    got = []
    for step in range(12):
        token = sampler.sample(logits, torch.tensor([step]))
        got.append(int(token[0]))
        with torch.inference_mode():
            logits = model(token[:, None], cache=cache)[:, -1].float()
    assert got == expected


STOPS = [
    pytest.param("to be or not", ["or"], "to be ", True, id="stop-inside"),
    pytest.param("to be or not", ["not!"], "to be or not", False, id="partial-stop-released-at-the-end"),
    pytest.param("ab\n\ncd", ["\n\n"], "ab", True, id="two-char-stop"),
    pytest.param("héllo", [], "héllo", False, id="multibyte-no-stop"),
]


@pytest.mark.parametrize("text, stops, expected, stopped", STOPS)
def test_text_stream_applies_stop_sequences_and_never_sends_what_it_takes_back(text, stops, expected, stopped):
    stream = TextStream(ByteTokenizer(), stops)
    sent, hit = "", False
    for token in text.encode("utf-8"):
        delta, hit = stream.push(token)
        sent += delta
        if hit:
            break
    if not hit:
        sent += stream.finish()
    assert (sent, hit) == (expected, stopped)
    assert stream.text == expected


def test_scheduler_runs_requests_without_http_and_stops_cleanly():
    """The scheduler alone: two requests of different lengths, greedy, batched; stop() aborts a long one."""
    model = _model("Mamba1")
    scheduler = Scheduler(model, ByteTokenizer(), max_batch_size=4, prefill_chunk=4, prefix_cache_bytes=0).start()
    done = threading.Event()
    results: dict[int, list[int]] = {0: [], 1: []}
    reasons = {}

    def sink_for(i):
        def sink(events):
            for e in events:
                results[i] += e.token_ids
                if e.finish_reason:
                    reasons[i] = e.finish_reason
                    if len(reasons) == 2:
                        done.set()
        return sink

    prompts = [[0] + list(b"to be or not to be"), [0] + list(b"ab")]
    scheduler.submit([GenerationRequest(p, 10, [RowParams()], sink_for(i), ignore_eos=True)
                      for i, p in enumerate(prompts)])
    assert done.wait(30)
    for i, p in enumerate(prompts):
        assert results[i] == generate(model, [p], 10, prefill_tokens_per_call=4)[0]
    assert reasons == {0: "length", 1: "length"}
    aborted = threading.Event()
    scheduler.submit([GenerationRequest(prompts[0], 100_000, [RowParams()],
                                        lambda evs: aborted.set() if any(e.finish_reason == "abort" for e in evs)
                                        else None, ignore_eos=True)])
    scheduler.stop()
    assert aborted.wait(5) and not scheduler._thread.is_alive()


def test_allocate_cache_rows_are_independent_slots():
    """Writing one slot of a batched cache leaves the others as they were (what joining the batch relies on)."""
    model = _model()
    big = allocate_cache(model, 3)
    row, _ = prefill(model, [[1, 2, 3, 4]])
    big.index_copy_(torch.tensor([1]), row)
    assert torch.equal(big.layers[0].ssm_state[1], row.layers[0].ssm_state[0])
    assert big.layers[0].ssm_state[0].abs().sum() == 0 and big.layers[0].ssm_state[2].abs().sum() == 0


class _EosTokenizer(ByteTokenizer):
    """The byte tokenizer with another end-of-document id, so that greedy output meets EOS where a test wants."""

    def __init__(self, eos_id: int):
        super().__init__()
        self.eos_id = eos_id


def _collect(scheduler: Scheduler, requests: list[tuple[list[int], int, list[str]]]) -> list[tuple]:
    """Runs (prompt, max_tokens, stops) requests together; per request (text, token ids, finish reason, events,
    flushes): what its sink got joined, how many sink calls, and how many times its flush ran."""
    done = threading.Semaphore(0)
    got = [{"text": "", "ids": [], "reason": None, "events": 0, "flushes": 0} for _ in requests]

    def sink_for(i):
        def sink(events):
            got[i]["events"] += 1
            for e in events:
                got[i]["text"] += e.text
                got[i]["ids"] += e.token_ids
                if e.finish_reason:
                    got[i]["reason"] = e.finish_reason
                    done.release()
        return sink

    def flush_for(i):
        def flush():
            got[i]["flushes"] += 1
        return flush

    scheduler.submit([GenerationRequest(p, m, [RowParams()], sink_for(i), stops=s, flush=flush_for(i))
                      for i, (p, m, s) in enumerate(requests)])
    for _ in requests:
        assert done.acquire(timeout=60)
    scheduler.stop()
    return [(g["text"], g["ids"], g["reason"], g["events"], g["flushes"]) for g in got]


@pytest.mark.parametrize("decode_steps", [pytest.param(3, id="k3"), pytest.param(8, id="k8")])
def test_a_block_of_k_tokens_is_one_event_and_cuts_at_eos_and_length_inside_it(decode_steps):
    """decode_steps k: every row's k tokens of a block reach its sink as one event (<= ceil(n/k) + 1 sink calls,
    each followed by its flush), and a row cut inside a block (EOS, max_tokens, a stop sequence) gets exactly
    what decode_steps 1 gives, which is generate()'s output."""
    model = _model("Mamba1")
    prompt = [0] + list(b"to be or not to be")
    free_run = generate(model, [prompt], 20, prefill_tokens_per_call=4)[0]
    eos = free_run[6]  # greedy output meets this id first at token 7 (or earlier): a cut inside a block
    cut = free_run.index(eos) + 1
    stop_text = bytes(free_run[3:5]).decode("utf-8", errors="replace")
    requests = [(prompt, 20, []), (prompt[:5], 10, []), (prompt[:8], 19, [stop_text])]
    tokenizer = _EosTokenizer(eos)
    by_k = {}
    for k in (1, decode_steps):
        sched = Scheduler(model, tokenizer, max_batch_size=4, prefill_chunk=4, prefix_cache_bytes=0, decode_steps=k)
        by_k[k] = _collect(sched.start(), requests)
    assert by_k[1][0][1] == free_run[:cut] and by_k[1][0][2] == "stop"
    expected_short = generate(model, [prompt[:5]], 10, prefill_tokens_per_call=4, eos_token_id=eos)[0]
    assert by_k[1][1][1] == expected_short
    for one, many, (_, max_tokens, _) in zip(by_k[1], by_k[decode_steps], requests):
        assert many[:3] == one[:3]  # text, token ids, finish reason
        n = len(many[1])
        assert many[3] <= -(-n // decode_steps) + 1, (many[3], n, decode_steps)
        assert many[4] >= 1 and many[4] == many[3]  # one flush after each iteration that gave it events


WINDOW_TEXTS = [
    pytest.param("plain ascii text", id="ascii"),
    pytest.param("héllo wörld ✓ ok", id="multibyte-split-across-blocks"),
]


class _BytesViaWindow:
    """A non-byte tokenizer (it takes TextStream's window decoder) over UTF-8 bytes: broken bytes decode to U+FFFD."""

    eos_id = None

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


TOKENIZERS = [pytest.param(ByteTokenizer(), id="bytes"), pytest.param(_BytesViaWindow(), id="window")]


@pytest.mark.parametrize("text", WINDOW_TEXTS)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_text_stream_push_many_equals_pushing_token_by_token(text, tokenizer):
    ids = list(text.encode("utf-8"))
    one = TextStream(tokenizer)
    per_token = "".join(one.push(t)[0] for t in ids) + one.finish()
    many = TextStream(tokenizer)
    blocks = [ids[i:i + 3] for i in range(0, len(ids), 3)]  # 3-byte blocks split the 2- and 3-byte characters
    sent = [many.push_many(b) for b in blocks] + [many.finish()]
    assert per_token == "".join(sent) == text
    assert all("\ufffd" not in piece for piece in sent)
    with pytest.raises(ValueError, match="stop sequences"):
        TextStream(tokenizer, ["x"]).push_many(ids)


@pytest.mark.parametrize("decode_steps", [pytest.param(1, id="k1"), pytest.param(4, id="k4")])
def test_a_prompt_at_the_model_length_gets_one_token_and_length(decode_steps):
    """The scheduler alone takes prompts up to any length (the HTTP layer refuses those over the limit): a row
    always takes one token before its length check, in a block as token by token."""
    model = _model()
    prompt = [0] + list(b"to be or not")
    sched = Scheduler(model, ByteTokenizer(), max_batch_size=2, prefill_chunk=4, prefix_cache_bytes=0,
                      decode_steps=decode_steps, max_model_len=len(prompt) - 3)
    [(text, ids, reason, _, _)] = _collect(sched.start(), [(prompt, 5, [])])
    assert ids == generate(model, [prompt], 1, prefill_tokens_per_call=4)[0] and reason == "length"
    assert text == ByteTokenizer().decode(ids)


class _WindowWithEos(_BytesViaWindow):
    def __init__(self, eos_id: int):
        self.eos_id = eos_id


@pytest.mark.parametrize("tokenizer_kind", [pytest.param("bytes", id="bytes"), pytest.param("window", id="window")])
def test_text_made_by_the_reader_equals_the_text_made_by_the_scheduler(tokenizer_kind):
    """detokenize=False (the engine process): rows without stop sequences come as token ids, and
    `detokenize_event` on the reader's side (as EngineClient does) gives the texts the scheduler gives, at an
    EOS cut, at max_tokens and for a choice that a stop sequence ends (always detokenized by the scheduler)."""
    from mambakit.serving.scheduler import detokenize_event

    model = _model("Mamba1")
    prompt = [0] + list(b"to be or not to be")
    free_run = generate(model, [prompt], 20, prefill_tokens_per_call=4)[0]
    eos = free_run[6]
    tokenizer = _EosTokenizer(eos) if tokenizer_kind == "bytes" else _WindowWithEos(eos)
    stop_text = bytes(free_run[3:5]).decode("utf-8", errors="replace")
    requests = [(prompt, 20, []), (prompt[:5], 10, []), (prompt[:8], 19, [stop_text]), ([0, 195], 9, [])]
    by_mode = {}
    for detokenize in (True, False):
        sched = Scheduler(model, tokenizer, max_batch_size=4, prefill_chunk=4, prefix_cache_bytes=0, decode_steps=3,
                          detokenize=detokenize).start()
        done = threading.Semaphore(0)
        got = [{"text": "", "ids": [], "reason": None} for _ in requests]

        def sink_for(i, stops):
            text = TextStream(tokenizer) if not (detokenize or stops) else None

            def sink(events):
                for e in events:
                    got[i]["text"] += e.text if text is None else detokenize_event(text, e.token_ids, e.finish_reason)
                    got[i]["ids"] += e.token_ids
                    if e.finish_reason:
                        got[i]["reason"] = e.finish_reason
                        done.release()
            return sink

        sched.submit([GenerationRequest(p, m, [RowParams()], sink_for(i, s), stops=s)
                      for i, (p, m, s) in enumerate(requests)])
        for _ in requests:
            assert done.acquire(timeout=60)
        sched.stop()
        by_mode[detokenize] = got
    assert by_mode[False] == by_mode[True]
    assert by_mode[True][0]["reason"] == "stop" and by_mode[True][0]["ids"][-1] == eos  # the EOS cut
    assert by_mode[True][1]["reason"] in ("stop", "length") and by_mode[True][2]["reason"] == "stop"
    for g in by_mode[True][:2] + by_mode[True][3:]:  # and that text is right: the whole decode, EOS not in it
        ids = g["ids"][:-1] if g["reason"] == "stop" else g["ids"]
        assert g["text"] == tokenizer.decode(ids) and g["text"]


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_chunk_prefill_graphs_give_the_models_own_prefill_and_hand_out_states_of_their_own(layer):
    """`ChunkPrefillGraphs` without graphs (the CPU runs the captured function eagerly on the same static
    buffers): new prompts in a larger bucket (3 rows of bucket 4, the 4th row stale), then a call mixing
    continuing rows (in another order) with a new prompt; logits and states equal the model's own prefill of the
    same rows, and what a call returned is not touched by the next call."""
    model = _model(layer)
    chunk = 8
    graphs = ChunkPrefillGraphs(model, chunk=chunk, max_rows=6, graphs=False)
    assert graphs.buckets == [1, 2, 4, 6] and not graphs.graphed
    torch.manual_seed(3)
    ids1, ids2 = torch.randint(0, 256, (3, chunk)), torch.randint(0, 256, (3, chunk))
    with torch.inference_mode():
        graphs(torch.randint(0, 256, (4, chunk)), None)  # leaves row 3 of the static buffers non-zero
        logits1, states1 = graphs(ids1, None)
        ref1, ref_logits1 = prefill(model, ids1)
        torch.testing.assert_close(logits1, ref_logits1)
        for got, want in zip(states1.layers, ref1.layers):
            torch.testing.assert_close(got.conv_state, want.conv_state)
            torch.testing.assert_close(got.ssm_state, want.ssm_state)
        kept = [(s.conv_state.clone(), s.ssm_state.clone()) for s in states1.layers]
        rows = [states1.index_select(torch.tensor([2])), None, states1.index_select(torch.tensor([0]))]
        logits2, states2 = graphs(ids2, rows)
        zero = allocate_cache(model, 1)
        entry = InferenceCache([MixerState(torch.cat([a.conv_state[2:3], z.conv_state, a.conv_state[0:1]]),
                                           torch.cat([a.ssm_state[2:3], z.ssm_state, a.ssm_state[0:1]]))
                                for a, z in zip(ref1.layers, zero.layers)], seqlen_offset=chunk)
        _, ref_logits2 = prefill(model, ids2, cache=entry)
        torch.testing.assert_close(logits2, ref_logits2)
        for got, want in zip(states2.layers, entry.layers):
            torch.testing.assert_close(got.ssm_state, want.ssm_state)
            torch.testing.assert_close(got.conv_state, want.conv_state)
    for (conv, ssm), s in zip(kept, states1.layers):  # the second call reused the buffers, not these states
        assert torch.equal(conv, s.conv_state) and torch.equal(ssm, s.ssm_state)
    assert logits1.dtype == torch.float32 and states2.batch_size == 3


def test_chunk_prefill_graphs_refuse_what_they_cannot_run():
    model = _model()
    with pytest.raises(ValueError, match="graphs=True needs a model on CUDA"):
        ChunkPrefillGraphs(model, 8, 4, graphs=True)
    with pytest.raises(ValueError, match="max_rows must be an int >= 1"):
        ChunkPrefillGraphs(model, 8, 0, graphs=False)
    graphs = ChunkPrefillGraphs(model, 8, 4, graphs=False)
    with pytest.raises(ValueError, match=r"ids must be \(n, 8\) with 1 <= n <= 4"):
        graphs(torch.zeros(5, 8, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"ids must be \(n, 8\)"):
        graphs(torch.zeros(2, 7, dtype=torch.long), None)
    with pytest.raises(ValueError, match="one-row entry states"):
        graphs(torch.zeros(2, 8, dtype=torch.long), [None])
    hybrid = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=256, attn_layer_idx=[1],
                                 attn_cfg={"num_heads": 2}, ssm_cfg={"layer": "Mamba2", "headdim": 16}))
    with pytest.raises(ValueError, match="attention layers"):
        ChunkPrefillGraphs(hybrid, 8, 4, graphs=False)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_scheduler_with_prefill_graphs_gives_the_same_tokens(layer):
    """The scheduler's full prefill chunks through `ChunkPrefillGraphs` (eager on the CPU): prompts shorter than,
    equal to and across chunk boundaries, two waves so that the second starts from stored prefixes; the same
    tokens as the scheduler without them, and the graph path was taken."""
    model = _model(layer)
    torch.manual_seed(4)
    base, extra = torch.randint(1, 256, (40,)).tolist(), torch.randint(1, 256, (9,)).tolist()
    first = [base[:n] for n in (3, 8, 16, 21, 40)]
    # hits at 16 and 24, then a full chunk from the stored state (and a partial one); no hit
    second = [base[:16] + extra, base[:24] + extra[:8], base[:5]]
    outputs = {}
    for graphed in (True, False):
        kwargs = dict(max_batch_size=4, prefill_chunk=8, prefix_cache_bytes=1 << 20, prefill_graphs=graphed)
        got, counters, store = [], [], None
        for wave in (first, second):
            scheduler = Scheduler(model, ByteTokenizer(), **kwargs)
            if store is not None:
                scheduler.prefix_cache = store  # the second wave sees the first wave's prefixes
            got.append(_collect(scheduler.start(), [(p, 6, []) for p in wave]))
            counters.append(scheduler.metrics.counters)
            store = scheduler.prefix_cache
        outputs[graphed] = [[ids for _, ids, _, _, _ in wave] for wave in got]
        assert counters[1]["prefix_cache_hits_total"] == 2
        # wave 1: 8 full chunks of 8 tokens in all; wave 2: the two chunks after the hits
        assert [c["prefill_graph_calls_total"] > 0 for c in counters] == [graphed, graphed]
    assert outputs[True] == outputs[False]


def test_gc_pauses_count_this_process_collections_and_freeze_heap_freezes_what_is_alive():
    # other tests of this worker process may have left threads that allocate (a full collection of their own may
    # land in between: hence >=) or a heap frozen by an in-process `serve` (unfrozen first)
    gc.unfreeze()
    pauses = gc_pauses()
    assert gc_pauses() is pauses  # one callback per process
    full, seconds = pauses.collections[2], sum(pauses.seconds)
    gc.collect()
    assert pauses.collections[2] >= full + 1 and sum(pauses.seconds) > seconds
    gauges = pauses.gauges("http_")
    assert set(gauges) == {"http_gc_collections_gen2", "http_gc_pause_seconds", "http_gc_frozen_objects"}
    assert gauges["http_gc_collections_gen2"] >= full + 1 and gauges["http_gc_pause_seconds"] > seconds
    assert gauges["http_gc_frozen_objects"] == 0
    try:
        frozen = freeze_heap()
        assert frozen == gc.get_freeze_count() > 1000  # torch and the test session are alive
        assert pauses.gauges()["gc_frozen_objects"] == frozen
    finally:
        gc.unfreeze()
