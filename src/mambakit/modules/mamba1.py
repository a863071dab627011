"""The Mamba-1 block (Gu & Dao 2023, Section 3.4, Figure 3): in_proj -> causal conv -> selective SSM, gated.

Shapes (legend): B batch, L seqlen, M d_model, D d_inner = expand * d_model, N d_state,
R dt_rank, W d_conv.

    (x, z) = in_proj(u)                                 (B, L, D) each
    x = silu(causal_conv1d(x))                          depthwise, width W
    (dt_low, B, C) = x_proj(x)                          (B, L, R), (B, L, N), (B, L, N)
    dt = dt_proj.weight @ dt_low   (bias added inside the scan, then softplus)
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)   # gated by silu(z)
    out = out_proj(y)                                   (B, L, M)

Parameter names and shapes follow mamba_ssm's `Mamba` (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj) so published checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..deprecation import renamed_argument
from ..ops import (add_rms_norm_linear, causal_conv1d, causal_conv1d_update, decode_linear, mamba1_inner,
                   mamba1_step, pdl_mode, pinned_backend, selective_scan, selective_state_update)
from . import fusion
from .fusion import (fused_step_allowed, mamba1_step_allowed, many_rows_step_allowed, reads_as_plain,
                     require_plain_conv)
from .norm import RMSNorm
from .state import MixerState


class DecodeParams:
    """fp32 copies of a mixer's small derived parameters (A = -exp(A_log), D, dt bias) for the decode step.

    A decode step is a few dozen small ops per layer, and recomputing -exp(A_log) alone (an exp over
    d_inner x d_state) costs as much as the rest of the step on CPU. The copies are remade when a source
    parameter changes (in place: its version counter moves; or rebound: its storage moves), and only
    under no_grad / inference_mode: with autograd on, the step computes them afresh so gradients flow.
    """

    def __init__(self):
        self.key = None
        self.values: tuple[torch.Tensor, ...] = ()

    def get(self, compute, *sources: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """compute() -> the tensors, made from `sources` (the parameters whose change invalidates them)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()  # a compiled step fuses the few ops into its kernels instead
        key = tuple((id(p), p.data_ptr(), p._version, p.dtype) for p in sources)
        if key != self.key:
            self.values = compute()
            self.key = key
        return self.values


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """Step sizes drawn log-uniformly in [dt_min, dt_max], floored, mapped through softplus^-1 (both papers).

    softplus(result) equals the drawn dt, so the layer starts with time scales spread over two decades.
    """
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = log(exp(dt) - 1), written stably


class Mamba1(nn.Module):
    """Mamba-1 mixer.   forward(hidden_states (B, L, d_model), cache=None, seq_idx=None) -> (B, L, d_model).

    Args mirror mamba_ssm's `Mamba`: d_state 16, d_conv 4, expand 2, dt_rank "auto" = ceil(d_model / 16),
    dt in [dt_min, dt_max] log-uniform with floor dt_init_floor, dt_proj weight uniform(±dt_rank^-0.5 * dt_scale)
    ("random") or constant, S4D-Real A (A_log[d, n] = log(n + 1)), D = 1.

    Example:
        >>> layer = Mamba1(d_model=256)
        >>> y = layer(torch.randn(2, 64, 256))   # (2, 64, 256)
    """

    # the first op on the input is in_proj (see fusion.autocast_input_dtype)
    first_op_in_proj = True

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_fast_path: bool = True, layer_idx: int | None = None, fused: bool = True, recompute: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba1: dt_init must be 'random' or 'constant', got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path  # accepted for config compatibility; kernels are chosen by ops.dispatch
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, device))
        self.dt_proj.bias._no_reinit = True  # the LM's init must not zero this bias
        self.dt_proj.bias._no_weight_decay = True

        # S4D-Real: A[d, n] = -(n + 1), stored as its log so that A stays negative under training
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._decode_params = DecodeParams()
        # training memory: True keeps only in_proj's output per layer and recomputes the rest in the backward
        self.recompute = recompute
        # True: conv, projections and scan run as one op (`ops.mamba1_inner`; on CUDA one autograd node that
        # recomputes the conv output and dt in its backward); False calls the ops one by one (benchmarks compare).
        # Both are constructor arguments, so `ssm_cfg={"fused": False}` in the model config sets them
        self.fused = fused
        # the decode step in 4 kernels per layer (block norm + in_proj + conv | x_proj | dt_proj + SSM step |
        # out_proj: `fused_block_step`) when every module involved is plain and no gradient is needed; False keeps
        # the step op by op (benchmarks compare the two: benchmarks/gpu_inference.py --count-kernels)
        self.fused_step = True

    def allocate_state(self, batch_size: int, dtype: torch.dtype | None = None, device=None,
                       state_dtype: torch.dtype | None = None, ssm_dtype: torch.dtype | None = None) -> MixerState:
        """Zero state for decoding: conv (batch, d_inner, d_conv - 1) in `dtype`, ssm (batch, d_inner, d_state) float32.

        The ssm state is float32 (float64 for float64 models) unless `state_dtype` says otherwise: a bfloat16 /
        float16 state is updated in float32 and rounded back each step (mamba_ssm keeps its Mamba-1 state in the
        weights' dtype), which halves the state traffic of large-batch decoding at the price of one rounding per
        token; prefill widens it to float32 and rounds the final state back.
        """
        state_dtype = renamed_argument("Mamba1.allocate_state", "ssm_dtype", "state_dtype", ssm_dtype, state_dtype)
        device = device or self.out_proj.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        if state_dtype is None:
            state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 (fp64 models: fp64)
        elif state_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"Mamba1.allocate_state: state_dtype must be float32, float64, bfloat16 or float16, "
                             f"got {state_dtype}")
        return MixerState(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=state_dtype),
        )

    def _ssm_params(self, x: torch.Tensor):
        """x_proj split and dt_proj: (..., D) -> dt (..., D), B (..., N), C (..., N), and the bias the scan adds.

        A plain dt_proj leaves its bias to the scan (added in fp32 before the softplus); any other dt_proj (an
        adapter, a hook) is called as a module, bias included.
        """
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if reads_as_plain(self.dt_proj, nn.Linear):
            return F.linear(dt_low, self.dt_proj.weight), B, C, self.dt_proj.bias
        return self.dt_proj(dt_low), B, C, None

    def forward(self, hidden_states: torch.Tensor, cache: MixerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model); with `cache`, continue from its state and advance it."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba1: hidden_states must be (batch, seqlen, d_model={self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        if cache is not None and hidden_states.shape[1] == 1 and seq_idx is None:
            return self.step(hidden_states, cache)
        xz = self.in_proj(hidden_states)  # (B, L, 2D)
        if self.recompute and cache is None and torch.is_grad_enabled():
            # keep only xz for the backward; conv, projections and scan run again there
            y = checkpoint(pinned_backend(self._mix), xz, None, seq_idx, use_reentrant=False)
        else:
            y = self._mix(xz, cache, seq_idx)
        return self.out_proj(y)

    def _mix(self, xz: torch.Tensor, cache: MixerState | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """in_proj's output (B, L, 2D) -> the gated scan output (B, L, D), advancing `cache` when given."""
        require_plain_conv(self.conv1d, "Mamba1")
        conv_w = self.conv1d.weight.squeeze(1)  # (D, W)
        A = -torch.exp(self.A_log.float())  # (D, N)
        keep = cache is not None
        plain = reads_as_plain(self.x_proj, nn.Linear) and reads_as_plain(self.dt_proj, nn.Linear)
        if self.fused and not keep and plain:  # otherwise the modules are called (adapters, hooks, subclasses)
            return mamba1_inner(xz, conv_w, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                                self.dt_proj.bias.float(), A, self.D.float(), seq_idx=seq_idx)
        x, z = xz.chunk(2, dim=-1)  # (B, L, D) each
        x = causal_conv1d(x, conv_w, self.conv1d.bias, activation="silu",
                          initial_state=cache.conv_state if keep else None, return_final_state=keep, seq_idx=seq_idx)
        if keep:
            x, conv_final = x
        dt, B, C, dt_bias = self._ssm_params(x)
        y = selective_scan(x, dt, A, B, C, D=self.D.float(), z=z, dt_bias=None if dt_bias is None else dt_bias.float(),
                           dt_softplus=True,
                           initial_state=cache.ssm_state_in() if keep else None, return_final_state=keep,
                           seq_idx=seq_idx)
        if keep:
            y, ssm_final = y
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(ssm_final)
        return y

    def _plain_ssm_params(self) -> bool:
        """Whether dt_proj may run inside the state-update op: plain x_proj / dt_proj, and `_ssm_params` not
        overridden (a subclass that computes dt, B, C its own way, e.g. `Mamba1Ablation`, keeps its own)."""
        return (type(self)._ssm_params is Mamba1._ssm_params and reads_as_plain(self.x_proj, nn.Linear)
                and reads_as_plain(self.dt_proj, nn.Linear))

    def _step_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, D, dt_bias) in float32 for the decode step (A = -exp(A_log)): kept copies, remade when a parameter
        changes, computed afresh with autograd on (`DecodeParams`)."""
        return self._decode_params.get(
            lambda: (-torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()),
            self.A_log, self.D, self.dt_proj.bias)

    def _step_ssm(self, x: torch.Tensor, z: torch.Tensor, cache: MixerState) -> torch.Tensor:
        """The conv's output x (B, D) and the gate z (B, D) -> the gated SSM output (B, D), dt_proj inside the op."""
        A, D, dt_bias = self._step_params()
        # dt = dt_proj.weight @ dt_low, + bias, softplus: in float32 inside the state-update kernel
        dt_low, B, C = torch.split(decode_linear(x, self.x_proj.weight, self.x_proj.bias),
                                   [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return selective_state_update(cache.ssm_state, x, dt_low, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=True, dt_proj_weight=self.dt_proj.weight)

    def fused_block_step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                         residual_in_fp32: bool, cache: MixerState) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`Block`'s decode step with its pre-norm folded in: (hidden, residual) (B, 1, M) -> (out, new residual).

        Four kernels on Triton: [add + norm + in_proj + conv update + silu], x_proj, [dt_proj + SSM step + D +
        gate], out_proj. None when it does not apply (a module that is not plain: adapter, hook, subclass;
        gradients or autocast on; `fused_step` False): the block then runs its norm and this layer as usual.
        """
        if not (self.fused_step and fused_step_allowed(hidden_states) and reads_as_plain(self, Mamba1)
                and reads_as_plain(norm, RMSNorm) and reads_as_plain(self.in_proj, nn.Linear)
                and reads_as_plain(self.out_proj, nn.Linear) and self._plain_ssm_params()
                and norm.weight.dtype == self.in_proj.weight.dtype):
            return None
        require_plain_conv(self.conv1d, "Mamba1")
        xz, residual = add_rms_norm_linear(
            hidden_states[:, 0], None if residual is None else residual[:, 0], norm.weight, self.in_proj.weight,
            self.in_proj.bias, eps=norm.eps, residual_dtype=torch.float32 if residual_in_fp32 else None,
            conv_state=cache.conv_state, conv_weight=self.conv1d.weight[:, 0], conv_bias=self.conv1d.bias)
        x, z = xz.chunk(2, dim=-1)  # (B, D) each; x has been through the conv and silu already
        out = decode_linear(self._step_ssm(x, z, cache), self.out_proj.weight, self.out_proj.bias)
        return out[:, None], residual[:, None]

    def step(self, hidden_states: torch.Tensor, cache: MixerState) -> torch.Tensor:
        """One token: (B, 1, d_model) -> (B, 1, d_model), advancing `cache` in place (constant cost per token).

        Both states are written in place (the ops update them), never rebound: a CUDA graph captured
        around this step keeps reading and writing the same cache tensors.
        """
        require_plain_conv(self.conv1d, "Mamba1")
        if (self.fused_step and mamba1_step_allowed(hidden_states) and self._plain_ssm_params()
                and reads_as_plain(self.in_proj, nn.Linear) and hidden_states.dtype == self.in_proj.weight.dtype):
            # a batch past the fused step's: everything between the block's norm and out_proj in two kernels
            A, D, dt_bias = self._step_params()
            y = mamba1_step(hidden_states[:, 0], self.in_proj.weight, self.in_proj.bias, cache.conv_state,
                            self.conv1d.weight[:, 0], self.conv1d.bias, self.x_proj.weight, self.x_proj.bias,
                            self.dt_proj.weight, dt_bias, A, D, cache.ssm_state)
            return self.out_proj(y)[:, None]
        # a batch past the fused step's: the plain projections through decode_linear (the many-rows kernel) and
        # dt_proj inside the state update, where many_rows_step_allowed says (off by default, see fusion.py)
        many = (self.fused_step and many_rows_step_allowed(hidden_states) and self._plain_ssm_params()
                and reads_as_plain(self.in_proj, nn.Linear) and reads_as_plain(self.out_proj, nn.Linear)
                and hidden_states.dtype == self.in_proj.weight.dtype == self.out_proj.weight.dtype)
        if not many and hidden_states.shape[0] > fusion.FUSED_STEP_MAX_BATCH and not torch.compiler.is_compiling():
            # cuBLAS GEMMs between every two of this step's kernels: none follows a PDL kernel, and PDL made the
            # 130M step 1.8% slower at batch 64 (H100, session 39, BENCHMARKS.md): launched the plain way here
            with pdl_mode(False):
                return self._step_op_by_op(hidden_states, cache, many)
        return self._step_op_by_op(hidden_states, cache, many)

    def _step_op_by_op(self, hidden_states: torch.Tensor, cache: MixerState, many: bool) -> torch.Tensor:
        """`step` one op at a time: in_proj, conv update, x_proj / dt_proj (or dt_proj inside the state update),
        state update, out_proj; `many`: the projections through decode_linear (the many-rows kernel)."""
        if many:
            xz = decode_linear(hidden_states[:, 0], self.in_proj.weight, self.in_proj.bias)
        else:
            xz = self.in_proj(hidden_states[:, 0])
        x, z = xz.chunk(2, dim=-1)  # (B, D) each
        x = causal_conv1d_update(cache.conv_state, x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        if many:
            return decode_linear(self._step_ssm(x, z, cache), self.out_proj.weight, self.out_proj.bias)[:, None]
        if self.fused_step and fused_step_allowed(hidden_states) and self._plain_ssm_params():
            return self.out_proj(self._step_ssm(x, z, cache))[:, None]
        dt, B, C, bias = self._ssm_params(x)
        A, D, dt_bias = self._step_params()
        dt_bias = None if bias is None else dt_bias  # a dt_proj called as a module added its bias already
        y = selective_state_update(cache.ssm_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return self.out_proj(y)[:, None]
