"""Triton selective scan (Mamba-1 "S6"): launchers, the custom op pair and its autograd.

The kernels are in triton_scan_fwd.py (forward, segment combine) and triton_scan_bwd.py (backward, adjoint-only
carry pass); their tiling and time segmentation come from scan_policy.py (plain Python). Launchers here check,
allocate and launch, passing every kernel argument by keyword (a swapped stride would otherwise compile and
corrupt some shapes only).

Public launcher API (keyword-only; the fused mixer `mamba_inner` composes these):
    scan_fwd(x=, dt=, A=, B=, C=, ..., config=) -> y, final state or None, checkpoints or None
    scan_bwd(dy=, dhlast=, x=, ..., checkpoints=, want_dinitial=, config=) -> the gradients
    selective_scan_triton(...)  the autograd op, arguments as `mambakit.ops.selective_scan`
"""

from __future__ import annotations

import torch

from ..common import (autograd_op, cdiv, compute_dtype, contiguous, fake_grads, lastdim_contiguous, pack_grads,
                      unpack_grads)
from ..dispatch import triton_interpret
from ..triton_math import tl_compute_dtype
from . import scan_policy as policy
from .scan_policy import ScanConfig, default_bwd_time_segments, default_time_segments
from .triton_scan_bwd import scan_bwd_carry_kernel, scan_bwd_kernel
from .triton_scan_bwd_chunked import scan_bwd_chunked_kernel
from .triton_scan_fwd import scan_fwd_kernel, seg_combine_kernel

__all__ = ["selective_scan_triton", "scan_fwd", "scan_bwd", "ScanConfig", "default_time_segments",
           "default_bwd_time_segments"]


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _chain_segments(local, sdt, keep, A, first, has_seq: bool, acc_tl) -> torch.Tensor:
    """`seg_combine_kernel` over segments: (B, nseg, D, N) start values from each segment's local result
    `local` (B, nseg, D, N), sum of dt' `sdt` (B, nseg, D), restart flags `keep` (B, nseg) (read with has_seq)
    and the first segment's start `first` (B, D, N) or None (zeros). The forward's states and, with reversed
    segments, the backward's carries."""
    batch, nseg, dim, dstate = local.shape
    start = torch.empty_like(local)
    block = 256
    seg_combine_kernel[(cdiv(dim * dstate, block), batch)](
        hloc_ptr=local, sdt_ptr=sdt, keep_ptr=keep, A_ptr=A, h0_ptr=first if first is not None else local,
        hstart_ptr=start, nseg=nseg, dim=dim, dstate=dstate, s_Ad=A.stride(0), s_An=A.stride(1),
        BLOCK=block, HAS_H0=first is not None, HAS_SEQ=has_seq, ACC=acc_tl, num_warps=4,
    )
    return start


def scan_fwd(*, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
             initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, save_final: bool, save_checkpoints: bool,
             config: ScanConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward (inputs already checked; seq_idx int32).

    Args:
        x, dt, z: (B, L, D).   A: (D, N) real.   B, C: (B, L, G, N).   D, dt_bias: (D,).
        initial_state: (B, D, N).   seq_idx: (B, L) int32.
        save_final: return the final state.   save_checkpoints: return the checkpoints the backward reads.
    Returns:
        y (B, L, D) in x's dtype; the final state (B, D, N) or None; checkpoints (B, K, D, N) or None,
        K = ceil(L / config.checkpoint_interval); states in the compute dtype (float32, float64 for float64 inputs).

    With nseg > 1 time segments (`default_time_segments`): pass 1 (state-only kernel) gives each segment
    but the last its end state from a zero start and its sum of dt'; pass 2 chains them into every
    segment's true start state; pass 3 (the full kernel) scans all segments from those, writing y, the
    whole-sequence checkpoints (the backward's layout, unchanged) and the final state.
    """
    batch, seqlen, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    acc_t = compute_dtype(x.dtype)
    acc_tl = tl_compute_dtype(x.dtype)
    x, dt = x.contiguous(), dt.contiguous()  # x, dt, y share one set of strides
    z = lastdim_contiguous(z)
    D, dt_bias = contiguous(D), contiguous(dt_bias)  # read as dense (dim,) vectors
    # B, C in the accumulation dtype (a tiny copy): saves two conversions per state per step
    B = B.to(acc_t).contiguous()
    C = C.to(acc_t).contiguous()
    y = torch.empty_like(x)
    interval = config.checkpoint_interval  # the kernels call it CHUNK
    nintervals = cdiv(seqlen, interval)
    seg_len, nseg = policy.segments(seqlen, interval, default_time_segments(batch, seqlen, dim, dstate, ngroups, config,
                                                                       x.device))
    nl = config.fwd_nl or policy.fwd_nl(batch * nseg, dim, dstate, x.device)
    tiles = policy.pick_tiles(nl, dstate, dim // ngroups)
    hlast = torch.empty(batch, dim, dstate, device=x.device, dtype=acc_t) if save_final else None
    hck = torch.empty(batch, nintervals, dim, dstate, device=x.device, dtype=acc_t) if save_checkpoints else None
    h0 = initial_state.to(acc_t).contiguous() if initial_state is not None else None
    if seqlen == 0:  # nothing to scan (the kernel's clamped loads need one step)
        if hlast is not None:
            hlast.copy_(h0 if h0 is not None else torch.zeros_like(hlast))
        return y, hlast, hck
    zs = z.stride() if z is not None else (0, 0, 1)
    ss = seq_idx.stride() if seq_idx is not None else (0, 0)
    dummy = y  # stands in for absent tensors: the flags keep the kernel from reading it
    common = dict(
        x_ptr=x, dt_ptr=dt, B_ptr=B, C_ptr=C, A_ptr=A, bias_ptr=dt_bias if dt_bias is not None else dummy,
        seq_ptr=seq_idx if seq_idx is not None else dummy,
        seqlen=seqlen, seg_len=seg_len, nseg=nseg, dim=dim, dstate=dstate, group_size=dim // ngroups,
        nchunks=nintervals,
        s_b=x.stride(0), s_t=x.stride(1), s_zb=zs[0], s_zt=zs[1], s_Bb=B.stride(0), s_Bt=B.stride(1),
        s_Bg=B.stride(2), s_sb=ss[0], s_st=ss[1], s_Ad=A.stride(0), s_An=A.stride(1),
        CHUNK=interval, NL=tiles.NL, NH=tiles.NH, BD=tiles.BD, ACC=acc_tl, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, HAS_SEQ=seq_idx is not None, EVEN_N=dstate == tiles.NL * tiles.NH,
        LIBDEVICE=not triton_interpret(), I64=policy.needs_i64(seqlen, x.stride(1), zs[1], B.stride(1), ss[1]),
        PREFETCH=0 if triton_interpret() else policy.fwd_prefetch(config), num_warps=tiles.num_warps,
    )
    if nseg == 1:
        start, s_start = h0, (dim * dstate, 0)
    else:
        # pass 1: end state from zero, sum of dt' and restart flag of every segment but the last
        hloc = torch.empty(batch, nseg, dim, dstate, device=x.device, dtype=acc_t)
        sdt = torch.empty(batch, nseg, dim, device=x.device, dtype=acc_t)
        keep = torch.empty(batch, nseg, device=x.device, dtype=acc_t) if seq_idx is not None else sdt
        scan_fwd_kernel[(dim // tiles.BD, batch, nseg - 1)](
            z_ptr=dummy, D_ptr=dummy, h0_ptr=dummy, y_ptr=dummy, hlast_ptr=hloc, hck_ptr=dummy, sdt_ptr=sdt,
            keep_ptr=keep, s_h0b=0, s_h0c=0,
            HAS_D=False, HAS_Z=False, HAS_H0=False, SAVE_LAST=False, SAVE_CK=False, STATE_ONLY=True, **common,
        )
        # pass 2: start state of every segment, chained over the segments (elementwise over (D, N))
        start = _chain_segments(hloc, sdt, keep, A, h0, seq_idx is not None, acc_tl)
        s_start = (nseg * dim * dstate, dim * dstate)
    # pass 3 (the only pass when nseg == 1): the full forward of every segment from its start state
    scan_fwd_kernel[(dim // tiles.BD, batch, nseg)](
        z_ptr=z if z is not None else dummy, D_ptr=D if D is not None else dummy,
        h0_ptr=start if start is not None else dummy, y_ptr=y, hlast_ptr=hlast if hlast is not None else dummy,
        hck_ptr=hck if hck is not None else dummy, sdt_ptr=dummy, keep_ptr=dummy, s_h0b=s_start[0],
        s_h0c=s_start[1],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=start is not None, SAVE_LAST=save_final,
        SAVE_CK=save_checkpoints, STATE_ONLY=False, **common,
    )
    return y, hlast, hck


def scan_bwd(*, dy: torch.Tensor, dhlast: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
             dt_bias: torch.Tensor | None, dt_softplus: bool, seq_idx: torch.Tensor | None, checkpoints: torch.Tensor,
             want_dinitial: bool, config: ScanConfig, dz_out: torch.Tensor | None = None) -> tuple:
    """Launch the backward (the forward's inputs, its checkpoints (B, K, D, N) and the output gradients).

    Args:
        dy: (B, L, D) gradient of y.   dhlast: (B, D, N) gradient of the final state, or None.
        x ... seq_idx: the forward's inputs.   checkpoints: `scan_fwd(save_checkpoints=True)`'s.
        want_dinitial: compute the initial state's gradient.   config: the forward's.
        dz_out: where to write dz (z's shape and dtype, unit last stride, any other strides), e.g. the z half of
            a caller's d xz; None: a new tensor.
    Returns:
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state (None where absent or not wanted), each in its
        input's dtype; dinitial_state in the compute dtype.
    """
    hck = checkpoints
    batch, seqlen, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    acc_t = compute_dtype(x.dtype)
    acc_tl = tl_compute_dtype(x.dtype)
    x, dt = x.contiguous(), dt.contiguous()
    z = lastdim_contiguous(z)
    dy = lastdim_contiguous(dy)
    D, dt_bias = contiguous(D), contiguous(dt_bias)
    B32 = B.to(acc_t).contiguous()
    C32 = C.to(acc_t).contiguous()
    interval = config.checkpoint_interval  # the kernels call it CHUNK
    nintervals = hck.shape[1]
    chunked = bool(config.bwd_chunked)
    if chunked:  # the chunked backward: one warp over bd channels holds an interval's steps, no scratch
        bd, nwarps = policy.chunked_bwd_tiles(dim // ngroups, config)
        sub = policy.chunked_bwd_rows(config)
        transposed = policy.chunked_bwd_transposed(config, bd, sub)
        seg_len, nseg = policy.segments(seqlen, interval, policy.chunked_bwd_time_segments(
            batch, seqlen, dim, ngroups, config, x.device))
    else:
        transposed = False
        # the vectorised (B, *, D, N) anchors of the backward are in-thread only up to 128-bit vectors; the
        # row-gathered variant (config.bwd_rows) has no such anchors and may hold more
        bwd_nl = config.bwd_nl or (4 if acc_t == torch.float32 else 2)
        tiles = policy.pick_tiles(bwd_nl, dstate, dim // ngroups, config.bwd_channels)
        seg_len, nseg = policy.segments(seqlen, interval, default_bwd_time_segments(batch, seqlen, dim, dstate,
                                                                               ngroups, config, x.device))
        warps = batch * nseg * (dim // tiles.BD) * tiles.num_warps
        block_u = policy.bwd_block_u(warps, config, x.device)
        nprog = (dim // tiles.BD) * batch * nseg
        bn = tiles.NL * tiles.NH
        # the row-gathered kernel at U = 1 also keeps the state after the interval's last step (one block more)
        keep_all = bool(config.bwd_rows) and block_u == 1
        scratch = torch.empty(nprog, interval // block_u + keep_all, tiles.BD, bn, device=x.device, dtype=acc_t)
        # per (step, channel): dt' and sigmoid(dt + bias), written by pass A, read by pass B
        stash = torch.empty(nprog, interval, 2, tiles.BD, device=x.device, dtype=acc_t)
    dx = torch.empty_like(x)
    ddt = torch.empty_like(dt)
    if dz_out is not None:
        if z is None or dz_out.shape != z.shape or dz_out.dtype != z.dtype or dz_out.device != z.device \
                or dz_out.stride(-1) != 1:
            raise ValueError(f"scan_bwd: dz_out must be a {tuple(z.shape) if z is not None else 'z-shaped'} "
                             f"{None if z is None else z.dtype} tensor on z's device with a unit last stride, got "
                             f"{tuple(dz_out.shape)} {dz_out.dtype} strides {dz_out.stride()}")
        dz = dz_out
    else:
        dz = torch.empty(z.shape, device=x.device, dtype=z.dtype) if z is not None else None
    dzs = dz.stride() if dz is not None else (0, 0, 1)
    # dz's offsets: x's (0) or z's (1) where its strides are theirs (no address arithmetic of its own), else its own
    dz_at = 0 if dz is None or dz.stride() == x.stride() else 1 if dz.stride() == z.stride() else 2
    # channels summed before each dB / dC atomic: a group of lanes (default backward) or the program's (chunked)
    # (the program's when the chunked backward sums transposed)
    red_ch = (bd if transposed else min(config.bwd_reduce_channels or bd, bd) if chunked else
              min(config.bwd_reduce_channels or policy.DEFAULT_REDUCE_CHANNELS, tiles.BD))
    nrep = policy.bwd_replicas(dim // ngroups, red_ch, config)  # replicas of dB, dC for the atomics (see the kernel)
    dB = torch.zeros(nrep, batch, seqlen, ngroups, dstate, device=x.device, dtype=acc_t)
    dC = torch.zeros_like(dB)
    dA = torch.zeros(dim, dstate, device=x.device, dtype=acc_t)
    dD = torch.zeros(dim, device=x.device, dtype=acc_t) if D is not None else None
    dbias = torch.zeros(dim, device=x.device, dtype=acc_t) if dt_bias is not None else None
    dh0 = torch.empty(batch, dim, dstate, device=x.device, dtype=acc_t) if want_dinitial else None
    dhl = dhlast.to(acc_t).contiguous() if dhlast is not None else None
    zs = z.stride() if z is not None else (0, 0, 1)
    ss = seq_idx.stride() if seq_idx is not None else (0, 0)
    dummy = dx  # stands in for absent tensors: the flags keep the kernels from reading it
    i64 = policy.needs_i64(seqlen, x.stride(1), zs[1], B32.stride(1), ss[1], dy.stride(1), dzs[1])
    # (the interpreter has no registers to cap)
    maxnreg = None if triton_interpret() else config.bwd_maxnreg
    z_arg = z if z is not None else dummy
    bias_arg = dt_bias if dt_bias is not None else dummy
    seq_arg = seq_idx if seq_idx is not None else dummy
    cin, cin_n, cin_k = None, 1, 1
    if nseg > 1:
        # pass 1: the adjoint alone over every carry segment but the first, from a zero carry at its end (carry
        # segments: cin_k per backward segment, `scan_policy.carry_split`);
        # pass 2: the forward's segment combine, run over the reversed carry segments, chains them into the
        # carry entering every one (dL/dh_final for the last)
        cin_k = policy.carry_split(batch, seqlen, dim, dstate, ngroups, seg_len, nseg, config, x.device)
        sub_len = seg_len // cin_k
        cin_n = cdiv(seqlen, sub_len)
        ctiles = policy.pick_tiles(policy.fwd_nl(batch * cin_n, dim, dstate, x.device), dstate, dim // ngroups)
        cl = torch.empty(batch, cin_n, dim, dstate, device=x.device, dtype=acc_t)
        sdt = torch.empty(batch, cin_n, dim, device=x.device, dtype=acc_t)
        keep = torch.empty(batch, cin_n, device=x.device, dtype=acc_t) if seq_idx is not None else sdt
        scan_bwd_carry_kernel[(dim // ctiles.BD, batch, cin_n - 1)](
            dt_ptr=dt, z_ptr=z_arg, C_ptr=C32, A_ptr=A, bias_ptr=bias_arg, seq_ptr=seq_arg, dy_ptr=dy, cl_ptr=cl,
            sdt_ptr=sdt, keep_ptr=keep,
            seqlen=seqlen, seg_len=sub_len, nseg=cin_n, dim=dim, dstate=dstate, group_size=dim // ngroups,
            s_b=x.stride(0), s_zb=zs[0], s_zt=zs[1], s_t=x.stride(1), s_Bb=B32.stride(0), s_Bt=B32.stride(1),
            s_Bg=B32.stride(2), s_sb=ss[0], s_st=ss[1], s_Ad=A.stride(0), s_An=A.stride(1), s_yb=dy.stride(0),
            s_yt=dy.stride(1),
            NL=ctiles.NL, NH=ctiles.NH, BD=ctiles.BD, ACC=acc_tl, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
            SOFTPLUS=dt_softplus, HAS_SEQ=seq_idx is not None, EVEN_N=dstate == ctiles.NL * ctiles.NH,
            LIBDEVICE=not triton_interpret(), I64=i64,
            PREFETCH=0 if triton_interpret() else policy.carry_prefetch(config), num_warps=ctiles.num_warps,
        )
        cin = _chain_segments(cl, sdt, keep, A, dhl, seq_idx is not None, acc_tl)
    if chunked:
        scan_bwd_chunked_kernel[(dim // bd, batch, nseg)](
            x_ptr=x, dt_ptr=dt, z_ptr=z_arg, B_ptr=B32, C_ptr=C32, A_ptr=A, D_ptr=D if D is not None else dummy,
            bias_ptr=bias_arg, seq_ptr=seq_arg, hck_ptr=hck, dy_ptr=dy, dhlast_ptr=dhl if dhl is not None else dummy,
            cin_ptr=cin if cin is not None else dummy,
            dx_ptr=dx, ddt_ptr=ddt, dz_ptr=dz if dz is not None else dummy, dB_ptr=dB, dC_ptr=dC, dA_ptr=dA,
            dD_ptr=dD if dD is not None else dummy, dbias_ptr=dbias if dbias is not None else dummy,
            dh0_ptr=dh0 if dh0 is not None else dummy,
            buf_ptr=torch.empty(batch * nseg * (dim // bd), 2 + interval // sub, dstate, bd, device=x.device,
                                dtype=acc_t),
            seqlen=seqlen, dim=dim, dstate=dstate, group_size=dim // ngroups, nchunks=nintervals, seg_len=seg_len, nseg=nseg,
            cin_n=cin_n, cin_k=cin_k, rep_stride=dB.stride(0),
            s_b=x.stride(0), s_t=x.stride(1), s_zb=zs[0], s_zt=zs[1], s_Bb=B32.stride(0),
            s_Bg=B32.stride(2), s_sb=ss[0], s_st=ss[1], s_Ad=A.stride(0), s_An=A.stride(1), s_yb=dy.stride(0),
            s_yt=dy.stride(1), s_dzb=dzs[0], s_dzt=dzs[1],
            S_BT=B32.stride(1), NREP=nrep, RED_CH=red_ch, CHUNK=interval, SUB=sub, BD=bd, ACC=acc_tl,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
            HAS_SEQ=seq_idx is not None, HAS_DHLAST=dhl is not None, WANT_DH0=want_dinitial,
            LIBDEVICE=not triton_interpret(), I64=i64, SEGMENTED=nseg > 1, DZ_AT=dz_at, TRANSPOSED=transposed,
            EVEN_T=seqlen % sub == 0, num_warps=nwarps, **({} if maxnreg is None else {"maxnreg": maxnreg}),
        )
    else:
        scan_bwd_kernel[(dim // tiles.BD, batch, nseg)](
            x_ptr=x, dt_ptr=dt, z_ptr=z_arg, B_ptr=B32, C_ptr=C32, A_ptr=A, D_ptr=D if D is not None else dummy,
            bias_ptr=bias_arg, seq_ptr=seq_arg, hck_ptr=hck, dy_ptr=dy, dhlast_ptr=dhl if dhl is not None else dummy,
            cin_ptr=cin if cin is not None else dummy,
            dx_ptr=dx, ddt_ptr=ddt, dz_ptr=dz if dz is not None else dummy, dB_ptr=dB, dC_ptr=dC, dA_ptr=dA,
            dD_ptr=dD if dD is not None else dummy, dbias_ptr=dbias if dbias is not None else dummy,
            dh0_ptr=dh0 if dh0 is not None else dummy, scr_ptr=scratch, stash_ptr=stash,
            seqlen=seqlen, dim=dim, dstate=dstate, group_size=dim // ngroups, nchunks=nintervals, seg_len=seg_len,
            nseg=nseg, cin_n=cin_n, cin_k=cin_k, rep_stride=dB.stride(0),
            s_b=x.stride(0), s_t=x.stride(1), s_zb=zs[0], s_zt=zs[1], s_Bb=B32.stride(0), s_Bt=B32.stride(1),
            s_Bg=B32.stride(2), s_sb=ss[0], s_st=ss[1], s_Ad=A.stride(0), s_An=A.stride(1), s_yb=dy.stride(0),
            s_yt=dy.stride(1), s_dzb=dzs[0], s_dzt=dzs[1],
            NREP=nrep, RED_CH=red_ch, CHUNK=interval, U=block_u, NL=tiles.NL, NH=tiles.NH, BD=tiles.BD, ACC=acc_tl,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
            HAS_SEQ=seq_idx is not None, HAS_DHLAST=dhl is not None, WANT_DH0=want_dinitial,
            EVEN_N=dstate == tiles.NL * tiles.NH, LIBDEVICE=not triton_interpret(), I64=i64, SEGMENTED=nseg > 1,
            ROWS=bool(config.bwd_rows), DZ_AT=dz_at, PREFETCH=0 if triton_interpret() else policy.bwd_prefetch(config),
            num_warps=tiles.num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg}),
        )
    dB, dC = dB.sum(0), dC.sum(0)
    return (dx, ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), None if dD is None else dD.to(D.dtype),
            dz, None if dbias is None else dbias.to(dt_bias.dtype), dh0)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


# One custom op pair (torch.library): the forward returns y, the final state and the checkpoints the backward
# reads; autograd is registered on it, so torch.compile, autocast and FSDP see one op with fake tensors instead
# of launcher code. Optional outputs come back as empty tensors (a schema cannot return None).


def _scan_fwd_impl(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                   initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, dt_softplus: bool,
                   return_final_state: bool, save_checkpoints: bool, config: list[int]) -> tuple[torch.Tensor, torch.Tensor,
                   torch.Tensor]:
    y, hlast, hck = scan_fwd(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                             initial_state=initial_state, seq_idx=seq_idx, save_final=return_final_state,
                             save_checkpoints=save_checkpoints, config=ScanConfig.from_ints(config))
    acc = compute_dtype(x.dtype)
    return y, x.new_empty(0, dtype=acc) if hlast is None else hlast, x.new_empty(0, dtype=acc) if hck is None else hck


_scan_fwd_op = torch.library.custom_op("mambakit::selective_scan_fwd", mutates_args=())(_scan_fwd_impl)


@_scan_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, return_final_state, save_checkpoints, config):
    batch, seqlen, dim = x.shape
    acc = compute_dtype(x.dtype)
    hlast = x.new_empty((batch, dim, A.shape[1]) if return_final_state else (0,), dtype=acc)
    nintervals = cdiv(seqlen, ScanConfig.from_ints(config).checkpoint_interval)
    hck = x.new_empty((batch, nintervals, dim, A.shape[1]) if save_checkpoints else (0,), dtype=acc)
    return torch.empty_like(x), hlast, hck


def _scan_bwd_impl(dy: torch.Tensor, dhlast: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                   B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                   dt_bias: torch.Tensor | None, seq_idx: torch.Tensor | None, hck: torch.Tensor, dt_softplus: bool,
                   want_dh0: bool, config: list[int]) -> list[torch.Tensor]:
    *grads, dh0 = scan_bwd(dy=dy, dhlast=dhlast, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                           dt_softplus=dt_softplus, seq_idx=seq_idx, checkpoints=hck, want_dinitial=want_dh0,
                           config=ScanConfig.from_ints(config))
    # dx, ddt, dA, dB, dC, dD, dz, dbias, then dh0 (float32, or float64 for float64 inputs)
    return pack_grads(grads, (x, dt, A, B, C, D, z, dt_bias)) + [x.new_empty(0) if dh0 is None else dh0]


_scan_bwd_op = torch.library.custom_op("mambakit::selective_scan_bwd", mutates_args=())(_scan_bwd_impl)


@_scan_bwd_op.register_fake
def _(dy, dhlast, x, dt, A, B, C, D, z, dt_bias, seq_idx, hck, dt_softplus, want_dh0, config):
    dh0 = hck.new_empty((x.shape[0], x.shape[2], A.shape[1])) if want_dh0 else x.new_empty(0)
    return fake_grads((x, dt, A, B, C, D, z, dt_bias), [True] * 8) + [dh0]


def _scan_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, return_final_state, save_checkpoints, config = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, output[2])
    ctx.dt_softplus, ctx.config, ctx.return_final_state = dt_softplus, config, return_final_state
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype


def _scan_backward(ctx, dy, dhlast, _dhck, bwd):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, hck = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(x)
    want_dh0 = ctx.h0_dtype is not None and ctx.needs_input_grad[8]
    grads = bwd(dy, dhlast if ctx.return_final_state else None, x, dt, A, B, C, D, z, dt_bias, seq_idx, hck,
                         ctx.dt_softplus, want_dh0, ctx.config)
    present = (True, True, True, True, True, D is not None, z is not None, dt_bias is not None, want_dh0)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = unpack_grads(grads, present)
    if dh0 is not None:
        dh0 = dh0.to(ctx.h0_dtype)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0, None, None, None, None, None


_selective_scan_op = autograd_op("SelectiveScan", _scan_fwd_impl, _scan_fwd_op, _scan_setup_context, _scan_backward,
                                 _scan_bwd_impl, _scan_bwd_op)


def selective_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    *,
    config: ScanConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton selective scan; arguments as in `mambakit.ops.selective_scan` (inputs already checked).

    Args:
        x, dt, z: (batch, seqlen, dim).   A: (dim, dstate) real.   B, C: (batch, seqlen, ngroups, dstate).
        D, dt_bias: (dim,).   initial_state: (batch, dim, dstate).   seq_idx: (batch, seqlen) int.
        config: tiling override (benchmarks, tests); None picks from the shape.
    Returns:
        y (batch, seqlen, dim) in x's dtype, and the (batch, dim, dstate) float32 final state when asked
        (float64 for float64 inputs, which run the kernels in float64).

    Example:
        >>> y = selective_scan_triton(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    """
    if A.is_complex():
        raise ValueError("selective_scan_triton: complex A is not supported; use backend 'reference' or 'torch'")
    cfg = config or policy.DEFAULT_CONFIG
    # (the chunked backward takes the largest divisor of the interval up to block_u: `chunked_bwd_rows`)
    if cfg.checkpoint_interval % 4 or (cfg.block_u is not None and not cfg.bwd_chunked
                                       and cfg.checkpoint_interval % cfg.block_u):
        raise ValueError(f"selective_scan_triton: checkpoint_interval={cfg.checkpoint_interval} must be a multiple "
                         f"of 4 and of block_u={cfg.block_u}")
    if cfg.time_segments is not None and cfg.time_segments < 1:
        raise ValueError(f"selective_scan_triton: time_segments={cfg.time_segments} must be >= 1 (or None)")
    red = cfg.bwd_reduce_channels
    if red is not None and (red < 1 or red & (red - 1)):
        raise ValueError(f"selective_scan_triton: bwd_reduce_channels={red} must be a power of two (or None)")
    if cfg.bwd_time_segments is not None and cfg.bwd_time_segments < 1:
        raise ValueError(f"selective_scan_triton: bwd_time_segments={cfg.bwd_time_segments} must be >= 1 (or None)")
    for name in ("bwd_prefetch", "fwd_prefetch", "carry_prefetch"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ValueError(f"selective_scan_triton: {name}={getattr(cfg, name)} must be >= 0 steps (or None)")
    if cfg.bwd_replicas is not None and cfg.bwd_replicas < 1:
        raise ValueError(f"selective_scan_triton: bwd_replicas={cfg.bwd_replicas} must be >= 1")
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    save_checkpoints = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, hlast, _ = _selective_scan_op(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus,
                                     return_final_state, save_checkpoints, cfg.as_ints())
    return (y, hlast) if return_final_state else y
