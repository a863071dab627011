"""User errors of the command-line tool and the argparse parser that raises them instead of exiting."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["UsageError", "Parser", "check_writable_dir", "check_writable_file", "seed_type", "int_at_least",
           "non_negative_int", "positive_int"]


class UsageError(Exception):
    """A mistake the user can fix (missing file, bad flag value, unknown recipe).

    `mambakit` prints it as one line, `mambakit <cmd>: error: <message>`, and exits with status 2
    (argparse's convention), without a traceback.
    """


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise UsageError (one line, no usage dump) and whose help keeps
    the layout of the description and epilog (the example commands)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(message)


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Create directory `path` if needed and prove it writable with a probe file, before any work is done.

    A directory the user cannot write into is a UsageError naming `flag` (e.g. "--out") and the reason.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mambakit-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    return directory


def check_writable_file(path: str | Path, flag: str) -> Path:
    """Check that file `path` can be written (its directory exists, it is not a directory, the OS lets us open
    it for appending) without changing it: a file the probe had to create is removed again."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    if not file.parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {file.parent} does not exist")
    existed = file.exists()
    try:
        with open(file, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    if not existed:
        file.unlink()
    return file


def seed_type(text: str) -> int:
    """An argparse type for --seed: an integer in [0, 2**64), the range torch's generators take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}")
    return value


def int_at_least(low: int, expected: str | None = None) -> Callable[[str], int]:
    """An argparse type for integers >= `low`; its error says "expected <expected>, got '<text>'" (`expected`
    defaults to "an integer >= <low>").

    Example:
        >>> parser.add_argument("--port", type=int_at_least(0))
    """
    expected = expected or f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


# counts that may be zero (--top-k, --save-every, ...)
non_negative_int = int_at_least(0)
# sizes and counts that must be at least one (--max-steps, --batch-size, --seqlen, ...)
positive_int = int_at_least(1, "a positive integer")
