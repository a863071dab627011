"""The Mamba-2 block (Dao & Gu 2024, Section 7, Figure 6): one in_proj, conv over x‖B‖C, SSD, gated norm.

Shapes (legend): B batch, L seqlen, M d_model, I d_inner = expand * d_model, S d_ssm (<= I; defaults
to I), H nheads = S / headdim, P headdim, G ngroups, N d_state, W d_conv, F d_mlp = (I - S).

    (z0, x0, z, xBC, dt) = in_proj(u)          (B, L, F), (B, L, F), (B, L, S), (B, L, S + 2GN), (B, L, H)
    xBC = silu(causal_conv1d(xBC))             the conv runs over x, B and C together
    (x, B, C) = xBC                            (B, L, H, P), (B, L, G, N), (B, L, G, N)
    y = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, softplus, dt_limit)
    y = norm(y * silu(z))  (or y * silu(z) without the norm);  y = [silu(z0) * x0, y] when F > 0
    out = out_proj(y)                          (B, L, M)

Without a cache and with F = 0, conv, SSD, norm and out_proj run as one op (`ops.mamba2_inner`:
on CUDA a single autograd node that keeps in_proj's output and y and recomputes the rest in the backward);
`fused = False` calls the ops one by one, with the same math.

Parameter names and shapes follow mamba_ssm's `Mamba2` (in_proj, conv1d, dt_bias, A_log, D, norm,
out_proj) so published checkpoints load without renaming.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..deprecation import renamed_argument
from ..ops import (add_rms_norm_linear, causal_conv1d, causal_conv1d_update, decode_linear, gated_rms_norm_linear,
                   mamba2_inner, pinned_backend, ssd, ssd_state_update)
from .mamba1 import DecodeParams, inverse_softplus_dt
from .fusion import fused_step_allowed, many_rows_step_allowed, reads_as_plain, require_plain_conv
from .norm import RMSNorm, RMSNormGated
from .state import MixerState


def mamba2_sizes(d_model: int, *, expand: float, headdim: int, d_ssm: int | None, ngroups: int, d_state: int,
                 rmsnorm: bool, norm_ngroups: int | None) -> dict[str, int]:
    """The sizes Mamba2 derives from its arguments, checked: the one formula, used by `Mamba2.__init__` and by
    the config (models.mixers.mixer_sizes), so a config says what a built mixer has without building one.

    Returns d_inner (I = int(expand * d_model)), d_ssm (S, I when None), headdim (P), nheads (H = S / P),
    ngroups (G), d_mlp (F = I - S), conv_dim (S + 2GN: the conv runs over x, B and C), and with the gated
    norm (rmsnorm) norm_groups (G unless norm_ngroups overrides it; mamba_ssm normalises each SSD group
    separately, transformers the whole width with norm_ngroups=1).
    ValueError when headdim does not divide d_ssm, ngroups does not divide nheads or norm_groups d_ssm.

    Example:
        >>> mamba2_sizes(256, expand=2, headdim=64, d_ssm=None, ngroups=1, d_state=64, rmsnorm=True,
        ...              norm_ngroups=None)["nheads"]
        8
    """
    d_inner = int(expand * d_model)
    d_ssm = d_inner if d_ssm is None else d_ssm
    if d_ssm % headdim != 0:
        raise ValueError(f"Mamba2: d_ssm={d_ssm} must be a multiple of headdim={headdim}")
    nheads = d_ssm // headdim
    if nheads % ngroups != 0:
        raise ValueError(f"Mamba2: ngroups={ngroups} must divide nheads={nheads}")
    sizes = {"d_inner": d_inner, "d_ssm": d_ssm, "headdim": headdim, "nheads": nheads, "ngroups": ngroups,
             "d_mlp": d_inner - d_ssm, "conv_dim": d_ssm + 2 * ngroups * d_state}
    if rmsnorm:
        norm_groups = ngroups if norm_ngroups is None else norm_ngroups
        if not isinstance(norm_groups, int) or norm_groups < 1 or d_ssm % norm_groups:
            raise ValueError(f"Mamba2: norm_ngroups={norm_ngroups} must be a positive int dividing d_ssm={d_ssm}")
        sizes["norm_groups"] = norm_groups
    return sizes


class Mamba2(nn.Module):
    """Mamba-2 mixer.   forward(hidden_states (B, L, d_model), cache=None, seq_idx=None) -> (B, L, d_model).

    Args mirror mamba_ssm's `Mamba2`: d_state 128, d_conv 4, expand 2, headdim 64, ngroups 1, A uniform in
    A_init_range = (1, 16) stored as log, dt log-uniform in [dt_min, dt_max] floored and stored through
    softplus^-1 in `dt_bias`, D = 1 (per head, or per channel with D_has_hdim), gated RMSNorm with one
    group per SSD group (norm_ngroups overrides the grouping, norm_eps its epsilon), chunk_size 256.

    Example:
        >>> layer = Mamba2(d_model=256, headdim=32, d_state=64)
        >>> y = layer(torch.randn(2, 100, 256))   # (2, 100, 256)
    """

    # the first op on the input is in_proj (see fusion.autocast_input_dtype)
    first_op_in_proj = True

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: float | None = None,
                 expand: float = 2, headdim: int = 64, d_ssm: int | None = None, ngroups: int = 1,
                 A_init_range: tuple[float, float] = (1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit: tuple[float, float] = (0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: int | None = None, process_group=None, sequence_parallel: bool = True,
                 norm_ngroups: int | None = None, norm_eps: float = 1e-5, fused: bool = True, recompute: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if process_group is not None:
            raise ValueError("Mamba2: tensor parallelism (process_group) is not supported; pass process_group=None")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        sizes = mamba2_sizes(d_model, expand=expand, headdim=headdim, d_ssm=d_ssm, ngroups=ngroups,
                             d_state=d_state, rmsnorm=rmsnorm, norm_ngroups=norm_ngroups)
        self.d_inner, self.d_ssm, self.d_mlp = sizes["d_inner"], sizes["d_ssm"], sizes["d_mlp"]
        self.headdim, self.nheads, self.ngroups = headdim, sizes["nheads"], ngroups
        self.conv_dim = sizes["conv_dim"]
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path  # accepted for config compatibility
        self.layer_idx = layer_idx

        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device))
        self.dt_bias._no_weight_decay = True
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(lo, hi)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=norm_eps, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // sizes["norm_groups"], **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._decode_params = DecodeParams()
        # training memory: True keeps only in_proj's output per layer and recomputes the rest in the backward
        self.recompute = recompute
        # True runs conv, SSD, gated norm and out_proj as one op (`mamba2_inner`; on CUDA one autograd node
        # that keeps in_proj's output and y only) when there is no cache and no MLP half; False calls the
        # ops one by one (benchmarks compare the two). Both are constructor arguments (the config's ssm_cfg)
        self.fused = fused
        # the decode step in 3 kernels per layer (block norm + in_proj + conv | SSD step | gated norm + out_proj:
        # `fused_block_step`) when every module involved is plain and no gradient is needed; False keeps the
        # step op by op (benchmarks compare the two: benchmarks/gpu_inference.py --count-kernels)
        self.fused_step = True

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device=None,
                       state_dtype: torch.dtype | None = None, ssm_dtype: torch.dtype | None = None) -> MixerState:
        """Zero state: conv (batch, conv_dim, d_conv - 1) in `dtype`, ssm (batch, nheads, headdim, d_state).

        The ssm state is float32 (float64 for float64 models) unless `state_dtype` says otherwise: a
        bfloat16 / float16 state is updated in float32 and rounded back each step, which halves the
        state traffic that bounds large-batch decoding (d_state 128: the state outweighs the weights
        from batch ~16 on), at the price of one rounding per token.
        """
        state_dtype = renamed_argument("Mamba2.allocate_state", "ssm_dtype", "state_dtype", ssm_dtype, state_dtype)
        device = device or self.out_proj.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        if state_dtype is None:
            state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 (fp64 models: fp64)
        elif state_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"Mamba2.allocate_state: state_dtype must be float32, float64, bfloat16 or float16, "
                             f"got {state_dtype}")
        return MixerState(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=state_dtype),
        )

    def _split_in_proj(self, zxbcdt: torch.Tensor):
        sizes = [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads]
        return torch.split(zxbcdt, sizes, dim=-1)

    def _D(self) -> torch.Tensor:
        D = self.D.float()
        return D.view(self.nheads, self.headdim) if self.D_has_hdim else D

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor,
                many_rows: bool = False) -> torch.Tensor:
        """Gate (through the norm when there is one), prepend the MLP half, project. y, z: (..., S). many_rows: a
        decode step's (B, S) rows, out_proj through `ops.decode_linear` (see `step`)."""
        y = self.norm(y, z) if self.rmsnorm else y
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        if many_rows and y.dtype == self.out_proj.weight.dtype:
            return decode_linear(y, self.out_proj.weight, self.out_proj.bias)
        return self.out_proj(y)

    def forward(self, hidden_states: torch.Tensor, cache: MixerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model); with `cache`, continue from its state and advance it."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2: hidden_states must be (batch, seqlen, d_model={self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        if cache is not None and hidden_states.shape[1] == 1 and seq_idx is None:
            return self.step(hidden_states, cache)
        zxbcdt = self.in_proj(hidden_states)
        if self.recompute and cache is None and torch.is_grad_enabled():
            # keep only in_proj's output for the backward; conv, SSD, norm and out_proj run again there
            return checkpoint(pinned_backend(self._mix), zxbcdt, None, seq_idx, use_reentrant=False)
        return self._mix(zxbcdt, cache, seq_idx)

    def _fusable(self) -> bool:
        """Whether the fused op may read out_proj's and the norm's weights (else the modules are called: adapters,
        hooks, quantized or other subclassed layers)."""
        norm_plain = not self.rmsnorm or reads_as_plain(self.norm, RMSNormGated)
        return norm_plain and reads_as_plain(self.out_proj, nn.Linear)

    def _mix(self, zxbcdt: torch.Tensor, cache: MixerState | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """in_proj's output (B, L, d_in_proj) -> the layer output (B, L, d_model), advancing `cache` when given."""
        require_plain_conv(self.conv1d, "Mamba2")
        if cache is None and self.fused and self.d_mlp == 0 and self._fusable():
            return mamba2_inner(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias.float(),
                -torch.exp(self.A_log.float()), self._D(), self.norm.spec() if self.rmsnorm else None,
                self.out_proj.weight, self.out_proj.bias, headdim=self.headdim, ngroups=self.ngroups,
                d_state=self.d_state, chunk_size=self.chunk_size, dt_limit=self.dt_limit, seq_idx=seq_idx)
        batch, seqlen, _ = zxbcdt.shape
        z0, x0, z, xBC, dt = self._split_in_proj(zxbcdt)
        keep = cache is not None
        xBC = causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                            initial_state=cache.conv_state if keep else None, return_final_state=keep, seq_idx=seq_idx)
        if keep:
            xBC, conv_final = xBC
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())  # (H,)
        y = ssd(x.reshape(batch, seqlen, self.nheads, self.headdim), dt, A,
                B.reshape(batch, seqlen, self.ngroups, self.d_state), C.reshape(batch, seqlen, self.ngroups, self.d_state),
                D=self._D(), z=None if self.rmsnorm else z.reshape(batch, seqlen, self.nheads, self.headdim),
                dt_bias=self.dt_bias.float(), dt_softplus=True, dt_limit=self.dt_limit, chunk_size=self.chunk_size,
                initial_state=cache.ssm_state_in() if keep else None, return_final_state=keep,
                seq_idx=seq_idx)
        if keep:
            y, ssm_final = y
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(ssm_final)
        return self._output(y.reshape(batch, seqlen, self.d_ssm), z, z0, x0)

    def _ssd_step(self, xBC: torch.Tensor, dt: torch.Tensor, z: torch.Tensor | None, cache: MixerState) -> torch.Tensor:
        """The conv's output xBC (B, S + 2GN), dt (B, H) -> the SSD step's output (B, H, P); gated by z when given."""
        batch = xBC.shape[0]
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A, D, dt_bias = self._decode_params.get(
            lambda: (-torch.exp(self.A_log.float()), self._D(), self.dt_bias.float()), self.A_log, self.D, self.dt_bias)
        return ssd_state_update(cache.ssm_state, x.view(batch, self.nheads, self.headdim), dt, A,
                                B.view(batch, self.ngroups, self.d_state), C.view(batch, self.ngroups, self.d_state),
                                D=D, z=None if z is None else z.view(batch, self.nheads, self.headdim),
                                dt_bias=dt_bias, dt_softplus=True, dt_limit=self.dt_limit)

    def fused_block_step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                         residual_in_fp32: bool, cache: MixerState) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`Block`'s decode step with its pre-norm folded in: (hidden, residual) (B, 1, M) -> (out, new residual).

        Three kernels on Triton: [add + norm + in_proj + conv update + silu], [SSD step + D], [gated norm +
        out_proj]. None when it does not apply (a module that is not plain: adapter, hook, subclass; gradients or
        autocast on; an MLP half (d_ssm < d_inner) or no gated norm; `fused_step` False): the block then runs
        its norm and this layer as usual.
        """
        if not (self.fused_step and self.rmsnorm and self.d_mlp == 0 and fused_step_allowed(hidden_states)
                and reads_as_plain(self, Mamba2) and reads_as_plain(norm, RMSNorm)
                and reads_as_plain(self.norm, RMSNormGated) and reads_as_plain(self.in_proj, nn.Linear)
                and reads_as_plain(self.out_proj, nn.Linear)
                and norm.weight.dtype == self.in_proj.weight.dtype == self.out_proj.weight.dtype
                and self.norm.weight.dtype == self.out_proj.weight.dtype == hidden_states.dtype):
            return None
        require_plain_conv(self.conv1d, "Mamba2")
        batch = hidden_states.shape[0]
        zxbcdt, residual = add_rms_norm_linear(
            hidden_states[:, 0], None if residual is None else residual[:, 0], norm.weight, self.in_proj.weight,
            self.in_proj.bias, eps=norm.eps, residual_dtype=torch.float32 if residual_in_fp32 else None,
            conv_state=cache.conv_state, conv_weight=self.conv1d.weight[:, 0], conv_bias=self.conv1d.bias,
            conv_start=2 * self.d_mlp + self.d_ssm)
        _, _, z, xBC, dt = self._split_in_proj(zxbcdt)  # xBC has been through the conv and silu already
        y = self._ssd_step(xBC, dt, None, cache)
        out = gated_rms_norm_linear(y.view(batch, self.d_ssm), z, self.norm.weight, self.out_proj.weight,
                                    self.out_proj.bias, eps=self.norm.eps, group_size=self.norm.group_size,
                                    norm_before_gate=self.norm.norm_before_gate)
        return out[:, None], residual[:, None]

    def step(self, hidden_states: torch.Tensor, cache: MixerState) -> torch.Tensor:
        """One token: (B, 1, d_model) -> (B, 1, d_model), advancing `cache` in place (constant cost per token).

        Both states are written in place (the ops update them), never rebound: a CUDA graph captured
        around this step keeps reading and writing the same cache tensors.
        """
        require_plain_conv(self.conv1d, "Mamba2")
        batch = hidden_states.shape[0]
        # a batch past the fused step's: in_proj and out_proj through decode_linear (the many-rows kernel) where
        # many_rows_step_allowed says (off by default, see fusion.py)
        many = (self.fused_step and many_rows_step_allowed(hidden_states) and reads_as_plain(self.in_proj, nn.Linear)
                and reads_as_plain(self.out_proj, nn.Linear) and hidden_states.dtype == self.in_proj.weight.dtype)
        u = hidden_states[:, 0]
        zxbcdt = decode_linear(u, self.in_proj.weight, self.in_proj.bias) if many else self.in_proj(u)
        z0, x0, z, xBC, dt = self._split_in_proj(zxbcdt)
        xBC = causal_conv1d_update(cache.conv_state, xBC, self.conv1d.weight[:, 0], self.conv1d.bias,
                                   activation="silu")
        y = self._ssd_step(xBC, dt, None if self.rmsnorm else z, cache)
        return self._output(y.reshape(batch, self.d_ssm), z, z0, x0, many_rows=many)[:, None]
