"""The one exception the data layer raises for problems with the user's data or environment."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data path, file format, field or optional package problem the user can fix.

    The message names the file (and line or record where there is one) and what was expected;
    the command-line tool prints it as one line, without a traceback.
    """
