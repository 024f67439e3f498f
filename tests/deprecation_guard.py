"""Deprecations at trialign's own call sites fail the test that meets them; those inside third-party code do not.

A FutureWarning/DeprecationWarning (through `warnings.warn`), or a deprecation message of the `transformers` logger
(its ``warning_once`` notices), counts as *ours* when the frames between it and the nearest trialign frame belong
only to the library that warns and to torch's module dispatch (``model(...)`` reaches ``forward`` through
``torch.nn.Module.__call__``): trialign called that library's deprecated API itself. When another third-party
package stands in between (peft reading a deprecated transformers property inside ``get_peft_model``), the call is
not ours to change and the warning stays a warning.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from types import FrameType

PACKAGE = Path(__file__).resolve().parents[1] / "trialign"
PASS_THROUGH = {"torch", "functools", "contextlib", "tests", "deprecation_guard"}
DEPRECATIONS = (DeprecationWarning, FutureWarning)


class OwnDeprecation(AssertionError):
    """A deprecated API called from trialign/ (see the module docstring)."""


def _package(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "")).split(".")[0]


def trialign_call_site(frame: FrameType | None) -> str | None:
    """'file:line' of the trialign frame that called the warning library directly, else None."""
    while frame is not None and _package(frame) in ("logging", "functools"):  # a logged notice: from its caller
        frame = frame.f_back
    if frame is None:
        return None
    library = _package(frame)
    while frame is not None:
        if Path(frame.f_code.co_filename).resolve().is_relative_to(PACKAGE):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        package = _package(frame)
        if package not in PASS_THROUGH and package != library:
            return None
        frame = frame.f_back
    return None


_original_warn = warnings.warn


def _warn(message, category=None, stacklevel=1, source=None, **kwargs):
    kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if isinstance(kind, type) and issubclass(kind, DEPRECATIONS):
        site = trialign_call_site(sys._getframe(1))
        if site is not None:
            raise OwnDeprecation(f"{kind.__name__} at a trialign call site {site}: {message}")
    return _original_warn(message, category, stacklevel + 1, source, **kwargs)


class _LoggedDeprecations(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "deprecated" not in record.getMessage():
            return
        site = trialign_call_site(sys._getframe(1))
        if site is not None:
            raise OwnDeprecation(f"deprecation logged at a trialign call site {site}: {record.getMessage()}")

    def handleError(self, record):  # logging swallows handler errors by default; this one must reach the test
        raise


def install() -> None:
    warnings.warn = _warn
    logging.getLogger("transformers").addHandler(_LoggedDeprecations())
