"""Sequential reference of the depthwise causal convolution used before the SSM in Mamba blocks.

Shapes (legend): B batch, L seqlen, D dim (channels), W width.

    y_t[d] = bias[d] + sum_k weight[d, k] * x_{t - (W-1) + k}[d],   then optional silu

so weight[:, -1] multiplies the current token (PyTorch's Conv1d with padding W-1, truncated).
The state is the window of the W-1 most recent inputs, oldest first: (B, D, W-1). Where seq_idx
changes, the window restarts from zeros (packed documents); `initial_state` fills the window of
each row's first document. Runs one token at a time in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y, activation):
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_reference(x, weight, bias=None, activation=None, initial_state=None,
                            return_final_state=False, seq_idx=None):
    """Sequential causal conv; arguments as in `mambakit.ops.causal_conv1d`."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    f64 = torch.float64
    w = weight.to(f64)
    window = torch.zeros(batch, dim, width - 1, dtype=f64, device=x.device)
    if initial_state is not None:
        window = window + initial_state.to(f64)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            window = window * (seq_idx[:, t] == seq_idx[:, t - 1]).to(f64)[:, None, None]
        full = torch.cat([window, x[:, t, :, None].to(f64)], dim=2)  # (B, D, W)
        y = (full * w).sum(-1)
        if bias is not None:
            y = y + bias.to(f64)
        ys.append(_activate(y, activation))
        window = full[:, :, 1:]
    y = (torch.stack(ys, dim=1) if ys else torch.zeros(batch, 0, dim, dtype=f64, device=x.device)).to(x.dtype)
    if not return_final_state:
        return y
    # the window holds inputs, so it keeps x's dtype
    return y, window.to(x.dtype)


def causal_conv1d_update_reference(conv_state, x, weight, bias=None, activation=None):
    """One token: returns y (B, D) and the new window (the caller writes it in place)."""
    y, window = causal_conv1d_reference(x[:, None], weight, bias, activation, initial_state=conv_state,
                                        return_final_state=True)
    return y[:, 0], window.to(conv_state.dtype)
