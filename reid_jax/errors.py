"""User errors as one-line messages, for every command (`reid_jax.main`, `data.build`, `convert`, `captioning`).

A `UserError` is something the user gave that cannot work (a path, a flag, a config field, a file's contents).
Its message says what was wrong (naming the file, key or flag), what was expected and what to do; `report`
prints it as one line, `error: ...`, on stderr, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# exit statuses shared by the commands
EXIT_ERROR = 1  # a user error: the message says what to change
EXIT_USAGE = 2  # a bad command line (argparse and absl use 2 too)


class UserError(Exception):
    """Bad input from the user; the message is complete on its own (what, expected, what to do)."""


def expand_path(text: str | os.PathLike | None) -> Path | None:
    """A path flag as the user meant it: `~` and `$VARS` expanded (bash leaves `--flag=~/x` unexpanded)."""
    if text is None or str(text) == "":
        return None
    return Path(os.path.expandvars(os.path.expanduser(str(text))))


def report(e: BaseException, status: int = EXIT_ERROR) -> int:
    """Prints `error: <message>` on one line (newlines folded) and returns the exit status."""
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def warn(message: str) -> None:
    """A one-line warning on stderr about a suspicious but allowed setting."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


class ConfigError(UserError, ValueError):
    """A config field (or combination) that cannot work; the message names the field as `config.a.b`."""
