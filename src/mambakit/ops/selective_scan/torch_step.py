"""One decode step of the selective scan in PyTorch (the "torch" backend of `selective_state_update`).

Shapes (legend): b batch, d dim, g ngroups, e = d // g channels per group, n dstate.

    dt' = softplus(dt + dt_bias)   h <- exp(dt' A) h + dt' x B   y = <C, h> + D x,  y *= silu(z)

The state is updated in place with a dozen ops, three of them over (b, d, n); no Python loop over
any dimension, so a token costs a few op launches per layer. The decay is exp2(dt' A log2 e) as in
`torch_scan.py` (exp2 is about twice as cheap as exp on AVX2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import LOG2E, as_dtype

__all__ = ["selective_state_update_torch"]


def selective_state_update_torch(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance `state` by one token, in place; arguments as `selective_state_update` (validated).

    Args:
        state: (b, d, n) float32 / float64 (complex for complex A; bf16 / fp16: updated in float32, returned
            as a new float32 tensor that the public op rounds into `state`).
        x, dt, z: (b, d).   A: (d, n).   B, C: (b, g, n).   D, dt_bias: (d,).
    Returns:
        y (b, d) in x's dtype, and the new state: `state` itself, updated in place, unless `state` is
        not contiguous or is real while A is complex (then a new tensor, which the public op copies back).

    Example:
        >>> state = torch.zeros(2, 32, 16)
        >>> y, state = selective_state_update_torch(state, torch.randn(2, 32), torch.rand(2, 32),
        ...                                         -torch.rand(32, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    """
    b, d, n = state.shape
    g = B.shape[1]
    e = d // g
    real = torch.float64 if torch.float64 in (x.dtype, state.dtype) else torch.float32
    dt_ = as_dtype(dt, real) if dt_bias is None else torch.add(as_dtype(dt, real), as_dtype(dt_bias, real))  # (b, d)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    x_ = as_dtype(x, real)
    is_complex = A.is_complex() or B.is_complex() or C.is_complex()
    if is_complex:
        cplx = torch.complex128 if real == torch.float64 else torch.complex64
        decay = torch.exp(dt_[:, :, None] * A.to(cplx))  # (b, d, n)
    else:
        decay = torch.mul(dt_[:, :, None], as_dtype(A, real)).mul_(LOG2E).exp2_()  # (b, d, n); exp2: see torch_scan.py
    low = state.dtype in (torch.bfloat16, torch.float16)  # updated in `real`, rounded back by the public op
    in_place = (state.is_complex() or not is_complex) and state.is_contiguous() and not low  # the views need it
    if in_place:
        h = state
    else:
        h = state.to(decay.dtype if is_complex else real if low else state.dtype, memory_format=torch.contiguous_format,
                     copy=True)
    work = h.dtype  # B and C join the state's dtype (real, or complex when the state is)
    h.mul_(decay)
    # channel d reads group d // e: the (b, g, e, n) view of h broadcasts B, C over e
    h.view(b, g, e, n).addcmul_((dt_ * x_).view(b, g, e, 1), as_dtype(B, work).view(b, g, 1, n))
    # <C, h> as a batched matrix-vector product: a sum over the contiguous n axis is slower on CPU
    y = torch.bmm(h.view(b * g, e, n), as_dtype(C, work).reshape(b * g, n, 1)).view(b, d)
    if is_complex:
        y = (2.0 if A.is_complex() else 1.0) * y.real  # conjugate-pair convention of S4D (reference.py)
    if D is not None:
        y = y.addcmul_(as_dtype(D, real), x_) if y.dtype == real else y + as_dtype(D, real) * x_
    if z is not None:
        y = y.mul_(F.silu(as_dtype(z, real))) if y.dtype == real else y * F.silu(as_dtype(z, real))
    return as_dtype(y, x.dtype), h
