"""A Llama-style Transformer of the 130M Mamba's size: the baseline of benchmarks/gpu_inference.py.

Pre-norm RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP, attention through
`F.scaled_dot_product_attention`, tied embeddings. Generation uses a static KV cache allocated
once for `max_len` positions (gpt-fast's design): prefill writes positions [0, L), each decode step
writes one position and attends to the first `kv_len` positions under a mask, where `kv_len` is the
position rounded up to a bucket (256 by default) -- a fixed shape per bucket, so every bucket's step
is one CUDA graph, and the attention reads little more than the keys actually written.

Shapes (legend): B batch, L seqlen, S max_len (cache positions), K kv_len (attended positions),
H heads, E head dim, M d_model, F MLP hidden, V vocab.

Sizes: d_model 768, 12 layers, 12 heads of 64, F 2304, vocab 50280 -> 131M parameters (tied), against
129M for the 24-layer Mamba-1 and Mamba-2 of the 130M checkpoints.

    python benchmarks/transformer_baseline.py          # self-check on CPU: cached decoding == parallel forward
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_ff: int = 2304
    vocab_size: int = 50280
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"TransformerConfig: d_model={self.d_model} must split into n_head={self.n_head} "
                             "heads of an even size")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class KVCache:
    """Per layer k and v, each (B, H, S, E); positions are written in place, so a CUDA graph stays valid."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)


def rope_tables(max_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (S, E/2) float32: angle p * base^(-2i/E) for position p and frequency i."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+E/2}) of x (B, H, L, E) by the angles of cos, sin (L, E/2); in fp32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32: a bf16 mean of squares over 768 channels loses ~3 digits
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor | None = None,
                v_cache: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """x (B, L, M) -> (B, L, M).

        No cache: causal attention over x. With a cache and L > 1: prefill at positions [0, L) (writes the
        cache). With a cache and L == 1: one decode step at position pos (1,) int64, attending to the
        first kv_len cache positions.
        """
        batch, seqlen, _ = x.shape
        q, k, v = self.wqkv(x).view(batch, seqlen, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, L, E)
        if k_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif seqlen > 1:
            k_cache[:, :, :seqlen] = k
            v_cache[:, :, :seqlen] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # index_copy_ with a device position: no host value, so the step can be graph-captured
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            mask = (torch.arange(kv_len, device=x.device) <= pos)[None, None, None, :]  # (1, 1, 1, K)
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(batch, seqlen, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, k_cache=None, v_cache=None, pos=None, kv_len=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, k_cache, v_cache, pos, kv_len)
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """forward(ids (B, L)) -> logits (B, L, V); prefill / decode_step with a static KVCache for generation.

    Example:
        >>> model = TransformerLM(TransformerConfig(d_model=64, n_layer=2, n_head=4, d_ff=128, vocab_size=100))
        >>> cache = model.allocate_kv_cache(batch_size=2, max_len=64)
        >>> logits = model.prefill(ids, cache)                          # (2, V), the last prompt position
        >>> logits = model.decode_step(logits.argmax(-1), torch.tensor([ids.shape[1]]), cache, kv_len=64)
    """

    def __init__(self, cfg: TransformerConfig, max_positions: int = 8192):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layer)
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, std=std)
        cos, sin = rope_tables(max_positions, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seqlen = ids.shape[1]
        x = self.embedding(ids)
        cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm_f(x))

    def allocate_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """Zero KV cache for batch_size rows and max_len positions in the weights' dtype."""
        if max_len > self.rope_cos.shape[0]:
            raise ValueError(f"allocate_kv_cache: max_len={max_len} exceeds max_positions={self.rope_cos.shape[0]}")
        w = self.embedding.weight
        shape = (batch_size, self.config.n_head, max_len, self.config.head_dim)
        dtype = dtype or w.dtype
        return KVCache(k=[torch.zeros(shape, dtype=dtype, device=w.device) for _ in self.layers],
                       v=[torch.zeros(shape, dtype=dtype, device=w.device) for _ in self.layers])

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: KVCache, rows_per_call: int | None = None) -> torch.Tensor:
        """Prompts ids (B, L) of equal length at positions [0, L) -> last-position logits (B, V) float32.

        rows_per_call bounds the activation memory: rows go through in groups of that size.
        """
        batch, seqlen = ids.shape
        if seqlen > cache.max_len:
            raise ValueError(f"prefill: prompt length {seqlen} exceeds the cache's {cache.max_len} positions")
        step = rows_per_call or batch
        out = []
        for r in range(0, batch, step):
            x = self.embedding(ids[r:r + step])
            cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache.k[i][r:r + step], cache.v[i][r:r + step])
            out.append(self.lm_head(self.norm_f(x[:, -1:]))[:, 0].float())
        return torch.cat(out)

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int) -> torch.Tensor:
        """tokens (B,) at position pos (1,) int64 -> logits (B, V) float32; writes position pos of the cache.

        Attends to the first kv_len positions (kv_len > pos; positions past pos are masked out).
        """
        x = self.embedding(tokens[:, None])
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (1, E/2)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], pos, kv_len)
        return self.lm_head(self.norm_f(x))[:, 0].float()


def bucket_len(pos: int, bucket: int, max_len: int) -> int:
    """The attended length of a step at position pos: pos + 1 rounded up to a multiple of bucket, at most max_len."""
    return min(max_len, -(-(pos + 1) // bucket) * bucket)


class TransformerDecoder:
    """The decode step for a fixed batch size, one CUDA graph per kv_len bucket (eager on CPU or when graphs=False).

    Example:
        >>> dec = TransformerDecoder(model, batch_size=8, max_len=4096)
        >>> logits = model.prefill(ids, dec.cache)              # ids (8, 2048)
        >>> for pos in range(2048, 4096):
        ...     logits = dec(logits.argmax(-1), pos)          # (8, V), valid until the next call
    """

    def __init__(self, model: TransformerLM, batch_size: int, max_len: int, *, bucket: int = 256,
                 graphs: bool = True):
        self.model = model
        self.bucket = bucket
        self.cache = model.allocate_kv_cache(batch_size, max_len)
        device = model.embedding.weight.device
        self.use_graphs = graphs and device.type == "cuda"
        self._tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._pos = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def _capture(self, kv_len: int) -> None:
        # the warm-up steps write the current token's k, v at the current position, which the replay
        # that follows writes again with the same values: capturing mid-generation is harmless
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.decode_step(self._tokens, self._pos, self.cache, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.decode_step(self._tokens, self._pos, self.cache, kv_len)
        self._pool = graph.pool()  # every bucket's graph shares one memory pool
        self._graphs[kv_len] = (graph, logits)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens (B,) at position pos -> logits (B, V) float32."""
        kv_len = bucket_len(pos, self.bucket, self.cache.max_len)
        self._tokens.copy_(tokens)
        self._pos.fill_(pos)
        if not self.use_graphs:
            return self.model.decode_step(self._tokens, self._pos, self.cache, kv_len)
        if kv_len not in self._graphs:
            self._capture(kv_len)
        graph, logits = self._graphs[kv_len]
        graph.replay()
        return logits


def _self_check() -> None:
    """CPU, float32: prefill + decode steps (eager, bucketed) reproduce the parallel forward's logits."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(d_model=64, n_layer=2, n_head=4, d_ff=96, vocab_size=101)).eval()
    ids = torch.randint(0, 101, (3, 21))
    with torch.no_grad():
        full = model(ids)
    dec = TransformerDecoder(model, batch_size=3, max_len=32, bucket=8)
    logits = [model.prefill(ids[:, :9], dec.cache, rows_per_call=2)]
    for pos in range(9, 21):
        logits.append(dec(ids[:, pos], pos).clone())
    got = torch.stack(logits, dim=1)
    err = float((got - full[:, 8:]).abs().max())
    assert err < 1e-4 * float(full.abs().max()), f"cached decoding differs from the parallel forward by {err}"
    print(f"transformer baseline self-check ok (max abs error {err:.2e})")


if __name__ == "__main__":
    _self_check()
