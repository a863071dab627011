"""The "triton" backend of linear_cross_entropy: the torch backend's chunk loop, with each chunk's softmax, loss and
logits gradient in one kernel that writes the gradient over the logits.

Shapes (legend): n rows of a chunk, Vp the head's rows (padded vocabulary), V the scored columns (vocab_size).

Per row r of a chunk of logits x (n, Vp) in the matmul's dtype, with target t_r (or ignore_index):

    pass 1 (reads x once):   lse_r = log sum_{c < V} exp(x_rc)       online: running max and rescaled sum, float32
                             loss_r = lse_r - x_{r t_r}               (0 for an ignored row)
    pass 2 (reads x again):  x_rc <- exp(x_rc - lse_r) - [c == t_r]   for c < V, 0 for c >= V or an ignored row

so a chunk's logits are read twice and written once in their own dtype. The torch backend makes a float32 copy,
takes its logsumexp, then exponentiates, scatters, masks and casts it back: about 7x the bytes, which at a 50k
vocabulary and 16k rows per step is several milliseconds of a GPU's time. The kernel keeps no float32 block, so a
chunk holds twice the rows for the same memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import fast_launch, next_power_of_2
from . import torch_ce

__all__ = ["linear_cross_entropy_triton", "softmax_xent_grad_"]


@fast_launch
@triton.jit
def _xent_grad_kernel(x_ptr, targets_ptr, loss_ptr, n_cols, vocab, stride_r, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_r
    t = tl.load(targets_ptr + row)
    scored = t != ignore_index
    t_safe = tl.where(scored, t, 0)
    offs = tl.arange(0, BLOCK)
    # pass 1: log-sum-exp over the scored columns, online (running max m, sum s rescaled when m grows)
    m = tl.max(tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    x_t = tl.load(base + t_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(scored, lse - x_t, 0.0))
    # pass 2: the gradient of the row's loss, over the logits: softmax - onehot(target); 0 past vocab / ignored
    keep = tl.where(scored, 1.0, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == t_safe, 1.0, 0.0)
        tl.store(base + cols, (g * keep).to(x_ptr.dtype.element_ty), mask=cols < n_cols)


def softmax_xent_grad_(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int,
                       block: int | None = None) -> torch.Tensor:
    """Per-row cross-entropy of `logits` (n, Vp) over its first `vocab_size` columns, float32 (n,) (0 where the
    target is `ignore_index`), and the logits replaced in place by the loss's gradient (softmax - onehot; 0 past
    vocab_size and on ignored rows), in their dtype. `logits` rows must be contiguous; targets (n,) int64.
    block: columns per step (a power of two; default up to 4096; tests pass small ones)."""
    n, n_cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("softmax_xent_grad_: the logits' rows must be contiguous")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    block = block or min(4096, next_power_of_2(n_cols))
    _xent_grad_kernel[(n,)](logits, targets, loss, n_cols, vocab_size, logits.stride(0), ignore_index,
                            BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                ignore_index: int, vocab_size: int, rows_per_chunk: int | None = None) -> torch.Tensor:
    """The summed negative log-likelihood, float32 (): the torch backend's chunks (`torch_ce`), each chunk's
    softmax and gradient in `softmax_xent_grad_`. Float64 inputs take the torch backend. Inputs already checked."""
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return torch_ce.linear_cross_entropy_torch(hidden, weight, targets, ignore_index=ignore_index,
                                                   vocab_size=vocab_size, rows_per_chunk=rows_per_chunk)
    return torch_ce.chunked_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index,
                                                 vocab_size=vocab_size, rows_per_chunk=rows_per_chunk, fused=True)
