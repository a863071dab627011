"""ops.linear_cross_entropy and MambaLM(..., targets=): the loss without the logits matrix.

Against the float64 whole-matrix reference (loss and both gradients), ignore_index, chunk sizes that do and do not
divide the rows, autocast (the plain lm_head + F.cross_entropy path under the same autocast), torch.compile
(fullgraph), the model's loss against its logits, the trainer's step, and an lm_head adapter that must not be
skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLM
from mambakit.ops import linear_cross_entropy
from mambakit.ops.cross_entropy.torch_ce import default_rows_per_chunk
from tests.helpers import assert_close

# tests that run the Triton backend make their tensors here (_inputs(device=DEVICE)): CUDA, else the CPU (interpreter)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(rows=37, d=16, vocab=50, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(rows, d, generator=gen, dtype=dtype, device=device).requires_grad_()
    weight = torch.randn(vocab, d, generator=gen, dtype=dtype, device=device).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    targets[::5] = -100  # unscored rows
    return hidden, weight, targets


def _grads(loss_fn, hidden, weight):
    hidden.grad = weight.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows_per_chunk", [None, 1, 8, 37, 64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_the_float64_reference(rows_per_chunk, reduction, backend):
    hidden, weight, targets = _inputs(device=DEVICE)
    got = _grads(lambda: linear_cross_entropy(hidden, weight, targets, reduction=reduction,
                                              rows_per_chunk=rows_per_chunk, backend=backend), hidden, weight)
    ref = _grads(lambda: linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend="reference"),
                 hidden, weight)
    plain = F.cross_entropy((hidden.double() @ weight.double().t()), targets, reduction=reduction)
    assert_close(ref[0], plain.float(), name="reference loss", rel=1e-6)
    for name, a, e in zip(("loss", "dhidden", "dweight"), got, ref):
        assert_close(a, e, name=name, rel=1e-5)
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_softmax_kernel_over_many_column_blocks(dtype):
    """The kernel's online log-sum-exp across blocks (the largest logit in a later block than the first, values
    whose exp overflows float32 without the running max), a ragged last block, padded columns, an ignored row."""
    from mambakit.ops.cross_entropy.triton_ce import softmax_xent_grad_

    gen = torch.Generator(DEVICE).manual_seed(1)
    logits = (torch.randn(6, 300, generator=gen, device=DEVICE) * 3).to(dtype)
    logits[0, 250] = 120.0  # exp(120) is inf in float32: only the rescaled sum survives it
    logits[1, :64] = -30.0
    targets = torch.tensor([250, 7, 289, -100, 0, 64], device=DEVICE)
    vocab = 290
    ref_logits = logits.double()[:, :vocab]
    lse = torch.logsumexp(ref_logits, dim=-1)
    scored = targets != -100
    safe = targets.clamp(min=0)
    ref_loss = torch.where(scored, lse - ref_logits.gather(1, safe[:, None])[:, 0], torch.zeros((), device=DEVICE))
    ref_grad = torch.softmax(ref_logits, dim=-1) - F.one_hot(safe, vocab).double()
    ref_grad = F.pad(ref_grad * scored[:, None], (0, 10))
    got = logits.clone()
    loss = softmax_xent_grad_(got, targets, vocab, -100, block=64)  # 5 blocks, the last one ragged
    assert loss.dtype == torch.float32 and got.dtype == dtype
    assert_close(loss.double(), ref_loss, name="row loss", rel=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # the gradient is rounded to the logits' dtype
    assert float((got.double() - ref_grad).abs().max()) <= tol
    assert not got[:, vocab:].any() and not got[3].any()  # padded columns and the ignored row: no gradient
    with pytest.raises(ValueError, match="contiguous"):
        softmax_xent_grad_(logits.t(), targets[:6], 6, -100)


def test_float64_inputs_stay_float64_in_the_gradients():
    hidden, weight, targets = _inputs(dtype=torch.float64)
    _, dh, dw = _grads(lambda: linear_cross_entropy(hidden, weight, targets, rows_per_chunk=5), hidden, weight)
    ref = _grads(lambda: F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"), hidden, weight)
    assert dh.dtype == dw.dtype == torch.float64
    assert_close(dh, ref[1], name="dhidden", rel=1e-12)
    assert_close(dw, ref[2], name="dweight", rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero_and_zero_gradients(backend):
    hidden, weight, targets = _inputs(device=DEVICE)
    targets[:] = -100
    loss, dh, dw = _grads(lambda: linear_cross_entropy(hidden, weight, targets, reduction="mean", backend=backend),
                          hidden, weight)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_gradients_only_where_asked():
    hidden, weight, targets = _inputs()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_bf16_autocast_equals_the_plain_head_under_the_same_autocast(backend):
    hidden, weight, targets = _inputs(rows=64, d=32, vocab=96, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _grads(lambda: linear_cross_entropy(hidden, weight, targets, reduction="mean", rows_per_chunk=16,
                                                  backend=backend), hidden, weight)

    def plain():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets)

    ref = _grads(plain, hidden, weight)
    exact = _grads(lambda: F.cross_entropy(hidden @ weight.t(), targets), hidden, weight)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    for i, name in enumerate(("loss", "dhidden", "dweight")):
        # the same bf16 matmuls and float32 softmax: at most twice the plain path's own bf16 error
        bound = 2 * float((ref[i] - exact[i]).abs().max()) + 1e-6
        assert float((got[i] - exact[i]).abs().max()) <= bound, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    hidden, weight, targets = _inputs(device=DEVICE)
    eager = _grads(lambda: linear_cross_entropy(hidden, weight, targets, rows_per_chunk=8, backend=backend),
                   hidden, weight)
    fn = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, rows_per_chunk=8, backend=backend),
                       fullgraph=True)
    compiled = _grads(lambda: fn(hidden, weight, targets), hidden, weight)
    for name, a, e in zip(("loss", "dhidden", "dweight"), compiled, eager):
        assert_close(a, e, name=name, rel=1e-5)


def test_bad_inputs_say_what_is_wrong():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_cross_entropy(hidden, weight, torch.full_like(targets, 50))
    with pytest.raises(ValueError, match="targets must have dtype"):
        linear_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="rows_per_chunk"):
        linear_cross_entropy(hidden, weight, targets, rows_per_chunk=0)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_cross_entropy(hidden, weight, targets, vocab_size=51)
    rows = default_rows_per_chunk(50280)
    assert rows % 128 == 0 and rows * 50280 <= 1 << 26 < (rows + 128) * 50280


@pytest.mark.parametrize("backend", BACKENDS)
def test_columns_past_vocab_size_are_not_scored(backend):
    hidden, weight, targets = _inputs(device=DEVICE)
    targets = targets.clamp(max=39)
    got = _grads(lambda: linear_cross_entropy(hidden, weight, targets, vocab_size=40, rows_per_chunk=8,
                                              backend=backend), hidden, weight)
    ref = _grads(lambda: F.cross_entropy(hidden @ weight[:40].t(), targets, reduction="sum"), hidden, weight)
    for name, a, e in zip(("loss", "dhidden", "dweight"), got, ref):
        assert_close(a, e, name=name, rel=1e-5)
    assert not got[2][40:].any()  # the padded rows get no gradient


def _model(layer="Mamba2", vocab=61):
    torch.manual_seed(0)
    ssm = {"layer": layer}
    if layer == "Mamba2":
        ssm.update(headdim=16, d_state=16, chunk_size=16)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, ssm_cfg=ssm))


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_model_loss_equals_the_logits_loss_and_never_scores_padding_columns(layer):
    model = _model(layer)
    assert model.config.padded_vocab_size > 61  # padding columns exist and must not be scored
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(3))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(ids[:, :-1])[..., :61]
    ref = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    ref.backward()
    assert_close(loss, ref, name="loss", rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), grads):
        assert_close(g, p.grad, name=name, rel=1e-4)  # DESIGN.md: float32 within 1e-4 of the scale


def test_model_loss_checks_its_targets():
    model = _model()
    ids = torch.randint(0, 61, (2, 9))
    with pytest.raises(ValueError, match="targets must be a tensor of shape"):
        model(ids[:, :-1], targets=ids)
    with pytest.raises(ValueError, match="vocab_size must lie in"):
        model(ids[:, :-1], targets=ids[:, 1:], vocab_size=1000)


def test_an_lm_head_adapter_is_called_not_skipped():
    peft = pytest.importorskip("peft")
    model = _model()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    inner = lora.base_model.model
    loss = inner(ids[:, :-1], targets=ids[:, 1:])
    ref = F.cross_entropy(inner(ids[:, :-1])[..., :61].flatten(0, 1), ids[:, 1:].flatten())
    assert_close(loss, ref, name="loss with the adapter", rel=1e-6)
    with torch.no_grad():  # and the adapter matters: without it the loss differs
        with lora.disable_adapter():
            base = inner(ids[:, :-1], targets=ids[:, 1:])
    assert abs(base.item() - loss.item()) > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("rows, vocab, padded", [(4096, 50277, 50280), (333, 1000, 1024)])
def test_triton_backend_on_cuda_matches_the_torch_backend(rows, vocab, padded):
    """The 130M head's shape under bf16 autocast on CUDA: the Triton kernel (named: not yet the automatic choice)
    against the torch backend's float32 softmax, loss and both gradients."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, 768, device="cuda", generator=gen).requires_grad_()
    weight = (torch.randn(padded, 768, device="cuda", generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    targets[::7] = -100
    out = {}
    for backend in ("torch", "triton"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[backend] = _grads(lambda: linear_cross_entropy(hidden, weight, targets, vocab_size=vocab,
                                                               reduction="mean", backend=backend), hidden, weight)
    for name, a, e in zip(("loss", "dhidden", "dweight"), out["triton"], out["torch"]):
        assert_close(a, e, name=name, rel=2e-2 if name != "loss" else 1e-4)
    assert not out["triton"][2][vocab:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dweight_accumulates_in_float32_inside_the_matmul_on_cuda(dtype):
    """The chunked head's dW += g.T @ h on CUDA: cuBLAS adds into the float32 accumulator in place (the out= tensor
    is also the addend), chunk after chunk, without rounding each chunk's product to 16 bits first."""
    from mambakit.ops.cross_entropy.torch_ce import _accumulate_dweight

    gen = torch.Generator(device="cuda").manual_seed(0)
    dweight = torch.randn(1000, 768, device="cuda", generator=gen)
    expected, rounded = dweight.double(), dweight.double()
    for _ in range(3):
        g = (torch.randn(512, 1000, device="cuda", generator=gen) * 1e-2).to(dtype)
        h = torch.randn(512, 768, device="cuda", generator=gen).to(dtype)
        ptr = dweight.data_ptr()
        _accumulate_dweight(dweight, g, h)
        assert dweight.data_ptr() == ptr and dweight.dtype == torch.float32  # in place
        expected = expected + g.double().t() @ h.double()
        rounded = rounded + (g.t() @ h).double()  # what a 16-bit product added afterwards gives
    err = float((dweight.double() - expected).abs().max())
    assert err < 1e-4, err
    assert err < float((rounded - expected).abs().max()) / 4
