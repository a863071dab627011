"""Renamed keyword arguments: the old name still works for a while, with a DeprecationWarning.

Imports nothing from mambakit, so every layer (ops included) may use it.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["DEPRECATED", "renamed_argument"]


class _Deprecated:
    """The default of a former argument name whose "not given" must differ from None (None is a real value of
    the new name): shows as `<deprecated>` in help() and signatures, where a bare object() shows its address."""

    def __repr__(self) -> str:
        return "<deprecated>"


DEPRECATED = _Deprecated()


def renamed_argument(where: str, old: str, new: str, old_value: Any, new_value: Any, *, unset: Any = None,
                     new_default: Any = None, stacklevel: int = 3) -> Any:
    """The value of argument `new`, or of its former name `old` (with a DeprecationWarning) when only that was given.

    `unset` is the value that means "not given" for the old name, and for the new one unless `new_default` is
    given: the new name's real default (e.g. 2048), which then counts as "not given" (so an explicit value equal
    to it gives way to the old name). Giving both otherwise is a ValueError.
    `stacklevel` 3 points the warning at the caller of the function that took the old name (one more per
    helper in between).

    Example:
        >>> state_dtype = renamed_argument("Mamba2.allocate_state", "ssm_dtype", "state_dtype", ssm_dtype, state_dtype)
    """
    if old_value is unset:
        return new_value
    new_unset = unset if new_default is None else new_default
    if new_value is not unset and new_value != new_unset and new_value != old_value:
        raise ValueError(f"{where}: got both {new}={new_value!r} and its former name {old}={old_value!r}; "
                         f"pass {new} only")
    warnings.warn(f"{where}: the argument {old!r} is renamed {new!r}; the old name will be removed",
                  DeprecationWarning, stacklevel=stacklevel)
    return old_value
