"""The compiled CPU decode step (`generate(..., compile=True)`, `CompiledDecoder`, `mambakit generate --compile`).

The compiled step must be only a faster way to run the same step: the same greedy tokens as eager decoding, the
same log-probabilities to float32 rounding, for both layers, ragged batches, bfloat16 weights and int8 weights,
and when the caller holds inference_mode. The SSD step's broadcast form, which only a compiled step takes, is
checked against the eager form and the float64 reference on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.cli.__main__ import main
from mambakit.generation import CompiledDecoder, CUDAGraphDecoder, generate, prefill, stream
from mambakit.generation.compiled import compiled_step
from mambakit.modules import quantize_weights
from mambakit.ops.ssd.reference import ssd_state_update_reference
from mambakit.ops.ssd.torch_step import ssd_state_update_torch

from .helpers import assert_close

pytestmark = pytest.mark.slow  # each case compiles a model (seconds)

_LAYERS = {
    "mamba1": {"layer": "Mamba1", "d_state": 8},
    "mamba2": {"layer": "Mamba2", "d_state": 16, "headdim": 8, "chunk_size": 16},
}


def _model(layer: str, **config) -> MambaLM:
    torch.manual_seed(0)
    config = {"vocab_size": 64, **config}
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, ssm_cfg=_LAYERS[layer], **config)).eval()
    with torch.no_grad():  # a random model's greedy choices are near ties; spread the logits
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layer", list(_LAYERS))
def test_compiled_decoding_gives_eager_tokens_and_logprobs(layer):
    model = _model(layer)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]  # ragged: the rows are padded on the left
    eager, eager_lp = generate(model, prompts, 12, return_logprobs=True)
    compiled, compiled_lp = generate(model, prompts, 12, return_logprobs=True, compile=True)
    assert compiled == eager
    assert_close(torch.tensor(compiled_lp), torch.tensor(eager_lp), rel=1e-5)
    # sampling draws the same tokens from the same logits; stream takes the flag too
    sampled = generate(model, prompts[:1], 10, temperature=0.9, seed=3)
    assert generate(model, prompts[:1], 10, temperature=0.9, seed=3, compile=True) == sampled
    assert list(stream(model, prompts[0], 12, compile=True)) == eager[0]


@pytest.mark.parametrize("layer", list(_LAYERS))
def test_a_prefill_after_the_compile_does_not_compile_the_step_again(layer):
    """The step compiled first (the decoder's constructor), then an eager prefill that loads ops the step never
    looked up: the compiled graph must not depend on which ops have been loaded (the op table's cache of imported
    functions once guarded it, and `mambakit generate --compile` compiled every step twice, the second time inside
    its timed rate: 2.4 ms/token against 0.3 at the default recipe's model)."""
    from mambakit.ops import dispatch

    model = _model(layer)
    dispatch._LOADED.clear()  # as in a fresh process, where the constructor's compile comes before any eager call
    torch._dynamo.reset()
    decoder = CompiledDecoder(model, batch_size=1)
    _, logits = prefill(model, [[1, 2, 3, 4]], cache=decoder.cache.reset())
    assert dispatch._LOADED  # the prefill did load ops eagerly
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            logits = decoder(logits.argmax(-1))


def _teacher_forced(model: MambaLM, decoder: CompiledDecoder, prompts: list[list[int]], steps: int, rel: float):
    """Feed the compiled and the eager step the same tokens; their logits and states must agree within `rel`."""
    _, logits = prefill(model, prompts, cache=decoder.cache.reset())
    eager_cache, _ = prefill(model, prompts)
    for _ in range(steps):
        tokens = logits.argmax(-1)
        logits = decoder(tokens)
        with torch.inference_mode():  # prefill made the eager cache's tensors in inference mode
            eager_logits = model(tokens[:, None], cache=eager_cache, logits_to_keep=1)[:, 0].float()
        assert_close(logits, eager_logits, name="logits", rel=rel)
    assert decoder.cache.seqlen_offset == eager_cache.seqlen_offset
    for mine, theirs in zip(decoder.cache.layers, eager_cache.layers):
        assert_close(mine.ssm_state, theirs.ssm_state, name="ssm_state", rel=rel)
        assert_close(mine.conv_state, theirs.conv_state, name="conv_state", rel=rel)


@pytest.mark.parametrize("layer", list(_LAYERS))
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_compiled_step_of_bfloat16_and_int8_models(layer, weights):
    """Rounded weights: the compiled step is as close to the float32 model as the eager step is (a fused loop
    keeps its intermediates in float32 where the eager ops round each one to bfloat16, so the two differ by more
    than either differs from exact arithmetic)."""
    exact = _model(layer)
    model = copy.deepcopy(exact)
    model = model.to(torch.bfloat16) if weights == "bfloat16" else quantize_weights(model)
    decoder = CompiledDecoder(model, batch_size=2)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    _, logits = prefill(model, prompts, cache=decoder.cache.reset())
    eager_cache, _ = prefill(model, prompts)
    exact_cache, _ = prefill(exact, prompts)
    for _ in range(6):
        tokens = logits.argmax(-1)
        logits = decoder(tokens)
        with torch.inference_mode():
            eager = model(tokens[:, None], cache=eager_cache, logits_to_keep=1)[:, 0].float()
            truth = exact(tokens[:, None], cache=exact_cache, logits_to_keep=1)[:, 0].float()
        err, eager_err = (logits - truth).abs().max(), (eager - truth).abs().max()
        assert err <= 2 * eager_err + 1e-2 * truth.abs().max(), (err, eager_err)
    for mine, theirs, truth in zip(decoder.cache.layers, eager_cache.layers, exact_cache.layers):
        err, eager_err = (mine.ssm_state - truth.ssm_state).abs().max(), (theirs.ssm_state - truth.ssm_state).abs().max()
        assert err <= 2 * eager_err + 1e-2 * truth.ssm_state.abs().max(), (err, eager_err)


def test_compiled_decoding_with_bfloat16_mamba2_states():
    """state_dtype=bfloat16 (Mamba-2's low-precision cache): the compiled step rounds the state as the eager one."""
    model = _model("mamba2")
    prompts = [[1, 2, 3, 4], [5, 6]]
    eager, eager_lp = generate(model, prompts, 12, state_dtype=torch.bfloat16, return_logprobs=True)
    compiled, compiled_lp = generate(model, prompts, 12, state_dtype=torch.bfloat16, return_logprobs=True,
                                     compile=True)
    assert compiled == eager
    assert_close(torch.tensor(compiled_lp), torch.tensor(eager_lp), rel=1e-4)


def test_the_compiled_step_advances_its_cache_and_runs_under_inference_mode():
    model = _model("mamba2")
    decoder = CompiledDecoder(model, batch_size=2)
    cache, _ = prefill(model, [[1, 2, 3], [4, 5, 6]], cache=decoder.cache.reset())
    assert cache is decoder.cache and cache.seqlen_offset == 3
    with torch.inference_mode():  # the caller's inference_mode (generate's own loop holds one too)
        _teacher_forced(model, decoder, [[1, 2, 3], [4, 5, 6]], steps=4, rel=1e-5)
    assert decoder.cache.seqlen_offset == 7


def test_each_model_keeps_its_own_compiled_step():
    """One step per model and batch size, reused by every later decoder of them, so a second generate() of the
    same shape compiles nothing."""
    a, b = _model("mamba1"), _model("mamba1")
    assert compiled_step(a, 1) is compiled_step(a, 1) is CompiledDecoder(a, 1)._step
    assert CompiledDecoder(a, 3)._step is compiled_step(a, 3) is not compiled_step(a, 1)
    assert compiled_step(b, 1) is not compiled_step(a, 1)
    # a code object each (equal in value, distinct objects: dynamo keeps graphs per object), so dynamo's limit of
    # 8 graphs per code object never binds
    codes = {id(compiled_step(m, n).__wrapped__.__code__) for m in (a, b) for n in (1, 3)}
    assert len(codes) == 4


def test_compile_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="attention"):
        CompiledDecoder(_model("mamba1", attn_layer_idx=[1], attn_cfg={"num_heads": 2}), batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        CompiledDecoder(_model("mamba1"), batch_size=0)
    model = _model("mamba2")
    with pytest.raises(ValueError, match="compile must be a bool"):
        generate(model, [[1, 2]], 2, compile="yes")
    with pytest.raises(ValueError, match="choose one"):
        generate(model, [[1, 2]], 2, compile=True, cuda_graph=CUDAGraphDecoder(model, 1))
    decoder = CompiledDecoder(model, batch_size=2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        decoder(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("ngroups, d_shape, gated", [(1, "H", True), (2, "HP", False)])
def test_the_ssd_steps_broadcast_form_equals_the_eager_form(ngroups, d_shape, gated):
    """The form only a compiled step takes (one fused pass over the state) against the eager one and float64."""
    torch.manual_seed(1)
    b, H, P, N = 2, 4, 8, 16
    state = torch.randn(b, H, P, N)
    x, z = torch.randn(b, H, P), torch.randn(b, H, P) if gated else None
    dt, A, dt_bias = torch.randn(b, H), -torch.rand(H) - 0.1, torch.randn(H)
    B, C = torch.randn(b, ngroups, N), torch.randn(b, ngroups, N)
    D = torch.randn(H) if d_shape == "H" else torch.randn(H, P)
    args = (x, dt, A, B, C)
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

    eager_state = state.clone()
    y_eager, _ = ssd_state_update_torch(eager_state, *args, **kwargs)
    compiled_state = state.clone()
    step = torch.compile(ssd_state_update_torch, fullgraph=True, dynamic=False)
    y_compiled, out_state = step(compiled_state, *args, **kwargs)
    y_ref, ref_state = ssd_state_update_reference(state.double(), *(t.double() for t in args), D=D.double(),
                                          z=None if z is None else z.double(), dt_bias=dt_bias.double(),
                                          dt_softplus=True)
    assert out_state.data_ptr() == compiled_state.data_ptr()  # updated in place, as the eager step does
    assert_close(y_compiled, y_eager, rel=1e-5)
    assert_close(compiled_state, eager_state, rel=1e-5)
    assert_close(y_compiled.double(), y_ref, rel=1e-5)
    assert_close(compiled_state.double(), ref_state, rel=1e-5)


def test_cli_generate_compile(tmp_path, capsys):
    from mambakit.data import ByteTokenizer

    model = _model("mamba2", vocab_size=256)
    model.save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    flags = ["generate", "--model", str(tmp_path / "model"), "--prompt", "ab", "--max-new-tokens", "6",
             "--temperature", "0"]
    assert main(flags) == 0
    eager = capsys.readouterr().out
    assert main(flags + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    hybrid = _model("mamba1", vocab_size=256, attn_layer_idx=[1], attn_cfg={"num_heads": 2})
    hybrid.save_pretrained(tmp_path / "hybrid", tokenizer=ByteTokenizer())
    flags[2] = str(tmp_path / "hybrid")
    assert main(flags + ["--compile"]) == 2
    assert "only Mamba models without attention layers" in capsys.readouterr().err


def test_a_compiled_scheduler_gives_each_request_what_generate_gives():
    """`mambakit serve --compile`: the serving scheduler's decode step compiled at its batch-size buckets; three
    requests at once (bucket 4, one free slot computing garbage nobody reads) each get generate()'s tokens."""
    import threading

    from mambakit.data import ByteTokenizer
    from mambakit.serving import GenerationRequest, RowParams, Scheduler

    model = _model("mamba2", vocab_size=256)
    with pytest.raises(ValueError, match="compile must be a bool"):
        Scheduler(model, ByteTokenizer(), compile=1)
    with pytest.raises(ValueError, match="attention"):
        Scheduler(_model("mamba1", vocab_size=256, attn_layer_idx=[1], attn_cfg={"num_heads": 2}), ByteTokenizer(),
                  max_batch_size=2, compile=True)
    sched = Scheduler(model, ByteTokenizer(), max_batch_size=4, prefill_chunk=4, prefix_cache_bytes=0, compile=True)
    assert sorted(sched.decoder.compiled) == [1, 2, 4]  # every bucket compiled before the first request
    sched.start()
    prompts = [[0] + list(b"to be or not"), [0] + list(b"ab"), [0] + list(b"xyz q")]
    results: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished = threading.Semaphore(0)

    def sink_for(i):
        def sink(events):
            for e in events:
                results[i] += e.token_ids
                if e.finish_reason:
                    finished.release()
        return sink

    try:
        sched.submit([GenerationRequest(p, 12, [RowParams()], sink_for(i), ignore_eos=True)
                      for i, p in enumerate(prompts)])
        for _ in prompts:
            assert finished.acquire(timeout=60)
    finally:
        sched.stop()
    for i, p in enumerate(prompts):
        assert results[i] == generate(model, [p], 12, prefill_tokens_per_call=4)[0]
