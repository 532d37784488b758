"""Warnings on the terminal: one line each, naming what they concern; never raw multi-line library text.

* :func:`print_case_warnings` prints what the loader found about a case (``img.meta["warnings"]``: volume
  selection ignored, gaps, odd headers ...) as ``WARNING <input file>: <text>``.
* :func:`route_warnings` (used by ``medldm.cli.main``) captures Python warnings raised while a command runs:
  warnings that concern library internals, not the user's data or results (deprecations, known harmless
  messages), are dropped; every other warning becomes one ``WARNING: <text> [<origin>]`` line, printed once.
  ``medldm --verbose COMMAND`` or any ``-W`` / ``PYTHONWARNINGS`` setting keeps Python's own display.
* :func:`route_logging` (used by ``medldm.cli.main``) prints the messages of medldm's loggers
  (``logging.getLogger(__name__)`` in the library) on stderr, plain (the message only), from INFO up;
  a command's ``--quiet`` raises the threshold to WARNING, ``medldm --verbose`` lowers it to DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from medldm.io.caseloop import case_source

# messages of library warnings that say nothing about the user's data or results (regular expressions,
# matched at the start of the message, as ``warnings.filterwarnings`` does)
HARMLESS = (
    r"The given NumPy array is not writable",  # torch.from_numpy on a read-only view; medldm copies first
    r"TypedStorage is deprecated",
    r"User provided device_type of 'cuda', but CUDA is not available",  # autocast set up on a CPU machine
    r"torch\.meshgrid: in an upcoming release",
    r"Attempting to run cuBLAS, but there was no current CUDA context",
    r"enable_nested_tensor is True",
    r".*flash attention",  # torch notes which attention kernel it could not use
    r"Using a non-full backward hook",
    r"TensorFloat32 tensor cores",
)
# warning categories that concern library APIs, not data (medldm's developers see them in the tests)
HARMLESS_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning, ResourceWarning)

_MAX_CHARS = 400
_printed: set[tuple[str, str]] = set()


def one_line(text: object, limit: int | None = _MAX_CHARS) -> str:
    """Whitespace (newlines included) collapsed to single spaces, cut to ``limit`` characters (None: no cut)."""
    s = " ".join(str(text).split())
    return s if limit is None or len(s) <= limit else s[: limit - 3] + "..."


def _emit(line: str) -> None:
    """A line on stderr that does not break a running tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(line, file=sys.stderr)


def print_case_warnings(case: object, found: object) -> list[str]:
    """Print the warnings of one loaded case as ``WARNING <input file>: <text>`` on stderr; return the lines.

    ``case``: the input path, or a discovered case (its ``source``, else its file / series folder).
    ``found``: the loaded image (its ``meta["warnings"]``), a meta mapping, or a list of warning texts.
    A warning already printed for that input in this run is not printed again.
    """
    meta = getattr(found, "meta", found)
    items = meta.get("warnings", []) if isinstance(meta, Mapping) else list(found or [])  # type: ignore[arg-type]
    source = case_source(case)
    lines = []
    for w in items:
        text = one_line(w)
        if not text or (source, text) in _printed:
            continue
        _printed.add((source, text))
        line = f"WARNING {source}: {text}"
        _emit(line)
        lines.append(line)
    return lines


def _origin(filename: str) -> str:
    """The package a warning was raised in (``nibabel``, ``torch`` ...) from its file name."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            if i + 1 < len(parts):
                return re.sub(r"\.py$", "", parts[i + 1])
    if "medldm" in parts:
        return "medldm"
    return Path(filename).stem


def _show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - showwarning API
    text = one_line(message)
    key = (category.__name__, text)
    if key in _printed_library:
        return
    _printed_library.add(key)
    origin = _origin(str(filename))
    _emit(f"WARNING: {text}" if origin == "medldm" else f"WARNING: {text} [{origin}]")


_printed_library: set[tuple[str, str]] = set()


@contextlib.contextmanager
def route_warnings(verbose: bool = False) -> Iterator[None]:
    """While the block runs, Python warnings become one deduplicated ``WARNING:`` line each (harmless ones
    dropped). With ``verbose`` or any ``-W`` / ``PYTHONWARNINGS`` option nothing changes."""
    _printed.clear()
    _printed_library.clear()
    if verbose or sys.warnoptions:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # shown (once per text: see _show) unless filtered below
        for cat in HARMLESS_CATEGORIES:
            warnings.filterwarnings("ignore", category=cat)
        for msg in HARMLESS:
            warnings.filterwarnings("ignore", message=msg)
        warnings.showwarning = _show
        yield


class _TerminalHandler(logging.Handler):
    """A log record as one plain line on the current ``sys.stderr`` (looked up at each record, so a
    redirected stderr is honoured), written so that a running tqdm progress bar stays intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _emit(self.format(record))
        except Exception:  # pragma: no cover - logging's own policy for failing handlers
            self.handleError(record)


@contextlib.contextmanager
def route_logging(level: int = logging.INFO) -> Iterator[None]:
    """While the block runs, records of the ``medldm`` loggers at ``level`` or above are printed on stderr
    as their plain message (no level or logger name), and not passed on to the root logger's handlers."""
    logger = logging.getLogger("medldm")
    handler = _TerminalHandler(level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
