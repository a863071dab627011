"""The "torch" backend of linear_cross_entropy: logits made and consumed a block of rows at a time.

Shapes (legend): N rows (tokens), d hidden, V vocabulary (scored columns), n rows per chunk.

The loss is a scalar, so its gradients are known once the forward has seen a chunk: for each chunk

    logits = h_c @ W.T                      (n, V), in the operands' dtype (the autocast dtype under autocast)
    p      = softmax(float32(logits))       (n, V) float32, in place of the logits
    loss  += sum(lse - logits[target])      over rows whose target is not ignore_index
    g      = (p - onehot(target)) * scored  (n, V), cast back to the operands' dtype for the matmuls
    dh_c   = g @ W                          (n, d)
    dW    += g.T @ h_c                      (V, d), accumulated in float32

and the backward only scales dh and dW by the incoming gradient. Peak memory is that of one chunk's
(n, V) float32 block and its cast, plus dh (N, d) and dW (V, d) float32, instead of the (N, V) logits,
their float32 copy, the log-softmax and its gradient of the plain `F.cross_entropy(lm_head(h))`.
The matmuls are the same three as the plain path's, so the time is about the same.
"""

from __future__ import annotations

import torch

from ..common import autograd_op


def default_rows_per_chunk(vocab: int, bytes_per_logit: int = 4) -> int:
    """Rows per chunk: a chunk's logits block takes about 256 MB (2**26 float32 logits, or 2**27 of 2 bytes, the
    Triton backend's block in the matmul's dtype); a multiple of 128 rows (whole tensor-core tiles) when that many
    fit, at least 16."""
    rows = max(16, (1 << 28) // (max(vocab, 1) * bytes_per_logit))
    return rows - rows % 128 if rows >= 128 else rows


def _lce_fwd_impl(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  rows_per_chunk: int, vocab_size: int, want_dhidden: bool, want_dweight: bool, fused: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss float32 (), dhidden (N, d) in hidden's dtype or empty, dweight (V, d) float32 or empty).

    Columns from `vocab_size` on take part in the matmuls (the whole weight: a padded vocabulary keeps the
    rows of g 16-byte aligned for the tensor cores, where 50277 columns would not) but not in the softmax:
    their logits are set to -inf, so their probability and gradient are 0. `fused`: each chunk's softmax, loss
    and gradient in the Triton kernel (triton_ce.softmax_xent_grad_), in the logits' own block."""
    rows = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    dhidden = torch.empty_like(hidden) if want_dhidden else hidden.new_empty(0)
    dweight = (torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dweight
               else weight.new_empty(0, dtype=acc))
    if fused:
        from .triton_ce import softmax_xent_grad_
    for start in range(0, rows, rows_per_chunk):
        h = hidden[start:start + rows_per_chunk]
        t = targets[start:start + rows_per_chunk]
        if fused:
            g = h @ weight.t()  # (n, V) logits, then (in place) their gradient
            loss += softmax_xent_grad_(g, t, vocab_size, ignore_index).sum()
        else:
            chunk_loss, g = _softmax_xent_grad_torch(h @ weight.t(), t, vocab_size, ignore_index, acc,
                                                     want_dhidden or want_dweight)
            loss += chunk_loss
        if want_dhidden:
            torch.mm(g, weight, out=dhidden[start:start + rows_per_chunk])
        if want_dweight:
            _accumulate_dweight(dweight, g, h)
    return loss.float(), dhidden, dweight


def _accumulate_dweight(dweight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """dweight (V, d) float32 += g.T @ h, g (n, V) and h (n, d) in the matmul's dtype.

    On CUDA with 16-bit operands, cuBLAS adds into the float32 accumulator in the matmul's epilogue
    (`addmm(..., out_dtype=float32)`): no (V, d) 16-bit product is written, read back and added by a second
    kernel, and the chunk's product is not rounded to 16 bits before the sum. Elsewhere (CPU has no
    mixed-dtype addmm; float32 and float64 operands need none) the product is added in place."""
    if dweight.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and dweight.dtype == torch.float32:
        torch.addmm(dweight, g.t(), h, out_dtype=torch.float32, out=dweight)
    else:
        dweight += g.t() @ h  # promoted in place


def _softmax_xent_grad_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int,
                             acc: torch.dtype, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's summed loss (acc ()) and, when asked, the gradient of it over the logits (n, V) in their dtype:
    the float32 (acc) softmax the Triton kernel computes in place, in torch ops."""
    scored = targets != ignore_index
    safe = torch.where(scored, targets, torch.zeros_like(targets))[:, None]
    p = logits.to(acc)  # (n, V)
    if vocab_size < p.shape[1]:
        p[:, vocab_size:] = float("-inf")
    lse = torch.logsumexp(p, dim=-1)
    loss = ((lse - p.gather(1, safe)[:, 0]) * scored).sum()
    if not want_grad:
        return loss, None
    p.sub_(lse[:, None]).exp_()  # softmax, in place
    p.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=acc))
    p.mul_(scored[:, None])
    return loss, p.to(logits.dtype)


_lce_fwd = torch.library.custom_op("mambakit::linear_cross_entropy_fwd", mutates_args=())(_lce_fwd_impl)


@_lce_fwd.register_fake
def _(hidden, weight, targets, ignore_index, rows_per_chunk, vocab_size, want_dhidden, want_dweight, fused=False):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dhidden = torch.empty_like(hidden) if want_dhidden else hidden.new_empty(0)
    dweight = weight.new_empty(weight.shape if want_dweight else (0,), dtype=acc)
    return hidden.new_empty((), dtype=torch.float32), dhidden, dweight


def _lce_bwd_impl(dloss: torch.Tensor, dhidden: torch.Tensor, dweight: torch.Tensor, weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored gradients times the incoming one: (dhidden in its dtype, dweight in weight's dtype)."""
    return ((dhidden * dloss.to(dhidden.dtype)) if dhidden.numel() else dhidden.clone(),
            (dweight * dloss).to(weight.dtype) if dweight.numel() else weight.new_empty(0))


_lce_bwd = torch.library.custom_op("mambakit::linear_cross_entropy_bwd", mutates_args=())(_lce_bwd_impl)


@_lce_bwd.register_fake
def _(dloss, dhidden, dweight, weight):
    return (torch.empty_like(dhidden),
            weight.new_empty(weight.shape) if dweight.numel() else weight.new_empty(0))


def _lce_setup_context(ctx, inputs, output):
    weight = inputs[1]
    _, dhidden, dweight = output
    ctx.save_for_backward(dhidden, dweight, weight)
    ctx.want = (inputs[6], inputs[7])
    ctx.n_inputs = len(inputs)


def _lce_backward(ctx, dloss, _ddhidden, _ddweight, bwd):
    dhidden, dweight, weight = ctx.saved_tensors
    gh, gw = bwd(dloss, dhidden, dweight, weight)
    return (gh if ctx.want[0] else None, gw if ctx.want[1] else None) + (None,) * (ctx.n_inputs - 2)


_lce_op = autograd_op("LinearCrossEntropy", _lce_fwd_impl, _lce_fwd, _lce_setup_context, _lce_backward,
                      _lce_bwd_impl, _lce_bwd)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                 ignore_index: int, vocab_size: int, rows_per_chunk: int | None = None,
                                 fused: bool = False) -> torch.Tensor:
    """The summed negative log-likelihood, float32 (), as one custom op; `fused` as in `_lce_fwd_impl`."""
    itemsize = torch.promote_types(hidden.dtype, weight.dtype).itemsize
    rows_per_chunk = rows_per_chunk or default_rows_per_chunk(weight.shape[0], min(itemsize, 4) if fused else 4)
    want_dhidden, want_dweight = hidden.requires_grad, weight.requires_grad
    loss, _, _ = _lce_op(hidden, weight, targets, ignore_index, rows_per_chunk, vocab_size, want_dhidden,
                         want_dweight, fused)
    return loss


def linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               ignore_index: int, vocab_size: int, rows_per_chunk: int | None = None) -> torch.Tensor:
    """The summed negative log-likelihood, float32 (); see the module docstring. Inputs already checked."""
    return chunked_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, vocab_size=vocab_size,
                                        rows_per_chunk=rows_per_chunk)
