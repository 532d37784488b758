"""Errors that carry a one-line, user-facing reason for a failed case."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BREAK = re.compile(r"\s*[\r\n\t\v\f]+\s*")


def escape_path(path: str) -> str:
    """``path`` with control characters escaped (a newline in a file name becomes ``\\n``): the file stays
    named exactly, on one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(path))


def one_line(text: str) -> str:
    """``text`` on one line: line breaks and tabs become one space, other control characters are escaped."""
    return escape_path(_BREAK.sub(" ", text))


class CaseError(Exception):
    """A case (file or series) cannot be processed.

    ``str(err)`` is one line: ``<path>: <what is wrong> — <what to do>``.
    """

    def __init__(self, path: object, reason: str, hint: str = ""):
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        msg = f"{escape_path(self.path)}: {one_line(self.reason)}"
        return f"{msg} — {one_line(self.hint)}" if self.hint else msg


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""
