"""S4D mixer: the Mamba block with a time-invariant diagonal SSM in place of the selective one (Mamba paper,
Table 1's "S4" rows; Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space Models").

Shapes (legend): B batch, L seqlen, M d_model, D d_inner = expand * d_model, N d_state, W d_conv.

    (x, z) = in_proj(u)                                 (B, L, D) each; z only when gated
    x = silu(causal_conv1d(x))                          depthwise, width W (as Mamba-1)
    dt = softplus(dt_bias)                              (D,)      a parameter, not a projection of x
    h_t = exp(dt A) h_{t-1} + dt B x_t                  A, B, C: (D, N) parameters (complex for S4D-Lin)
    y_t = s Re <C, h_t> + D x_t                         s = 2 for complex A (conjugate pairs), 1 for real
    y = y * silu(z) when gated;  out = out_proj(y)      (B, L, M)

This is the same discretisation as `ops.selective_scan` with Δ, B and C held fixed over time, so the
layer is a long convolution: y = K * x + D x with K[d, l] = s Re sum_n C[d, n] dt B[d, n] exp(dt A[d, n])^l.
The forward computes K (`ssm_kernel`: a matrix product of two (D, N, sqrt L) factors of the powers) and
convolves by FFT in O(L log L); a cache adds the initial state's contribution and returns the final state in closed
form (`decayed_sum`; decoding, and prefill over several calls), factored the same way. With
`seq_idx` (packed documents) the state restarts inside a row: each document (a run of one seq_idx value) is
convolved on its own (`document_segments`; documents grouped by length into power-of-two buckets, one batched FFT
per bucket, each right-aligned so that its leading padding adds nothing), the initial state reaches the first
document of each row only and the final state comes from the last. That path reads the documents' bounds on the
host; under CUDA-graph capture, and under torch.compile for real A, it runs `ops.selective_scan` with per-channel
B, C (ngroups = D) instead (`_documents_by_convolution`), the same numbers 5-200x slower on a CPU.

Initialisations (`A_init`): "S4D-Lin" A[d, n] = -1/2 + i pi n (complex, the S4 baseline of the Mamba
paper), "S4D-Real" A[d, n] = -(n + 1) (real, Mamba-1's own init). B = 1, C ~ N(0, 1) (variance 1/2 per
part when complex), D = 1, dt log-uniform in [dt_min, dt_max] as Mamba-1.

Complex parameters are stored as real tensors with a trailing dimension of 2 (real, imaginary):
optimizers, weight decay and safetensors see plain float32 tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..deprecation import renamed_argument
from ..ops import causal_conv1d, causal_conv1d_update, selective_scan
from .mamba1 import inverse_softplus_dt
from .state import MixerState

A_INITS = ("S4D-Lin", "S4D-Real")


def _fft_len(n: int) -> int:
    """Smallest power of two >= n: cuFFT and pocketfft are fastest there, and 2 L avoids circular wrap."""
    return 1 << (n - 1).bit_length()


def ssm_kernel(coef: torch.Tensor, dtA: torch.Tensor, seqlen: int, block: int | None = None) -> torch.Tensor:
    """K[d, l] = Re sum_n coef[d, n] exp(dtA[d, n] l) for l < seqlen: (D, N), (D, N) real or complex -> (D, L) real.

    Factored over blocks of T positions (default T ~ sqrt(L), a power of two), l = c T + t:
    K[d, c T + t] = sum_n (coef exp(dtA c T))[d, n] exp(dtA t)[d, n], one (C, N) @ (N, T) matrix product per
    channel (complex: one real product over 2N, since only the real part is asked for). The exps are D N (C + T) ~
    2 D N sqrt(L) instead of D N L, the D N L multiply-adds run as a batched real matmul (its result does not
    depend on the thread count, which a complex one's did on the CPU), and autograd keeps the two (D, N, sqrt L) factors, not the (D, N, L) powers (34 GB of complex64 a
    layer at D 256, N 16, L 2^20, which the first version built in checkpointed pieces: 2.35 s a training step of
    dna-context's S4D at one window of 2^20 against 0.36 s at 64 of 2^14, on an H200).
    """
    inner, outer = _block_powers(dtA, seqlen, block)
    outer = coef[..., None] * outer  # (D, N, C)
    if outer.is_complex():  # Re(o i) = Re o Re i - Im o Im i: one real product over 2N (what the callers read)
        outer = torch.cat([outer.real, outer.imag], 1)
        inner = torch.cat([inner.real, -inner.imag], 1)
    return torch.bmm(outer.transpose(1, 2), inner).reshape(dtA.shape[0], -1)[:, :seqlen]


def _block_powers(dtA: torch.Tensor, seqlen: int, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(dtA t) for t < T (D, N, T) and exp(dtA c T) for c < C (D, N, C): the two factors of exp(dtA l) for
    l = c T + t < C T, T = `block` or ~sqrt(seqlen) (a power of two), C T >= seqlen."""
    T = block or 1 << (((max(seqlen, 1) - 1).bit_length() + 1) // 2)
    real = dtA.real.dtype
    steps = torch.arange(T, device=dtA.device, dtype=real)
    starts = torch.arange(-(-seqlen // T), device=dtA.device, dtype=real) * T
    return torch.exp(dtA[..., None] * steps), torch.exp(dtA[..., None] * starts)


def document_segments(seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents of packed rows: seq_idx (B, L) -> starts (S,) as flat positions b L + t, lengths (S,), in row
    order. A document is a run of one seq_idx value inside a row; every row starts one (so S >= B)."""
    if seq_idx.dim() != 2:
        raise ValueError(f"seq_idx must be (batch, seqlen), got {tuple(seq_idx.shape)}")
    batch, seqlen = seq_idx.shape
    begins = torch.ones(batch, seqlen, dtype=torch.bool, device=seq_idx.device)
    begins[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    starts = begins.flatten().nonzero().squeeze(1)  # (S,), sorted; a row's first start is b L
    ends = torch.cat([starts[1:], starts.new_full((1,), batch * seqlen)])
    return starts, ends - starts


def _segment_index(starts: torch.Tensor, lengths: torch.Tensor, width: int, pad: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Gather index (S, width) of segments right-aligned in `width` positions (`pad` where a segment has none) and
    the (S, width) mask of real positions."""
    offs = torch.arange(width, device=starts.device)[None, :] - (width - lengths)[:, None]
    valid = offs >= 0
    return torch.where(valid, starts[:, None] + offs, pad), valid


def decayed_sum(x: torch.Tensor, dtA: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """S[b, d, n] = sum_l x[b, d, l] exp(dtA[d, n] (L - 1 - l)): (B, D, L) real, (D, N) -> (B, D, N) in dtA's dtype.

    What a state holds after L inputs (the state's closed form), factored as `ssm_kernel` is: with the time reversed,
    l' = c T + t, S = sum_c exp(dtA c T) sum_t x'[c T + t] exp(dtA t), two contractions of O(B D N L) multiply-adds
    that never hold the (D, N, L) powers.
    """
    batch, d, seqlen = x.shape
    inner, outer = _block_powers(dtA, seqlen, block)  # (D, N, T), (D, N, C)
    blocks, T = outer.shape[-1], inner.shape[-1]
    rev = F.pad(x.flip(-1), (0, blocks * T - seqlen)).view(batch, d, blocks, T)  # zeros past the start add nothing
    if inner.is_complex():  # x is real: the real and imaginary parts in one real product (as in ssm_kernel)
        n = inner.shape[1]
        parts = torch.einsum("bdct,dnt->bdnc", rev, torch.cat([inner.real, inner.imag], 1))  # (B, D, 2N, C)
        per_block = torch.complex(parts[:, :, :n], parts[:, :, n:])
    else:
        per_block = torch.einsum("bdct,dnt->bdnc", rev, inner)  # (B, D, N, C)
    return (per_block * outer).sum(-1)


def _initial_state_readout(h0: torch.Tensor, C: torch.Tensor, dtA: torch.Tensor, seqlen: int) -> torch.Tensor:
    """What a state h0 (B, D, N) has become at each step l < seqlen, read out: Re sum_n C h0 exp(dtA)^(l + 1), one
    kernel per row: (B, D, L) real (without the conjugate-pair scale)."""
    batch, dim, n_state = h0.shape
    start = (C * torch.exp(dtA) * h0).reshape(batch * dim, n_state)
    per_row = ssm_kernel(start, dtA.expand(batch, dim, n_state).reshape(batch * dim, n_state), seqlen)
    return per_row.view(batch, dim, seqlen)


def _documents_by_convolution(x: torch.Tensor, is_complex: bool) -> bool:
    """Whether the seq_idx path convolves document by document. Its bounds are read on the host, which a CUDA
    graph's capture does not allow and which splits a torch.compile graph: there the scan runs instead, except for
    complex A under torch.compile, whose scan (a Python loop over time with a recomputing backward) traces in no
    graph at all, so the convolution's graph breaks are the better trade (fullgraph=True fails either way)."""
    if torch.compiler.is_compiling():
        return is_complex
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


class S4D(nn.Module):
    """Time-invariant diagonal SSM mixer.   forward(hidden_states (B, L, M), cache=None, seq_idx=None) -> (B, L, M).

    Args: d_state N (complex modes for S4D-Lin), d_conv, expand as Mamba-1; A_init "S4D-Lin" or "S4D-Real";
    gated: multiply by silu(z) (the Mamba block) or not (the ungated block: in_proj has no z half).

    Example:
        >>> layer = S4D(d_model=64, A_init="S4D-Lin", gated=False)
        >>> y = layer(torch.randn(2, 100, 64))        # (2, 100, 64)
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, A_init: str = "S4D-Lin",
                 gated: bool = True, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        if A_init not in A_INITS:
            raise ValueError(f"S4D: A_init must be one of {A_INITS}, got {A_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.A_init = A_init
        self.gated = gated
        self.layer_idx = layer_idx
        D = self.d_inner

        self.in_proj = nn.Linear(d_model, (2 if gated else 1) * D, bias=bias, **factory)
        self.conv1d = nn.Conv1d(D, D, kernel_size=d_conv, groups=D, padding=d_conv - 1, bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(D, dt_min, dt_max, dt_init_floor, device))
        n = torch.arange(d_state, dtype=torch.float32, device=device).repeat(D, 1)  # (D, N)
        if A_init == "S4D-Real":
            self.A_log = nn.Parameter(torch.log(n + 1))
            self.A_imag = None
            self.B = nn.Parameter(torch.ones(D, d_state, device=device))
            self.C = nn.Parameter(torch.randn(D, d_state, device=device))
        else:
            self.A_log = nn.Parameter(torch.full((D, d_state), math.log(0.5), device=device))
            self.A_imag = nn.Parameter(math.pi * n)
            self.B = nn.Parameter(torch.stack([torch.ones(D, d_state), torch.zeros(D, d_state)], -1).to(device))
            self.C = nn.Parameter(torch.randn(D, d_state, 2, device=device) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.ones(D, device=device))
        for p in (self.dt_bias, self.A_log, self.A_imag, self.B, self.C, self.D):
            if p is not None:
                p._no_weight_decay = True  # SSM parameters, as Mamba's A_log / D / dt bias
        self.out_proj = nn.Linear(D, d_model, bias=bias, **factory)

    @property
    def is_complex(self) -> bool:
        return self.A_imag is not None

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device=None,
                       state_dtype: torch.dtype | None = None, ssm_dtype: torch.dtype | None = None) -> MixerState:
        """Zero state: conv (batch, D, W - 1) in `dtype`; ssm (batch, D, N) complex64 (S4D-Lin) or float32
        (S4D-Real), 128-bit / float64 for float64 models. `state_dtype` may only name float32 or float64."""
        state_dtype = renamed_argument("S4D.allocate_state", "ssm_dtype", "state_dtype", ssm_dtype, state_dtype)
        device = device or self.out_proj.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        if state_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"S4D.allocate_state: state_dtype must be float32 or float64, got {state_dtype}")
        wide = state_dtype == torch.float64 or (state_dtype is None and dtype == torch.float64)
        real = torch.float64 if wide else torch.float32
        ssm_state_dtype = (torch.complex128 if wide else torch.complex64) if self.is_complex else real
        return MixerState(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_state_dtype),
        )

    def ssm_params(self, real: torch.dtype = torch.float32):
        """dt (D,), A (D, N), B (D, N), C (D, N) in `real` (complex A, B, C for S4D-Lin)."""
        dt = F.softplus(self.dt_bias.to(real))
        A = -torch.exp(self.A_log.to(real))
        if not self.is_complex:
            return dt, A, self.B.to(real), self.C.to(real)
        A = torch.complex(A, self.A_imag.to(real))
        return dt, A, torch.view_as_complex(self.B.to(real)), torch.view_as_complex(self.C.to(real))

    def forward(self, hidden_states: torch.Tensor, cache: MixerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model); with `cache`, continue from its state and advance it."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"S4D: hidden_states must be (batch, seqlen, d_model={self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        if cache is not None and hidden_states.shape[1] == 1 and seq_idx is None:
            return self.step(hidden_states, cache)
        xz = self.in_proj(hidden_states)
        x, z = xz.chunk(2, dim=-1) if self.gated else (xz, None)  # (B, L, D)
        keep = cache is not None
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                          initial_state=cache.conv_state if keep else None, return_final_state=keep, seq_idx=seq_idx)
        if keep:
            x, conv_final = x
            cache.conv_state.copy_(conv_final)
        if seq_idx is not None and not _documents_by_convolution(x, self.is_complex):
            y = self._scan(x, z, cache, seq_idx)
        else:
            # the kernel, FFTs and state contractions stay in fp32 under autocast (einsum would drop to bf16)
            with torch.autocast(x.device.type, enabled=False):
                y = self._convolve(x, cache) if seq_idx is None else self._convolve_documents(x, cache, seq_idx)
            y = y + self.D.to(y.dtype) * x.to(y.dtype)
            if z is not None:
                y = y * F.silu(z.to(y.dtype))
            y = y.to(x.dtype)
        return self.out_proj(y)

    def _convolve(self, x: torch.Tensor, cache: MixerState | None) -> torch.Tensor:
        """SSM output without the D skip: x (B, L, D) -> y (B, L, D) in fp32 (fp64 for fp64 x), by FFT;
        with `cache`, from its ssm_state (B, D, N), which is replaced by the state after the L tokens."""
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        seqlen = x.shape[1]
        dt, A, B, C = self.ssm_params(real)
        scale = 2.0 if self.is_complex else 1.0
        dtA = dt[:, None] * A  # (D, N); Re <= 0, so every power below has modulus <= 1
        coef = C * B * dt[:, None]  # (D, N)
        kernel = scale * ssm_kernel(coef, dtA, seqlen)  # (D, L) real; autograd keeps O(D N sqrt L)
        x_BDL = x.to(real).transpose(1, 2)
        n = _fft_len(2 * seqlen)
        y_BDL = torch.fft.irfft(torch.fft.rfft(x_BDL, n=n) * torch.fft.rfft(kernel, n=n), n=n)[..., :seqlen]
        if cache is not None:
            h0 = cache.ssm_state.to(A.dtype, copy=True)  # (B, D, N); copied: the cache is overwritten below
            y_BDL = y_BDL + scale * _initial_state_readout(h0, C, dtA, seqlen)
            # h_L = exp(dt A)^L h0 + dt B sum_l exp(dt A)^(L-1-l) x_l
            inputs = decayed_sum(x_BDL, dtA)
            cache.ssm_state.copy_(torch.exp(dtA * seqlen) * h0 + (dt[:, None] * B) * inputs)
        return y_BDL.transpose(1, 2)

    def _convolve_documents(self, x: torch.Tensor, cache: MixerState | None, seq_idx: torch.Tensor) -> torch.Tensor:
        """`_convolve` with the state restarting at each document of seq_idx (B, L): x (B, L, D) -> y (B, L, D) fp32.

        Each document is convolved alone (right-aligned in its length's power-of-two bucket: the zeros before it
        add nothing to its outputs or to its closing state); a cache's state reaches each row's first document only,
        and is replaced by the state at the end of each row's last document."""
        batch, seqlen, dim = x.shape
        starts, lengths = document_segments(seq_idx)
        if starts.numel() == batch:  # no boundary inside any row: the plain convolution
            return self._convolve(x, cache)
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        dt, A, B, C = self.ssm_params(real)
        scale = 2.0 if self.is_complex else 1.0
        dtA = dt[:, None] * A  # (D, N)
        kernel = scale * ssm_kernel(C * B * dt[:, None], dtA, seqlen)  # (D, L): no document is longer
        x_flat = torch.cat([x.to(real).reshape(batch * seqlen, dim), x.new_zeros(1, dim, dtype=real)])  # + a zero row
        widths = torch.exp2(torch.log2(lengths.double()).ceil()).long()  # (S,) the power-of-two bucket >= length
        positions, values = [], []
        for width in widths.unique().tolist():
            members = (widths == width).nonzero().squeeze(1)
            src, valid = _segment_index(starts[members], lengths[members], width, batch * seqlen)  # (S_w, width)
            n = _fft_len(2 * width)
            xs = x_flat[src].transpose(1, 2)  # (S_w, D, width)
            ys = torch.fft.irfft(torch.fft.rfft(xs, n=n) * torch.fft.rfft(kernel[:, :width], n=n), n=n)[..., :width]
            values.append(ys.transpose(1, 2)[valid])  # (tokens, D)
            positions.append(src[valid])
        order = starts.new_empty(batch * seqlen)
        positions = torch.cat(positions)
        order[positions] = torch.arange(positions.numel(), device=positions.device)
        y_BLD = torch.cat(values)[order].view(batch, seqlen, dim)
        if cache is None:
            return y_BLD
        rows = torch.arange(batch, device=starts.device)
        first = torch.searchsorted(starts, rows * seqlen)  # (B,) each row's first and last document
        last = torch.searchsorted(starts, (rows + 1) * seqlen) - 1
        h0 = cache.ssm_state.to(A.dtype, copy=True)  # (B, D, N); copied: the cache is overwritten below
        # the initial state read out over each row's first document only
        reach = torch.arange(seqlen, device=x.device)[None, :] < lengths[first][:, None]  # (B, L)
        y_BLD = y_BLD + (scale * _initial_state_readout(h0, C, dtA, seqlen) * reach[:, None, :]).transpose(1, 2)
        # the state after each row's last document (right-aligned: the zeros before it add nothing), plus the
        # decayed initial state where that document is the row's only one
        src, _ = _segment_index(starts[last], lengths[last], int(lengths[last].max()), batch * seqlen)
        inputs = decayed_sum(x_flat[src].transpose(1, 2), dtA)  # (B, D, N)
        carried = torch.where((first == last)[:, None, None], torch.exp(dtA * seqlen) * h0, torch.zeros_like(h0))
        cache.ssm_state.copy_(carried + (dt[:, None] * B) * inputs)
        return y_BLD

    def _scan(self, x: torch.Tensor, z: torch.Tensor | None, cache: MixerState | None,
              seq_idx: torch.Tensor) -> torch.Tensor:
        """Packed documents: the recurrence (selective_scan with Δ, B, C constant in time), D and gate included."""
        batch, seqlen, dim = x.shape
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        _, A, B, C = self.ssm_params(real)
        B_ = B[None, None].expand(batch, seqlen, dim, self.d_state)  # ngroups = D: each channel its own B
        C_ = C[None, None].expand(batch, seqlen, dim, self.d_state)
        out = selective_scan(x, torch.zeros_like(x), A, B_, C_, D=self.D.to(real), z=z, dt_bias=self.dt_bias.to(real),
                             dt_softplus=True, initial_state=None if cache is None else cache.ssm_state,
                             return_final_state=cache is not None, seq_idx=seq_idx,
                             backend="torch" if self.is_complex and x.is_cuda else None)
        if cache is None:
            return out
        y, final = out
        cache.ssm_state.copy_(final)
        return y

    def step(self, hidden_states: torch.Tensor, cache: MixerState) -> torch.Tensor:
        """One token: (B, 1, d_model) -> (B, 1, d_model), advancing `cache` in place."""
        xz = self.in_proj(hidden_states[:, 0])
        x, z = xz.chunk(2, dim=-1) if self.gated else (xz, None)  # (B, D)
        x = causal_conv1d_update(cache.conv_state, x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        real = torch.float64 if cache.ssm_state.dtype in (torch.float64, torch.complex128) else torch.float32
        dt, A, B, C = self.ssm_params(real)
        h = cache.ssm_state  # (B, D, N), updated in place
        h.mul_(torch.exp(dt[:, None] * A)).add_((dt[:, None] * B) * x.to(real)[..., None])
        y = (h * C).sum(-1)
        y = 2.0 * y.real if self.is_complex else y
        y = y + self.D.to(real) * x.to(real)
        if z is not None:
            y = y * F.silu(z.to(real))
        return self.out_proj(y.to(x.dtype))[:, None]
