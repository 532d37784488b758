"""Errors that carry a one-line, user-facing reason for a failed case."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped (a newline in a file name becomes ``\\n``), so a message stays
    one line on the terminal and in logs."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


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
        msg = f"{self.path}: {self.reason}"
        return one_line(f"{msg} — {self.hint}" if self.hint else msg)


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""
