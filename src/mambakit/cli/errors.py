"""User errors of the command-line tool and the argparse parser that raises them instead of exiting."""

from __future__ import annotations

import argparse

__all__ = ["UsageError", "Parser"]


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
