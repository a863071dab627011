"""The scheduler on a GPU (run on the GPU machine: pytest -m gpu): CUDA-graph decode at batch buckets and
several decode steps per round trip give what eager decoding and `generate()` give; the engine process
(model and graphs in a spawned process) gives what the scheduler thread gives."""

from __future__ import annotations

import asyncio
import functools
import os
import threading

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.data import ByteTokenizer
from mambakit.generation import ChunkPrefillGraphs, generate
from mambakit.serving import GenerationRequest, RowParams, Scheduler, request_key
from mambakit.serving.engine import EngineClient

DEVICE = os.environ.get("MAMBAKIT_SERVING_TEST_DEVICE", "cuda")  # "cpu" checks this file's harness off the GPU

LAYERS = [
    pytest.param({"layer": "Mamba1", "d_state": 16}, id="mamba1"),
    pytest.param({"layer": "Mamba2", "d_state": 32, "headdim": 32, "chunk_size": 16}, id="mamba2"),
]


def _model(ssm_cfg: dict) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256, ssm_cfg=dict(ssm_cfg))).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _engine_build(ssm_cfg: dict) -> tuple:
    """In the engine process: the same model as `_model` (same seeds, same device) and its tokenizer."""
    return _model(ssm_cfg), ByteTokenizer()


def _collect(scheduler: Scheduler | EngineClient, prompts: list[list[int]], max_tokens: list[int],
             params: list[RowParams]) -> list[list[int]]:
    """Submit all requests at once; each one's new tokens."""
    results: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(events):
            for e in events:
                assert e.error is None, e.error
                results[i] += e.token_ids
                if e.finish_reason is not None:
                    finished.release()
        return sink

    requests = [GenerationRequest(p, m, [r], sink_for(i), ignore_eos=True)
                for i, (p, m, r) in enumerate(zip(prompts, max_tokens, params))]
    asyncio.run(scheduler.submit_async(requests))
    for _ in prompts:
        assert finished.acquire(timeout=300)
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("ssm_cfg", LAYERS)
@pytest.mark.parametrize("decode_steps", [pytest.param(1, id="k1"), pytest.param(8, id="k8")])
def test_graphed_scheduler_equals_eager_and_generate(ssm_cfg, decode_steps):
    model = _model(ssm_cfg)
    torch.manual_seed(1)
    prompts = [torch.randint(1, 256, (n,)).tolist() for n in (5, 40, 1, 17, 70, 9, 33, 3, 128, 12, 2)]
    max_tokens = [3 + (7 * i) % 29 for i in range(len(prompts))]
    params = [RowParams() if i % 2 == 0 else RowParams(temperature=0.9, top_p=0.9, key=request_key(i))
              for i in range(len(prompts))]
    outputs = {}
    for graphed in (True, False):
        scheduler = Scheduler(model, ByteTokenizer(), max_batch_size=8, prefill_chunk=16, cuda_graph=graphed,
                              decode_steps=decode_steps, prefix_cache_bytes=0).start()
        try:
            if graphed and DEVICE == "cuda":
                assert scheduler.decoder.buckets == [1, 2, 4, 8]
                assert scheduler.prefill_graphs.graphed and scheduler.prefill_graphs.buckets == [1, 2, 4, 8]
            outputs[graphed] = _collect(scheduler, prompts, max_tokens, params)
            # full chunks of 16 (prompts of 17, 33, 40, 70, 128 tokens) went through the prefill graphs
            assert (scheduler.metrics.counters["prefill_graph_calls_total"] > 0) == (graphed and DEVICE == "cuda")
            gauges = scheduler.gauges()  # the caching allocator's figures, on CUDA only
            assert ("device_mallocs" in gauges) == (DEVICE == "cuda")
            if DEVICE == "cuda":
                assert gauges["device_mallocs"] >= 1 and gauges["device_reserved_bytes"] > 0
        finally:
            scheduler.stop()
    assert outputs[True] == outputs[False]
    for i in range(0, len(prompts), 2):  # the greedy ones: generate() alone, same prefill chunks
        assert outputs[True][i] == generate(model, [prompts[i]], max_tokens[i], prefill_tokens_per_call=16)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_the_engine_process_gives_what_the_scheduler_thread_gives(ssm_cfg):
    """--engine-process on the device: the model, CUDA graphs and k=8 blocks in a spawned process; the tokens
    (greedy and seeded sampling) are those of the same scheduler in this process."""
    model = _model(ssm_cfg)
    torch.manual_seed(2)
    prompts = [torch.randint(1, 256, (n,)).tolist() for n in (5, 40, 1, 17, 70, 9)]
    max_tokens = [3 + (11 * i) % 37 for i in range(len(prompts))]
    params = [RowParams() if i % 2 == 0 else RowParams(temperature=0.8, top_k=20, key=request_key(i))
              for i in range(len(prompts))]
    kwargs = dict(max_batch_size=8, prefill_chunk=16, decode_steps=8, prefix_cache_bytes=0)
    scheduler = Scheduler(model, ByteTokenizer(), **kwargs).start()
    try:
        expected = _collect(scheduler, prompts, max_tokens, params)
    finally:
        scheduler.stop()
    engine = EngineClient(functools.partial(_engine_build, ssm_cfg), ByteTokenizer(), kwargs, start_timeout=300)
    try:
        assert engine.device.startswith(DEVICE)
        assert _collect(engine, prompts, max_tokens, params) == expected
    finally:
        engine.stop()
    assert not engine.process.is_alive() and engine.process.exitcode == 0


@pytest.mark.gpu
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_chunk_prefill_graphs_replay_what_the_eager_calls_compute(ssm_cfg):
    """Replayed prefill graphs against the same calls run eagerly on the same static buffers: new prompts in a
    larger bucket, then rows continuing (reordered) beside a new prompt; logits and states agree, and the states a
    call returned survive the next replay."""
    model = _model(ssm_cfg)
    chunk = 32
    replayed = ChunkPrefillGraphs(model, chunk=chunk, max_rows=8)
    eager = ChunkPrefillGraphs(model, chunk=chunk, max_rows=8, graphs=False)
    assert replayed.graphed == (DEVICE == "cuda") and replayed.buckets == [1, 2, 4, 8]
    torch.manual_seed(5)
    ids1 = torch.randint(0, 256, (5, chunk), device=DEVICE)
    ids2 = torch.randint(0, 256, (3, chunk), device=DEVICE)
    with torch.inference_mode():
        results = []
        for graphs in (replayed, eager):
            logits1, states1 = graphs(ids1, None)
            kept = states1.layers[0].ssm_state.clone()
            rows = [states1.index_select(torch.tensor([i], device=DEVICE)) for i in (4, 0)] + [None]
            logits2, states2 = graphs(ids2, rows)
            assert torch.equal(states1.layers[0].ssm_state, kept)
            results.append((logits1, states1, logits2, states2))
    (a1, s1, a2, s2), (b1, t1, b2, t2) = results
    torch.testing.assert_close(a1, b1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a2, b2, rtol=1e-5, atol=1e-5)
    for x, y in zip(s1.layers + s2.layers, t1.layers + t2.layers):
        torch.testing.assert_close(x.ssm_state, y.ssm_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.conv_state, y.conv_state, rtol=1e-5, atol=1e-5)
