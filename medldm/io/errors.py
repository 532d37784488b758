"""Errors that carry a one-line, user-facing reason for a failed case."""

from __future__ import annotations


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
        return f"{msg} — {self.hint}" if self.hint else msg


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""
