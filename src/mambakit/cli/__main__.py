"""The `mambakit` console script: `mambakit <command> [flags]`.

Each command is a module in `SUBCOMMANDS` exposing `SUMMARY` (one line), `build_parser(prog)` and a
typed `main(**flags) -> int`. Adding a command is one module and one line here; a command module
imports the heavy parts of the library inside its `main`, so building parsers and `--help` stay cheap.

User errors (`UsageError`, and the library's `DataError` and `CheckpointError`) print one line,
`mambakit <command>: error: <message>`, to stderr and exit with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

from .errors import UsageError

SUBCOMMANDS: dict[str, str] = {
    "train": "mambakit.cli.train",
    "eval": "mambakit.cli.eval",
    "generate": "mambakit.cli.generate",
    "chat": "mambakit.cli.chat",
    "convert": "mambakit.cli.convert",
    "serve": "mambakit.cli.serve",
    "reproduce": "mambakit.cli.reproduce",
    "data": "mambakit.cli.data",
    "bench": "mambakit.cli.bench",
    "plot": "mambakit.cli.plot",
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {importlib.import_module(module).SUMMARY}" for name, module in SUBCOMMANDS.items()]
    return ("usage: mambakit <command> [flags]\n\ncommands:\n" + "\n".join(lines)
            + "\n\nRun `mambakit <command> --help` for the flags and example commands of each.\n"
            + "  mambakit train\n  mambakit generate --model runs/shakespeare --prompt \"**HAMLET**\"\n")


# Library exceptions that mean "the user's data or checkpoint is wrong" (module, class); checked only
# when their module is loaded, so an import here never slows a command down or fails it.
_USER_ERRORS = (("mambakit.data.errors", "DataError"), ("mambakit.checkpoints.errors", "CheckpointError"))


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, UsageError):
        return True
    for module_name, class_name in _USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(err, getattr(module, class_name)):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from .. import __version__

        print(f"mambakit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mambakit: error: unknown command {name!r} (choose from {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    prog = f"mambakit {name}"
    try:
        module = importlib.import_module(SUBCOMMANDS[name])
        args = module.build_parser(prog).parse_args(rest)
        with warnings.catch_warnings():
            # the library's warnings (e.g. a checkpoint fallback) as one line each, not source excerpts
            warnings.showwarning = lambda message, category, *a, **k: print(f"{prog}: warning: {message}",
                                                                             file=sys.stderr)
            return int(module.main(**vars(args)) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`mambakit generate ... | head`): later writes to stdout, including the
        # interpreter's flush at exit, go nowhere instead of raising again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        print(f"{prog}: error: the output was closed before generation ended (broken pipe)", file=sys.stderr)
        return 2
    except Exception as err:
        if not _is_user_error(err):
            raise
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
