"""Input validation shared by the public ops.

Every public op validates its arguments through a `ShapeChecker` before dispatching, so that a
bad call fails with a `ValueError` that names the op, the argument, the shape it got and the
shape it needs, instead of an opaque error deep inside a kernel.

    >>> chk = ShapeChecker("selective_scan", device=x.device)
    >>> chk.tensor("x", x, ("batch", "seqlen", "dim"))
    >>> chk.tensor("A", A, ("dim", "dstate"), dtypes=FLOAT32_OR_COMPLEX)
    >>> chk.size("dim") % chk.size("ngroups") == 0 or chk.fail("B", "ngroups must divide dim")

Below it, one helper per op family checks the arguments that the family's sequence op and its one-token
update share (they differ only by the seqlen axis and the state's name): `check_selective_scan`,
`check_ssd`, `check_causal_conv1d`, `check_rms_norm`; `write_back` is the updates' common ending.
The backends (torch_*.py, triton_*.py) take these arguments already checked.
"""

from __future__ import annotations

import torch

FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int32, torch.int64)


class ShapeChecker:
    """Binds named sizes on first sight and checks every later tensor against them."""

    def __init__(self, op: str, device: torch.device | None = None):
        self.op = op
        self.device = device
        self.sizes: dict[str, int] = {}

    def fail(self, name: str, message: str) -> None:
        raise ValueError(f"{self.op}: {name} {message}")

    def size(self, dim: str) -> int:
        return self.sizes[dim]

    def _spec(self, dims: tuple[str | int, ...]) -> str:
        parts = []
        for d in dims:
            if isinstance(d, int):
                parts.append(str(d))
            elif d in self.sizes:
                parts.append(f"{d}={self.sizes[d]}")
            else:
                parts.append(d)
        return "(" + ", ".join(parts) + ")"

    def tensor(
        self,
        name: str,
        t: object,
        dims: tuple[str | int, ...],
        dtypes: tuple[torch.dtype, ...] = FLOATS,
        optional: bool = False,
    ) -> torch.Tensor | None:
        """Check `t` has shape `dims` (names bind sizes), a dtype in `dtypes` and the op's device."""
        if t is None:
            if optional:
                return None
            self.fail(name, f"is required: expected a tensor of shape {self._spec(dims)}")
        if not isinstance(t, torch.Tensor):
            self.fail(name, f"must be a torch.Tensor of shape {self._spec(dims)}, got {type(t).__name__}")
        shape = t.shape
        if len(shape) != len(dims):
            self.fail(name, f"must be {len(dims)}-D with shape {self._spec(dims)}, got {t.dim()}-D shape {tuple(shape)}")
        sizes = self.sizes  # (every public op runs this for each argument, per call: kept lean)
        for d, n in zip(dims, shape):
            expected = sizes.setdefault(d, n) if isinstance(d, str) else d  # (an int, or a SymInt under compile)
            if expected != n:
                self.fail(name, f"must have shape {self._spec(dims)}, got {tuple(shape)}")
        if t.dtype not in dtypes:
            names = ", ".join(str(dt).removeprefix("torch.") for dt in dtypes)
            self.fail(name, f"must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
        device = t.device
        if self.device is None:
            self.device = device
        elif device != self.device:
            self.fail(name, f"must be on {self.device} like the op's other inputs, got {device}")
        return t

    def divides(self, name: str, small: str, big: str) -> None:
        """Check that size `small` divides size `big` (e.g. ngroups divides nheads)."""
        if self.sizes[big] % self.sizes[small] != 0:
            self.fail(name, f"{small}={self.sizes[small]} must divide {big}={self.sizes[big]}")

    def seq_idx(self, seq_idx: torch.Tensor | None) -> torch.Tensor | None:
        """Check seq_idx is (batch, seqlen) integer and nondecreasing along each row.

        The monotonicity check reads values, which on CUDA would force a device sync in every layer of
        every step, so it runs on eager CPU tensors only (torch.compile cannot branch on a value: a fullgraph
        trace would fail); shapes and dtypes are checked everywhere.
        """
        if seq_idx is None:
            return None
        self.tensor("seq_idx", seq_idx, ("batch", "seqlen"), dtypes=INTS)
        if (seq_idx.device.type == "cpu" and seq_idx.shape[1] > 1 and not torch.compiler.is_compiling()
                and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any())):
            row = int((seq_idx[:, 1:] < seq_idx[:, :-1]).any(dim=1).nonzero()[0, 0])
            self.fail("seq_idx", f"must be nondecreasing along each row (packed documents), row {row} decreases")
        return seq_idx


def as_grouped(t: object, rank: int) -> object:
    """Accept B or C without their ngroups axis, meaning ngroups = 1: (..., dstate) of rank - 1 dims becomes
    the (..., 1, dstate) view of `rank` dims; anything else is returned as it is, for the checker to judge."""
    if isinstance(t, torch.Tensor) and t.dim() == rank - 1:
        return t.unsqueeze(-2)
    return t


def write_back(state: torch.Tensor, result: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The end of every one-token update: a backend returns (y, new_state), updated in place or not; the
    caller's `state` must hold new_state afterwards. Returns y."""
    y, new_state = result
    if new_state is not state:
        state.copy_(new_state)
    return y


# ---- one helper per op family: the sequence op (tokens ("batch", "seqlen")) and its update (("batch",)) ----

_REAL_STATE = (torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)


def _tokens(step: bool) -> tuple[str, ...]:
    return ("batch",) if step else ("batch", "seqlen")


def check_selective_scan(op: str, x, dt, A, B, C, D, z, dt_bias, state, *, step: bool,
                         seq_idx: torch.Tensor | None = None,
                         dt_proj_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan` (step False: x, dt, z (batch, seqlen, dim), B, C (batch, seqlen, ngroups, dstate),
    optional float32/64 initial_state) and `selective_state_update` (step True: no seqlen axis, `state` required,
    bf16 / fp16 allowed for a real A), both with A (dim, dstate), D, dt_bias (dim,) and a (batch, dim, dstate)
    state, complex where A is.
    With `dt_proj_weight` (dim, rank), dt is the low-rank (..., rank) input of that projection.
    Returns B and C with their ngroups axis."""
    tokens = _tokens(step)
    chk = ShapeChecker(op)
    chk.tensor("x", x, tokens + ("dim",))
    if dt_proj_weight is None:
        chk.tensor("dt", dt, tokens + ("dim",))
    else:
        chk.tensor("dt", dt, tokens + ("rank",))
        chk.tensor("dt_proj_weight", dt_proj_weight, ("dim", "rank"))
    B, C = as_grouped(B, len(tokens) + 2), as_grouped(C, len(tokens) + 2)
    chk.tensor("B", B, tokens + ("ngroups", "dstate"), dtypes=FLOATS + _COMPLEX)
    chk.tensor("C", C, tokens + ("ngroups", "dstate"), dtypes=FLOATS + _COMPLEX)
    chk.tensor("A", A, ("dim", "dstate"), dtypes=_REAL_STATE + _COMPLEX)
    chk.tensor("D", D, ("dim",), optional=True)
    chk.tensor("dt_bias", dt_bias, ("dim",), optional=True)
    chk.tensor("z", z, tokens + ("dim",), optional=True)
    chk.divides("B", "ngroups", "dim")
    # a decode cache may keep a real state in bf16 / fp16 (updated in float32 and rounded back each step)
    state_dtypes = (_COMPLEX + _REAL_STATE if A.is_complex() else FLOATS if step else _REAL_STATE)
    chk.tensor("state" if step else "initial_state", state, ("batch", "dim", "dstate"), dtypes=state_dtypes,
               optional=not step)
    chk.seq_idx(seq_idx)
    return B, C


def check_ssd(op: str, x, dt, A, B, C, D, z, dt_bias, dt_limit, state, *, step: bool,
              seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssd` (step False: x, z (batch, seqlen, nheads, headdim), dt (batch, seqlen, nheads), B, C (batch,
    seqlen, ngroups, dstate), optional float32/64 initial_state) and `ssd_state_update` (step True: no seqlen
    axis, `state` required, bf16 / fp16 allowed), both with A, dt_bias (nheads,), D (nheads,) or (nheads,
    headdim), dt_limit (low, high) and a (batch, nheads, headdim, dstate) state. Returns B and C with their
    ngroups axis."""
    tokens = _tokens(step)
    chk = ShapeChecker(op)
    chk.tensor("x", x, tokens + ("nheads", "headdim"))
    chk.tensor("dt", dt, tokens + ("nheads",))
    B, C = as_grouped(B, len(tokens) + 2), as_grouped(C, len(tokens) + 2)
    chk.tensor("B", B, tokens + ("ngroups", "dstate"))
    chk.tensor("C", C, tokens + ("ngroups", "dstate"))
    chk.tensor("z", z, tokens + ("nheads", "headdim"), optional=True)
    chk.tensor("A", A, ("nheads",), dtypes=_REAL_STATE)
    chk.tensor("D", D, ("nheads", "headdim") if isinstance(D, torch.Tensor) and D.dim() == 2 else ("nheads",),
               optional=True)
    chk.tensor("dt_bias", dt_bias, ("nheads",), optional=True)
    chk.divides("B", "ngroups", "nheads")
    if len(dt_limit) != 2 or not (0.0 <= dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"{op}: dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit}")
    chk.tensor("state" if step else "initial_state", state, ("batch", "nheads", "headdim", "dstate"),
               dtypes=FLOATS if step else _REAL_STATE, optional=not step)
    chk.seq_idx(seq_idx)
    return B, C


_ACTIVATIONS = (None, "silu", "swish")


def check_causal_conv1d(op: str, x, weight, bias, activation, state, *, step: bool,
                        seq_idx: torch.Tensor | None = None) -> None:
    """`causal_conv1d` (step False: x (batch, seqlen, dim), optional initial_state) and `causal_conv1d_update`
    (step True: x (batch, dim), conv_state required), both with weight (dim, width >= 2), bias (dim,), an
    activation in (None, "silu", "swish") and a (batch, dim, width - 1) window."""
    chk = ShapeChecker(op)
    chk.tensor("x", x, _tokens(step) + ("dim",))
    chk.tensor("weight", weight, ("dim", "width"))
    chk.tensor("bias", bias, ("dim",), optional=True)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if chk.size("width") < 2:
        raise ValueError(f"{op}: weight must have width >= 2, got shape {tuple(weight.shape)}")
    chk.tensor("conv_state" if step else "initial_state", state, ("batch", "dim", chk.size("width") - 1),
               optional=not step)
    chk.seq_idx(seq_idx)


def check_rms_norm(op: str, x, weight, eps: float, **like_x: torch.Tensor | None) -> ShapeChecker:
    """`rms_norm` and `add_rms_norm`: x (..., hidden) with any leading dims, weight (hidden,), eps >= 0, and
    the optional tensors of x's shape named in `like_x` (z, residual). Returns the checker (sizes bound)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a tensor of shape (..., hidden), got {getattr(x, 'shape', type(x))}")
    lead = tuple(f"d{i}" for i in range(x.dim() - 1))
    chk = ShapeChecker(op)
    chk.tensor("x", x, lead + ("hidden",))
    chk.tensor("weight", weight, ("hidden",))
    for name, t in like_x.items():
        chk.tensor(name, t, lead + ("hidden",), optional=True)
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    return chk
