"""The one exception the checkpoint layer raises for problems with a checkpoint directory the user gave."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked: neither a local directory nor a Hub id that
    resolves (offline and not cached, no such repository or revision, huggingface_hub not installed), a
    missing or corrupt file, keys or shapes that do not match the config, a config the target format
    cannot express.

    The message names the directory or file and says what was expected; the command-line tool prints
    it as one line, without a traceback.
    """
