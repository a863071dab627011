"""Causal multi-head attention (SDPA) with rotary or absolute positions and a KV cache: the attention layer of
hybrid models (mamba_ssm's `attn_layer_idx` / `attn_cfg`) and the Transformer baselines of the synthetic tasks.

Shapes (legend): B batch, L seqlen (new tokens), S cached + new tokens, M embed_dim, H num_heads,
K num_heads_kv, E head_dim, F mlp_dim.

    qkv = in_proj(u)                      (B, L, (H + 2K) E [+ F])   fused layout [q (H E) | k (K E) | v (K E)]
    qkv = conv1d(qkv)                     optional depthwise causal conv (d_conv > 0), no activation
    q, k = rotary(q, k)                   on the first rotary_emb_dim dims of each head (rotary_emb_dim > 0)
    o = softmax(q k^T * scale + causal mask) v        (B, H, L, E); query head h reads kv head h // (H / K)
    out = out_proj([o | mlp_up * silu(mlp_gate)])     (B, L, M); the MLP half only when mlp_dim > 0

Constructor arguments and parameter names are those of mamba_ssm's `MHA` (in_proj, conv1d, out_proj;
mlp_dim rounded up to a multiple of 256), so `attn_cfg` of a mamba_ssm hybrid config builds the same
layer and its checkpoint loads. One argument is mambakit's own: `absolute_pos_emb`, which adds a
sinusoidal position encoding (Vaswani et al. 2017) of the absolute position to the layer's input: the
"MHA-Abs" baseline of the Mamba paper's induction-heads table (sinusoidal, so it is defined at every
length). Positions count from each document's first token: with `seq_idx` (packed documents, left-padded
ragged batches) a document starts at position 0, exactly as if it were alone.

The KV cache (`KVState`) grows by doubling its capacity, so a decode step usually writes in place; a
growth reallocates it. A cache given a fixed capacity (`KVState.fix_capacity`, what `CUDAGraphDecoder` does with
the prompt and the tokens to generate) never reallocates, and its one-token step writes at a slot held in a device
tensor: the same kernels at the same addresses every token, which a CUDA graph can replay.
Calls with a cache attend over the whole capacity (unused slots masked) and, on CUDA, leave SDPA's cuDNN backend
out: it builds a plan for every new key length, which cost eager decoding 40 ms a token at the e2e shape.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..deprecation import renamed_argument
from ..ops import causal_conv1d


_CACHED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class KVState:
    """Per-layer attention cache.

    key, value: (B, capacity, K, E) in the activation dtype; valid: (B, capacity) bool, the cached keys
    the next tokens may attend to (False on padding, on a restarted row, and beyond `length`);
    next_pos: (B,) int64, the position of each row's next token in its document; length: slots used (the
    same for every row); conv_state: (B, (H + 2K) E, d_conv - 1) or None; slot: None, or with a fixed capacity
    (`fix_capacity`) a (1,) int64 tensor on the cache's device equal to `length`: where a one-token step writes.
    Slots at and past `length` are never valid.
    """

    key: torch.Tensor
    value: torch.Tensor
    valid: torch.Tensor
    next_pos: torch.Tensor
    length: int = 0
    conv_state: torch.Tensor | None = None
    slot: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.key.shape[0]

    def zero_(self) -> "KVState":
        self.valid.zero_()
        self.next_pos.zero_()
        self.length = 0
        if self.slot is not None:
            self.slot.zero_()
        if self.conv_state is not None:
            self.conv_state.zero_()
        return self

    def select_(self, keep: torch.Tensor) -> "KVState":
        """Forget the rows where `keep` (batch,) is False."""
        return self.zero_rows_(~keep.to(torch.bool))

    def zero_rows_(self, rows: torch.Tensor) -> "KVState":
        """Forget the rows where `rows` (batch,) bool is True (their cached keys are no longer attended to)."""
        self.valid.masked_fill_(rows.view(-1, 1), False)
        self.next_pos.masked_fill_(rows, 0)
        if self.conv_state is not None:
            self.conv_state.masked_fill_(rows.view(-1, 1, 1), 0)
        return self

    def nbytes(self) -> int:
        conv = 0 if self.conv_state is None else self.conv_state.nbytes
        return self.key.nbytes + self.value.nbytes + self.valid.nbytes + self.next_pos.nbytes + conv

    def index_select(self, rows: torch.Tensor) -> "KVState":
        return KVState(self.key.index_select(0, rows), self.value.index_select(0, rows),
                       self.valid.index_select(0, rows), self.next_pos.index_select(0, rows), self.length,
                       None if self.conv_state is None else self.conv_state.index_select(0, rows))

    def index_copy_(self, rows: torch.Tensor, source: "KVState") -> "KVState":
        """Write `source`'s rows into `rows`; a longer source extends the cache (other rows: invalid slots, which
        no query attends to, so rows that advanced by different numbers of tokens stay exact)."""
        self.reserve(source.length)
        n = source.length
        self.key[:, :n].index_copy_(0, rows, source.key[:, :n])
        self.value[:, :n].index_copy_(0, rows, source.value[:, :n])
        self.valid.index_copy_(0, rows, torch.cat([source.valid[:, :n], self.valid.new_zeros(len(rows), self.capacity - n)], 1))
        self.next_pos.index_copy_(0, rows, source.next_pos)
        if self.conv_state is not None:
            self.conv_state.index_copy_(0, rows, source.conv_state)
        self.length = max(self.length, n)
        if self.slot is not None:
            self.slot.fill_(self.length)
        return self

    @property
    def capacity(self) -> int:
        return self.key.shape[1]

    def fix_capacity(self, n: int) -> "KVState":
        """Hold exactly room for n tokens from now on (at least the cached ones): no call reallocates the cache
        again (one past the capacity raises), and a one-token step writes at `slot`, a device tensor, so a CUDA
        graph of it can be replayed token after token. The cached tokens are kept."""
        n = operator.index(n)
        if n < max(self.length, 1):
            raise ValueError(f"KVState.fix_capacity: n must be at least the {self.length} cached tokens and 1, got {n}")
        if n != self.capacity:
            self._reallocate(n)
        self.slot = torch.full((1,), self.length, dtype=torch.long, device=self.key.device)
        return self

    def advance_slot(self, n: int) -> None:
        """Count n tokens written by a replayed step (whose Python bookkeeping did not run); the slot tensor
        itself was advanced on the device."""
        if self.length + n > self.capacity:
            raise ValueError(f"KVState: the fixed capacity of {self.capacity} tokens is full")
        self.length += n

    def reserve(self, n: int) -> None:
        """Make room for n tokens (capacity doubles, so appending one token at a time is amortised O(1))."""
        if n <= self.capacity:
            return
        if self.slot is not None:
            raise ValueError(f"KVState: {n} tokens do not fit the fixed capacity of {self.capacity} "
                             "(fix_capacity: the prompt and the tokens to generate)")
        self._reallocate(max(n, 2 * self.capacity, 64))

    def _reallocate(self, n: int) -> None:
        """New key, value and valid tensors of capacity n holding the first min(capacity, n) slots (at least the
        cached tokens: slots past `length` are invalid anyway)."""
        keep = min(self.capacity, n)
        key = self.key.new_zeros(self.batch_size, n, *self.key.shape[2:])
        value = self.value.new_zeros(self.batch_size, n, *self.value.shape[2:])
        valid = self.valid.new_zeros(self.batch_size, n)
        key[:, :keep] = self.key[:, :keep]
        value[:, :keep] = self.value[:, :keep]
        valid[:, :keep] = self.valid[:, :keep]
        self.key, self.value, self.valid = key, value, valid

    def append(self, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor | None, positions: torch.Tensor):
        """Add k, v (B, L, K, E) at `positions` (B, L); return all keys, values (B, S, K, E) and the mask
        (B, 1, L, S) of the new queries, S the capacity (slots past the cached and new tokens are masked out).

        A query sees the cached keys still valid if no document starts before it in this call (seq_idx equal
        to the call's first), and the new keys up to itself within its own document.
        """
        start, seqlen = self.length, k.shape[1]
        self.reserve(start + seqlen)
        if self.slot is not None and seqlen == 1 and seq_idx is None:
            return self._append_at_slot(k, v, positions)
        end = start + seqlen
        self.key[:, start:end] = k
        self.value[:, start:end] = v
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=k.device).tril()
        if seq_idx is None:
            sees_cache = torch.ones(k.shape[0], seqlen, dtype=torch.bool, device=k.device)
            new = causal.expand(k.shape[0], seqlen, seqlen)
            last_doc = sees_cache
        else:
            sees_cache = seq_idx == seq_idx[:, :1]  # (B, L)
            new = causal & (seq_idx[:, :, None] == seq_idx[:, None, :])
            last_doc = seq_idx == seq_idx[:, -1:]
        mask = torch.cat([self.valid[:, None, :start] & sees_cache[:, :, None], new], dim=-1)  # (B, L, S)
        self.valid[:, :start] &= sees_cache[:, -1:]
        self.valid[:, start:end] = last_doc
        self.next_pos.copy_(positions[:, -1] + 1)
        self.length = end
        if self.slot is not None:
            self.slot.fill_(end)
        # every slot up to the capacity, the unused ones masked: the attention's shapes then change only when the
        # capacity doubles, not at every token (on CUDA, SDPA's cuDNN backend builds a plan per new shape)
        if end < self.capacity:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], seqlen, self.capacity - end)], dim=-1)
        return self.key, self.value, mask[:, None]

    def _append_at_slot(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """`append` of one token per row (no seq_idx) at the device-side slot: no Python int reaches a kernel,
        so the same launches replay from a CUDA graph. The mask is `valid` itself (every slot past the new one is
        invalid), as `append` would build it."""
        self.key.index_copy_(1, self.slot, k)
        self.value.index_copy_(1, self.slot, v)
        self.valid.index_fill_(1, self.slot, True)
        self.next_pos.copy_(positions[:, -1] + 1)
        self.slot.add_(1)
        self.length += 1
        return self.key, self.value, self.valid[:, None, None, :]


def document_positions(seq_idx: torch.Tensor | None, batch: int, seqlen: int, start: torch.Tensor | None,
                       device: torch.device) -> torch.Tensor:
    """Position of every token in its document, (B, L) int64.

    start: (B,) the position of each row's first token (a cache's next_pos) or None (0). Where seq_idx
    changes a new document begins at position 0; tokens before the first change continue from `start`.
    """
    t = torch.arange(seqlen, device=device)
    if seq_idx is None:
        pos = t.expand(batch, seqlen)
        return pos if start is None else pos + start[:, None]
    change = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    change[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    doc_start = torch.where(change, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, L) index of the doc's first token
    pos = t - doc_start
    if start is not None:
        first_doc = change.cumsum(dim=1) == 0
        pos = pos + torch.where(first_doc, start[:, None], 0)
    return pos


def sinusoidal_positions(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) integer positions -> (B, L, dim): sin on even, cos on odd features, periods up to 10000 * 2 pi."""
    freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) * (-math.log(10000.0) / dim))
    angle = positions.to(torch.float64)[..., None] * freq  # float64: positions reach 2^20 and beyond
    out = torch.zeros(*positions.shape, dim, dtype=torch.float64, device=positions.device)
    out[..., 0::2] = torch.sin(angle)
    out[..., 1::2] = torch.cos(angle[..., : dim // 2])
    return out.to(dtype)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                 interleaved: bool) -> torch.Tensor:
    """Rotate the first rotary_dim features of x (B, L, heads, E) by position (B, L) (RoFormer, Su et al. 2021).

    Non-interleaved pairs feature i with i + rotary_dim / 2 (GPT-NeoX, flash_attn's default); interleaved
    pairs 2i with 2i + 1 (GPT-J). Angles in float64: at a million positions fp32 angles are off by ~0.1 rad.
    """
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float64) / rotary_dim)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    angle = positions.to(torch.float64)[..., None] * inv_freq  # (B, L, half)
    cos = torch.cos(angle).to(work)[:, :, None, :]
    sin = torch.sin(angle).to(work)[:, :, None, :]
    rot, rest = x[..., :rotary_dim].to(work), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class MHA(nn.Module):
    """Causal multi-head attention.   forward(hidden_states (B, L, M), cache=None, seq_idx=None) -> (B, L, M).

    Args (mamba_ssm's MHA): num_heads, num_heads_kv (grouped-query attention; default num_heads), head_dim
    (default embed_dim // num_heads), mlp_dim (a gated MLP computed from the same in_proj, 0 = none),
    qkv_proj_bias, out_proj_bias, softmax_scale (default head_dim^-0.5), causal (must be True in a language
    model), d_conv, rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved. mambakit's: absolute_pos_emb.

    Example:
        >>> attn = MHA(128, num_heads=8, rotary_emb_dim=16)
        >>> y = attn(torch.randn(2, 100, 128))       # (2, 100, 128)
    """

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None, head_dim: int | None = None,
                 mlp_dim: int = 0, qkv_proj_bias: bool = True, out_proj_bias: bool = True,
                 softmax_scale: float | None = None, causal: bool = True, layer_idx: int | None = None,
                 d_conv: int = 0, rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0,
                 rotary_emb_interleaved: bool = False, absolute_pos_emb: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads % self.num_heads_kv:
            raise ValueError(f"MHA: num_heads ({num_heads}) must be a multiple of num_heads_kv ({self.num_heads_kv})")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"MHA: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not causal:
            raise ValueError("MHA: causal must be True (a language model's layer attends to the past only)")
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        if rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"MHA: rotary_emb_dim ({rotary_emb_dim}) must be even and at most head_dim ({self.head_dim})")
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.layer_idx = layer_idx
        self.d_conv = d_conv
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb_base = rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.absolute_pos_emb = absolute_pos_emb
        qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)
        self.qkv_dim = qkv_dim
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=d_conv, padding=d_conv - 1, groups=qkv_dim, **factory)
        self.out_proj = nn.Linear(self.head_dim * num_heads + self.mlp_dim // 2, embed_dim, bias=out_proj_bias,
                                  **factory)

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device=None,
                       state_dtype: torch.dtype | None = None, ssm_dtype: torch.dtype | None = None) -> KVState:
        """An empty KV cache (capacity grows with use); `state_dtype` is ignored (there is no SSM state here)."""
        state_dtype = renamed_argument("MHA.allocate_state", "ssm_dtype", "state_dtype", ssm_dtype, state_dtype)
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        kv = (batch_size, 0, self.num_heads_kv, self.head_dim)
        conv = None if self.d_conv == 0 else torch.zeros(batch_size, self.qkv_dim, self.d_conv - 1, device=device,
                                                         dtype=dtype)
        return KVState(torch.zeros(kv, device=device, dtype=dtype), torch.zeros(kv, device=device, dtype=dtype),
                       torch.zeros(batch_size, 0, device=device, dtype=torch.bool),
                       torch.zeros(batch_size, device=device, dtype=torch.long), 0, conv)

    def forward(self, hidden_states: torch.Tensor, cache: KVState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, M) -> (B, L, M); with `cache`, the tokens continue the cached ones and are appended to it."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.embed_dim:
            raise ValueError(f"MHA: hidden_states must be (batch, seqlen, embed_dim={self.embed_dim}), "
                             f"got {tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        positions = document_positions(seq_idx, batch, seqlen, None if cache is None else cache.next_pos,
                                       hidden_states.device)  # (B, L)
        if self.absolute_pos_emb:
            hidden_states = hidden_states + sinusoidal_positions(positions, self.embed_dim, hidden_states.dtype)
        qkv = self.in_proj(hidden_states)
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([self.qkv_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        if self.d_conv > 0:
            keep = cache is not None
            qkv = causal_conv1d(qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                initial_state=cache.conv_state if keep else None, return_final_state=keep,
                                seq_idx=seq_idx)
            if keep:
                qkv, conv_final = qkv
                cache.conv_state.copy_(conv_final)
        H, K, E = self.num_heads, self.num_heads_kv, self.head_dim
        q, k, v = qkv.split([H * E, K * E, K * E], dim=-1)
        q, k, v = q.view(batch, seqlen, H, E), k.view(batch, seqlen, K, E), v.view(batch, seqlen, K, E)
        if self.rotary_emb_dim > 0:
            q = apply_rotary(q, positions, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
            k = apply_rotary(k, positions, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        mask = None
        if cache is not None:
            k, v, mask = cache.append(k, v, seq_idx, positions)
        elif seq_idx is not None:  # packed documents: causal within each document only
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
            mask = (causal & (seq_idx[:, :, None] == seq_idx[:, None, :]))[:, None]
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
        # with a KV cache, not SDPA's cuDNN backend: it builds a plan for every new key length, which made eager
        # decoding 3-14x slower on an H200 (BENCHMARKS.md, session 23); the others take the same inputs
        backends = sdpa_kernel(_CACHED_BACKENDS) if cache is not None and q.is_cuda else contextlib.nullcontext()
        with backends:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=mask is None,
                                                 scale=self.softmax_scale)  # (B, H, L, E)
        out = out.transpose(1, 2).reshape(batch, seqlen, H * E)
        if self.mlp_dim > 0:
            out = torch.cat([out, x_mlp], dim=-1)
        return self.out_proj(out)
