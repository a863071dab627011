"""mambakit.cli: the `mambakit` console script. Subcommands are modules listed in `__main__.SUBCOMMANDS`."""

from .errors import UsageError

__all__ = ["UsageError"]
