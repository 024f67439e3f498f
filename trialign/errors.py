"""User-facing errors.

`TriAlignError` is for problems a user can fix (bad config, missing file, unknown name). The CLI prints its message
as one line and exits non-zero; a traceback is shown only with `--debug`. Messages name the field or file and say
what was expected.
"""

from __future__ import annotations


class TriAlignError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    exit_code = 2

    def __init__(self, message: str):
        # One line: a multi-line message would be cut by log scrapers and is harder to read in a terminal.
        super().__init__(" ".join(str(message).split()))


def require(condition: bool, message: str) -> None:
    """Raise `TriAlignError(message)` unless `condition` holds."""
    if not condition:
        raise TriAlignError(message)


def require_module(module: str, what: str, install: str) -> None:
    """A one-line error naming `what` needs `module` and how to `install` it, when `module` is not importable
    (the check every optional extra's entry point makes before importing it)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TriAlignError(f"{what}: {module} is not installed; {install}")
