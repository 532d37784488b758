"""Shared case loop for folder-in / folder-out commands.

Every command that processes many cases uses :func:`run_cases`: a progress bar, one line per failed
case (``file: what is wrong — what to do``) on stderr and in the run report, the other cases still
processed, resume (cases whose outputs exist are skipped), and the exit status contract:
0 = all done, 1 = some cases failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medldm.io.atomic import atomic_file
from medldm.io.errors import CaseError, UsageError


@dataclass
class CaseResult:
    case: str
    status: str  # "done" | "skipped" (already done: resume) | "failed"
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


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
    calling ``process``. Returns ``(exit_status, results)``.
    """
    from tqdm import tqdm

    cases = list(cases)
    results: list[CaseResult] = []
    bar = tqdm(cases, desc=desc, unit="case", disable=quiet or len(cases) < 2, file=sys.stderr)
    for case in bar:
        cid = name(case)
        t0 = time.perf_counter()
        pre_error = getattr(case, "error", None)
        try:
            if pre_error:
                raise pre_error if isinstance(pre_error, CaseError) else CaseError(cid, str(pre_error))
            if is_done is not None and is_done(case):
                results.append(CaseResult(cid, "skipped", "already done (resume)"))
                continue
            out = process(case)
            res = CaseResult(cid, "done", seconds=time.perf_counter() - t0)
            if isinstance(out, dict):
                res.outputs = [str(p) for p in out.pop("outputs", [])]
                res.extra = out
            elif out:
                res.outputs = [str(p) for p in out]
            results.append(res)
        except CaseError as e:
            results.append(CaseResult(cid, "failed", e.line(), seconds=time.perf_counter() - t0))
            tqdm.write(f"FAILED {e.line()}", file=sys.stderr)
        except Exception as e:  # keep going: one broken case must not stop the others
            line = f"{cid}: unexpected error {type(e).__name__}: {e} — please report this with the traceback in the run report"
            results.append(CaseResult(cid, "failed", line, seconds=time.perf_counter() - t0,
                                      extra={"traceback": traceback.format_exc()}))
            tqdm.write(f"FAILED {line}", file=sys.stderr)
    n_failed = sum(r.status == "failed" for r in results)
    status = 1 if n_failed else 0
    if report_path is not None:
        write_report(report_path, results, command=command, status=status)
    if not quiet:
        n_done = sum(r.status == "done" for r in results)
        n_skip = sum(r.status == "skipped" for r in results)
        print(f"{desc}: {n_done} done, {n_skip} skipped (already done), {n_failed} failed"
              + (f"; report: {report_path}" if report_path else ""), file=sys.stderr)
    return status, results


def write_report(path: str | Path, results: list[CaseResult], *, command: str = "", status: int = 0) -> None:
    """Write the run report atomically; merges with an earlier report of a resumed run."""
    path = Path(path)
    previous = {}
    if path.exists():
        try:
            previous = {r["case"]: r for r in json.loads(path.read_text())["cases"]}
        except (ValueError, KeyError):
            previous = {}
    merged = dict(previous)
    for r in results:
        if r.status == "skipped" and r.case in previous and previous[r.case]["status"] == "done":
            continue  # keep the record of the run that did the work
        merged[r.case] = asdict(r)
    report = {
        "command": command,
        "status": "complete" if status == 0 else "partial",
        "exit_status": status,
        "counts": {s: sum(r["status"] == s for r in merged.values()) for s in ("done", "skipped", "failed")},
        "cases": list(merged.values()),
    }
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))


def check_in_out(src: Path, out: Path) -> None:
    """Usage checks shared by the folder-in / folder-out commands: IN exists, OUT is neither IN nor inside it."""
    if not src.exists():
        raise UsageError(f"{src}: no such file or folder")
    if out.resolve() == src.resolve():
        raise UsageError("OUT must differ from IN: inputs are never overwritten")
    if src.is_dir() and src.resolve() in out.resolve().parents:
        raise UsageError("OUT must not lie inside the input folder IN (it would be read as input next time)")


def find_inputs(src: Path):
    """``scan_folder(src)``, or a usage error when it holds no NIfTI file or DICOM image series."""
    from medldm.io.discover import scan_folder

    found = scan_folder(src)
    if not found.cases:
        raise UsageError(f"{src}: no NIfTI file or DICOM image series found"
                         + (f" ({found.skipped[0]})" if found.skipped else ""))
    return found


def single_case(src: Path, out: Path, cases: list) -> bool:
    """One scan in, one scan out (OUT names the output itself, not a folder of outputs): IN is a file, or
    holds one case and OUT is a NIfTI name, or IN is the folder of a single DICOM series."""
    from medldm.io.formats import is_nifti

    if src.is_file() or (len(cases) == 1 and is_nifti(out)):
        return True
    if len(cases) != 1:
        return False
    c = cases[0]
    return c.kind == "dicom-series" and Path(os.path.commonpath([str(p.parent) for p in c.paths])) == src
