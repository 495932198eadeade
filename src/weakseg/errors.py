"""The base class of every error caused by what the user gave weakseg, and the exit codes.

A ``UserError`` is bad input or data: a config key, a dataset or model file, a store, a run held by
another writer. Its message is one line that names the file or key and what was expected.
``weakseg`` commands print it as ``weakseg <command>: error: <message>`` and exit with
``EXIT_USER_ERROR``; any other exception is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

EXIT_BUG = 1  # Python's status for an uncaught exception
EXIT_USAGE = 2  # argparse's status for a command-line usage error
EXIT_USER_ERROR = 3  # bad input or data


class UserError(Exception):
    """Bad input or data; the message names the file or config key and what was expected."""


class InputError(UserError, ValueError):
    """A file or folder named on the command line cannot be used as given (e.g. an output folder
    that would overwrite inputs)."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, shortened: a library's multi-line
    message inside one of ours."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
