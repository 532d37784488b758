"""What the folder-in / folder-out commands share on the command line: argparse helpers and printing.

The rules live below the CLI, in one room with the case loop: output safety, "one scan in", output paths and
resume records in :mod:`medldm.io.outputs`, the case loop and run reports in :mod:`medldm.io.caseloop`
(docs/guarantees.md); both are re-exported here for the commands. What stays here: ``--device``
(:func:`resolve_device`), ``--deidentify`` (:func:`add_deidentify_argument`, :func:`deidentifier`) and
:func:`plan_outputs`, which reads ``--to`` / ``--quiet`` and prints what discovery skipped or split.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from medldm.io import outputs
from medldm.io.caseloop import (  # noqa: F401 (re-exported for the commands)
    WRITE_ERRORS,
    CaseResult,
    case_inputs,
    case_source,
    failure_line,
    run_cases,
    write_error,
    write_report,
)
from medldm.io.deidentify import Deidentifier
from medldm.io.errors import CaseError, UsageError
from medldm.io.outputs import (  # noqa: F401 (re-exported for the commands)
    RECORD_SUFFIX,
    Resume,
    case_signature,
    check_in_out,
    check_out_writable,
    check_single_out,
    file_signature,
    find_inputs,
    once_per_case,
    record_path,
    single_case,
    single_report_path,
    sweep_stale,
)
from medldm.shipped import open_model


def resolve_device(name: str, local_rank: int | None = None) -> str:
    """``--device`` of enhance / listen / synthesize: :func:`medldm.devices.select` ('auto' and 'cuda' = this
    process's GPU, ``cuda:{local_rank % device_count}``, made the current device; 'auto' without a GPU = the CPU).
    A CUDA device on a machine without one, or an ordinal that does not exist, is a usage error. ``local_rank``:
    default the launcher's ``LOCAL_RANK`` (0 without one)."""
    # lazy: keeps medldm --help free of torch
    from medldm.devices import DeviceError, select

    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    try:
        return str(select(name, local_rank))
    except DeviceError as e:
        raise UsageError(f"--device {name}: {e}") from None


def add_deidentify_argument(p) -> None:
    """``--deidentify`` for commands that write DICOM series."""
    p.add_argument("--deidentify", action="store_true",
                   help="DICOM output: apply the DICOM PS3.15 basic confidentiality profile to the written series "
                        "(identifiers and dates removed, UIDs replaced consistently within this run; see docs/io.md)")


def deidentifier(args):
    """One :class:`medldm.io.deidentify.Deidentifier` for the whole run (consistent new UIDs across its
    series), or False."""
    if not getattr(args, "deidentify", False):
        return False
    return Deidentifier()


def plan_outputs(found, out: Path, args, command: str, *, single: bool, fmt=None, report_name: str,
                 single_report: bool = True, single_record: Path | None = None) -> tuple[dict, Path | None]:
    """:func:`medldm.io.outputs.plan_outputs` with ``--to`` from ``args``; prints (unless ``--quiet``) what
    discovery skipped or split. Returns ``({case id: output path}, run report path or None)``."""
    targets, report, lines = outputs.plan_outputs(found, out, command, single=single, to=getattr(args, "to", None),
                                                  fmt=fmt, report_name=report_name, single_report=single_report,
                                                  single_record=single_record)
    if not args.quiet:
        for line in lines:
            print(line, file=sys.stderr)
    return targets, report


def open_model_or_exit(model: str, kind: str, device: str):
    """``medldm.shipped.open_model`` for a command: any fault of ``-m`` is a usage error (exit 2, one line)."""
    try:
        return open_model(model, kind, device=device)
    except CaseError as e:
        raise UsageError(e.line()) from None
