"""Input validation shared by the public ops.

Every public op validates its arguments through a `ShapeChecker` before dispatching, so that a
bad call fails with a `ValueError` that names the op, the argument, the shape it got and the
shape it needs, instead of an opaque error deep inside a kernel.

    >>> chk = ShapeChecker("selective_scan", device=x.device)
    >>> chk.tensor("x", x, ("batch", "seqlen", "dim"))
    >>> chk.tensor("A", A, ("dim", "dstate"), dtypes=FLOAT32_OR_COMPLEX)
    >>> chk.size("dim") % chk.size("ngroups") == 0 or chk.fail("B", "ngroups must divide dim")
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
        if t.dim() != len(dims):
            self.fail(name, f"must be {len(dims)}-D with shape {self._spec(dims)}, got {t.dim()}-D shape {tuple(t.shape)}")
        for d, n in zip(dims, t.shape):
            expected = d if isinstance(d, int) else self.sizes.get(d)
            if expected is not None and expected != n:
                self.fail(name, f"must have shape {self._spec(dims)}, got {tuple(t.shape)}")
            if isinstance(d, str) and d not in self.sizes:
                self.sizes[d] = n
        if t.dtype not in dtypes:
            names = ", ".join(str(dt).removeprefix("torch.") for dt in dtypes)
            self.fail(name, f"must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
        if self.device is None:
            self.device = t.device
        elif t.device != self.device:
            self.fail(name, f"must be on {self.device} like the op's other inputs, got {t.device}")
        return t

    def divides(self, name: str, small: str, big: str) -> None:
        """Check that size `small` divides size `big` (e.g. ngroups divides nheads)."""
        if self.sizes[big] % self.sizes[small] != 0:
            self.fail(name, f"{small}={self.sizes[small]} must divide {big}={self.sizes[big]}")

    def seq_idx(self, seq_idx: torch.Tensor | None) -> torch.Tensor | None:
        """Check seq_idx is (batch, seqlen) integer and nondecreasing along each row.

        The monotonicity check reads values, which on CUDA would force a device sync in every layer of
        every step, so it runs on CPU tensors only; shapes and dtypes are checked everywhere.
        """
        if seq_idx is None:
            return None
        self.tensor("seq_idx", seq_idx, ("batch", "seqlen"), dtypes=INTS)
        if seq_idx.device.type == "cpu" and seq_idx.shape[1] > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            row = int((seq_idx[:, 1:] < seq_idx[:, :-1]).any(dim=1).nonzero()[0, 0])
            self.fail("seq_idx", f"must be nondecreasing along each row (packed documents), row {row} decreases")
        return seq_idx


def as_grouped(name: str, t: torch.Tensor | None, chk: ShapeChecker) -> torch.Tensor | None:
    """Accept B or C as (batch, seqlen, dstate) meaning ngroups = 1: return a 4-D view."""
    if isinstance(t, torch.Tensor) and t.dim() == 3:
        return t.unsqueeze(2)
    return t
