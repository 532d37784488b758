"""The case loop: run one function over many discovered cases, isolate failures, write a run report.

Generic orchestration over :func:`medldm.io.discover.scan_folder` cases, used by the CLI commands
(``medldm.cli.common`` re-exports it; the output and resume rules are :mod:`medldm.io.outputs`) and by the library's multi-case runs (``medldm.eval.run``,
``medldm.eval.audit``):

* :func:`run_cases`: a progress bar, one line per failed case (``input file: what is wrong — what to do``)
  logged (``FAILED <line>``, level WARNING) and kept in the run report, the other cases still processed,
  resume (``is_done``), and the exit status contract: 0 = all done, 1 = some cases failed.
* Write errors (full disk, no permission, read-only file system) become one line naming the input file;
  the traceback goes only to the run report.
* :func:`write_report`: the JSON run report, written atomically and merged with an earlier report of a
  resumed run.

Messages go to the ``medldm.io.caseloop`` logger; ``medldm``'s CLI prints them on stderr.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medldm.io.atomic import TMP_TAG, atomic_file
from medldm.io.errors import CaseError, escape_path

log = logging.getLogger(__name__)


@dataclass
class CaseResult:
    case: str
    status: str  # "done" | "skipped" (already done: resume) | "failed"
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    finished: float = 0.0  # Unix time the case ended (a concurrent run's report merge keeps what it did)


def case_inputs(case) -> list[str]:
    """The input file(s) of a case, as given (a DICOM series: its folder when it holds only that series)."""
    paths = getattr(case, "paths", None)
    if paths:
        return [str(p) for p in paths]
    return [str(case)]


def case_source(case) -> str:
    """What error and warning lines name: the case's input file or series folder (its ``source``; else its one
    file, or the folder of its files; a plain path as given)."""
    if isinstance(case, (str, Path)):
        return str(case)
    src = getattr(case, "source", "") or ""
    if src:
        return str(src)
    paths = list(getattr(case, "paths", None) or [])
    if len(paths) == 1:
        return str(paths[0])
    if paths:
        return str(Path(paths[0]).parent)
    return str(getattr(case, "id", case))


WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the output disk", "free space there, or choose an OUT on another disk"),
    errno.EDQUOT: ("disk quota exceeded on the output disk", "free space there, or choose another OUT"),
    errno.EROFS: ("the output is on a read-only file system", "choose a writable OUT"),
    errno.EACCES: ("permission denied", "choose a writable OUT, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a writable OUT, or fix its permissions"),
}


def write_error(exc: BaseException) -> OSError | None:
    """The OSError (full disk, permission, read-only) behind ``exc``, following causes and contexts."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _exists_error(exc: BaseException) -> FileExistsError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, FileExistsError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def failure_line(case, exc: BaseException) -> tuple[str, dict]:
    """One line for an unexpected exception of a case, and the extra (traceback) for the run report (control
    characters of paths escaped: one line)."""
    src = escape_path(case_source(case))
    tb = {"traceback": traceback.format_exc()}
    ose = write_error(exc)
    if ose is not None:
        what, hint = WRITE_ERRORS[ose.errno]
        fname = escape_path(str(getattr(ose, "filename", None) or ""))
        where = f" {fname}" if fname and TMP_TAG not in fname else ""
        return f"{src}: cannot write the output{where}: {what} — {hint}", tb
    fee = _exists_error(exc)
    if fee is not None:
        hint = ("move it away, or choose another OUT" if "did not write" in str(fee.strerror) or "not a folder"
                in str(fee.strerror) or "is a folder" in str(fee.strerror) else "use --overwrite, or another OUT")
        return f"{src}: output {escape_path(str(fee.filename))} {fee.strerror} — {hint}", tb
    return (f"{src}: unexpected error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            " — please report this with the traceback in the run report", tb)


def run_cases(
    cases: Iterable,
    process: Callable[[object], object],
    *,
    name: Callable[[object], str] = str,
    is_done: Callable[[object], bool] | None = None,
    report_path: str | Path | None = None,
    desc: str = "cases",
    command: str = "",
    quiet: bool = False,
) -> tuple[int, list[CaseResult]]:
    """Run ``process(case)`` over ``cases``; isolate failures; write a JSON run report.

    ``process`` may return a list of output paths or a dict (``{"outputs": [...], ...}``) kept in the
    report. A case whose ``error`` attribute is set (found broken during discovery) fails without
    calling ``process``. ``is_done(case)`` true skips the case (resume); it may raise :class:`CaseError`
    (e.g. an output made with other options). Every case entry of the report records its ``inputs``.
    Each failed case is logged as ``FAILED <line>`` (WARNING); unless ``quiet``, a progress bar (2+ cases,
    on stderr) and a summary line (INFO). Returns ``(exit_status, results)``.
    """
    from tqdm import tqdm

    cases = list(cases)
    started = time.time()
    results: list[CaseResult] = []
    bar = tqdm(cases, desc=desc, unit="case", disable=quiet or len(cases) < 2, file=sys.stderr)
    for case in bar:
        cid = name(case)
        inputs = case_inputs(case)
        t0 = time.perf_counter()
        pre_error = getattr(case, "error", None)
        try:
            if pre_error:
                raise pre_error if isinstance(pre_error, CaseError) else CaseError(cid, str(pre_error))
            if is_done is not None and is_done(case):
                _finished(results, CaseResult(cid, "skipped", "already done (resume)", inputs=inputs))
                continue
            out = process(case)
            res = CaseResult(cid, "done", seconds=time.perf_counter() - t0, inputs=inputs)
            if isinstance(out, dict):
                res.outputs = [str(p) for p in out.pop("outputs", [])]
                res.extra = out
            elif out:
                res.outputs = [str(p) for p in out]
            _finished(results, res)
        except CaseError as e:
            _finished(results, CaseResult(cid, "failed", e.line(), seconds=time.perf_counter() - t0, inputs=inputs))
            log.warning("FAILED %s", e.line())
        except Exception as e:  # keep going: one broken case must not stop the others
            line, extra = failure_line(case, e)
            _finished(results, CaseResult(cid, "failed", line, seconds=time.perf_counter() - t0, extra=extra,
                                      inputs=inputs))
            log.warning("FAILED %s", line)
    n_failed = sum(r.status == "failed" for r in results)
    status = 1 if n_failed else 0
    if report_path is not None:
        try:
            write_report(report_path, results, command=command, status=status, started=started)
        except OSError as e:
            what = WRITE_ERRORS.get(e.errno, (e.strerror or str(e), ""))[0]
            log.error("medldm: cannot write the run report %s: %s — the outputs listed above are written; "
                      "free space or fix the permissions of OUT", report_path, what)
            report_path, status = None, 1
    if not quiet:
        n_done = sum(r.status == "done" for r in results)
        n_skip = sum(r.status == "skipped" for r in results)
        log.info("%s: %d done, %d skipped (already done), %d failed%s", desc, n_done, n_skip, n_failed,
                 f"; report: {report_path}" if report_path else "")
    return status, results


def _finished(results: list[CaseResult], res: CaseResult) -> None:
    res.finished = time.time()
    results.append(res)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder`` (flock on the folder itself: no lock file is left behind), so two runs
    writing one report merge in turn; a file system without locks runs unlocked."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_report(path: str | Path, results: list[CaseResult], *, command: str = "", status: int = 0,
                 started: float | None = None) -> None:
    """Write the run report atomically, merged with the report already there (a resumed run's, or a run
    writing into the same OUT at the same time). A case this run skipped (done earlier) or failed keeps the
    earlier run's ``done`` entry when that run finished it after this one ``started`` (two runs racing for
    one OUT: the loser's "exists" failures never hide the winner's outputs); this run's failure is kept in
    that entry's ``concurrent_failure``. Otherwise this run's entry replaces the earlier one.
    ``status`` and ``exit_status`` are this run's; ``counts`` describe the merged cases."""
    path = Path(path)
    with _locked(path.parent):
        previous = {}
        if path.exists():
            try:
                previous = {r["case"]: r for r in json.loads(path.read_text())["cases"]}
            except (ValueError, KeyError, TypeError):
                previous = {}
        merged = dict(previous)
        for r in results:
            old = previous.get(r.case)
            if old is not None and old.get("status") == "done" and r.status != "done":
                if r.status == "skipped":
                    continue  # keep the record of the run that did the work
                if started is not None and float(old.get("finished") or 0) >= started:
                    merged[r.case] = {**old, "concurrent_failure": r.message}
                    continue
            merged[r.case] = asdict(r)
        counts = {s: sum(r["status"] == s for r in merged.values()) for s in ("done", "skipped", "failed")}
        report = {
            "command": command,
            "status": "complete" if status == 0 else "partial",
            "exit_status": status,
            "counts": counts,
            "cases": list(merged.values()),
        }
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
