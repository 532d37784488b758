"""Shared case loop and output safety for the folder-in / folder-out commands.

Every command that processes many cases uses :func:`run_cases` (from :mod:`medldm.io.caseloop`, re-exported
here): a progress bar, one line per failed case (``input file: what is wrong — what to do``) on stderr and in
the run report, the other cases still processed, resume, and the exit status contract: 0 = all done,
1 = some cases failed, 2 = usage error.

Output safety (docs/guarantees.md):

* :func:`check_in_out` / :func:`check_out_writable` / :func:`check_single_out` refuse, before any work,
  an OUT that is IN, lies inside IN, contains IN, sits in the series folder of a DICOM input, is an existing
  folder of other files (one scan out), or cannot be written (read-only, no permission).
* Each output gets a record ``<output name>.medldm.json`` (degrade: ``<name>.degradation.json``) with the
  inputs (path, size, mtime_ns) and the options that change the result, written last. :class:`Resume`
  skips a case only when its record matches; a mismatch or an output without record fails the case with
  one line (``--overwrite``, or another OUT), and ``--overwrite`` replaces only that output.
* Write errors (full disk, no permission, read-only file system) become one line naming the input file;
  the traceback goes only to the run report.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from medldm.io.atomic import atomic_file, clean_stale, medldm_written
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
from medldm.io.errors import CaseError, UsageError

RECORD_SUFFIX = ".medldm.json"


def single_report_path(out: Path, command: str) -> Path:
    """Run report of a one-scan run: beside OUT, named after it (``<OUT name>.medldm-<command>-report.json``)."""
    out = Path(os.path.abspath(out))
    return out.with_name(f"{out.name}.medldm-{command}-report.json")


# ------------------------------------------------------------------------------------------ usage checks
def _is_dicom_file(p: Path) -> bool:
    from medldm.io.formats import is_nifti

    return p.is_file() and not is_nifti(p)


def check_in_out(src: Path, out: Path) -> None:
    """Usage checks shared by all commands: IN exists; OUT is not IN, not inside IN, does not contain IN,
    and (a DICOM file input) is not in or under the folder of its series."""
    if not src.exists():
        raise UsageError(f"{src}: no such file or folder")
    s, o = src.resolve(), Path(os.path.abspath(out)).resolve()
    if o == s:
        raise UsageError("OUT must differ from IN: inputs are never overwritten")
    if src.is_dir() and s in o.parents:
        raise UsageError("OUT must not lie inside the input folder IN (it would be read as input next time)")
    if o in s.parents:
        raise UsageError(f"OUT {out} contains IN {src}: choose an OUT outside the input "
                         "(outputs never replace or mix with inputs)")
    if _is_dicom_file(src) and (o == s.parent or s.parent in o.parents):
        raise UsageError(f"OUT {out} lies in the folder of the input DICOM series {src.parent}: choose an OUT "
                         "outside it (it would be read as part of the series next time)")


def check_out_writable(out: Path) -> None:
    """Usage error (exit 2) when OUT, or the nearest existing folder above it, cannot be written:
    a read-only file system, no write permission, or a regular file on the way."""
    out = Path(os.path.abspath(out))
    base = out if out.is_dir() else out.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"OUT {out}: {base} is a file, not a folder — choose another OUT")
    try:
        readonly = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        readonly = False
    if readonly:
        raise UsageError(f"OUT {out}: {base} is on a read-only file system — choose a writable OUT")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"OUT {out}: no permission to write in {base} — choose a writable OUT, "
                         "or fix its permissions")


def check_single_out(out: Path, record: Path | None = None) -> None:
    """One scan out: OUT names the output itself. An existing regular file where a DICOM folder should go,
    a folder where a NIfTI file should go, or an existing folder holding files medldm did not write, is a
    usage error: it is never replaced, not even with --overwrite."""
    from medldm.io.formats import is_nifti

    if is_nifti(out):
        if out.is_dir():
            raise UsageError(f"OUT {out} is a folder, not a NIfTI file name — choose another OUT")
        return
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise UsageError(f"OUT {out} exists and is not a folder: a DICOM series is written as a new folder — "
                         "choose another OUT")
    if out.is_dir() and any(True for _ in os.scandir(out)):
        rec = record if record is not None else record_path(out)
        if not (rec.is_file() or medldm_written(out)):
            raise UsageError(f"OUT {out} is an existing folder holding files medldm did not write: it is never "
                             f"replaced; give a new folder name for the DICOM series (e.g. {out / 'series'})")


def sweep_stale(out: Path, targets: Iterable[Path] = ()) -> None:
    """Remove temporaries of killed medldm runs (``.medldm-tmp.*`` of dead processes of this host) from OUT,
    the folder holding OUT and the folder of every target output; nothing else is touched."""
    out = Path(os.path.abspath(out))
    folders = {out, out.parent, *(Path(os.path.abspath(t)).parent for t in targets)}
    for folder in sorted(folders):
        if folder.is_dir():
            clean_stale(folder)


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


# ------------------------------------------------------------------------------------- resume records
def record_path(out: Path) -> Path:
    """``OUT/x.nii.gz`` -> ``OUT/x.nii.gz.medldm.json``; DICOM folder ``OUT/x`` -> ``OUT/x.medldm.json``."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + RECORD_SUFFIX)


def file_signature(paths: Iterable, root: Path | None = None) -> list[dict]:
    """Path, size and mtime_ns of each input file (``rel``: relative to ``root``, what resume compares)."""
    sig = []
    for p in paths:
        p = Path(p)
        st = p.stat()
        try:
            rel = p.relative_to(root).as_posix() if root is not None else p.name
        except ValueError:
            rel = p.name
        sig.append({"path": str(p.resolve()), "rel": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return sig


def case_signature(case) -> list[dict]:
    return file_signature(case.paths, getattr(case, "root", None))


def _sig_key(sig: list[dict]) -> list[tuple]:
    return sorted((d.get("rel"), d.get("size"), d.get("mtime_ns")) for d in sig or [])


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def _differences(rec: dict, key: dict) -> list[str]:
    diffs = []
    if rec.get("command") != key["command"]:
        diffs.append(f"command {rec.get('command')} ≠ {key['command']}")
    old, new = rec.get("options") or {}, key["options"]
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            diffs.append(f"{k} {_short(old.get(k))} ≠ {_short(new.get(k))}")
    if _sig_key(rec.get("inputs")) != _sig_key(key["inputs"]):
        diffs.append("the input files changed (names, sizes or modification times)")
    return diffs


class Resume:
    """Resume and overwrite rules of one output (``out`` with record ``record``).

    ``key = {"command": ..., "options": {...}, "inputs": case_signature(case)}``: what made the output.
    :meth:`state`: "new" (no output), "done" (the record matches and every output exists), "other" (the
    record differs), "unrecorded" (an output exists without a record: another program, an older medldm,
    a run killed before its record). :meth:`check` decides: skip (True), write (False), or CaseError.
    """

    def __init__(self, out: Path, key: dict, *, record: Path | None = None, extra: Iterable[Path] = (),
                 source: str = "", nest: bool = False):
        self.out, self.key, self.nest = Path(out), key, nest
        self.record = record if record is not None else record_path(self.out)
        self.extra = [Path(p) for p in extra]
        self.source = source or str(out)

    def _read(self) -> dict | None:
        try:
            rec = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def state(self) -> tuple[str, list[str]]:
        exists = os.path.lexists(self.out) and not (self.out.is_dir() and not any(os.scandir(self.out)))
        rec = self._read() if self.record.is_file() else None
        if rec is None:
            return ("unrecorded", []) if exists else ("new", [])
        fields = rec.get("resume") if self.nest else rec
        if not isinstance(fields, dict):
            diffs = ["recorded by an older medldm, without its inputs"]
        else:
            diffs = _differences(fields, self.key)
        if not exists:
            return "new", []
        if diffs:
            return "other", diffs
        missing = [p.name for p in self.extra if not p.exists()]
        if missing:
            return "other", [f"{', '.join(missing)} missing"]
        return "done", []

    def check(self, overwrite: bool) -> bool:
        """True: skip (done). False: write it. CaseError: refuse (a different or unrecorded output is there)."""
        st, diffs = self.state()
        if st in ("other", "unrecorded") and self.out.is_dir() and not self.owned(self.out):
            raise CaseError(self.source, f"{self.out} is a folder holding files medldm did not write: it is never "
                            "replaced", "move it away, or choose another OUT")
        if overwrite:
            return False
        if st == "done":
            return True
        if st == "other":
            raise CaseError(self.source, f"{self.out} was made with other inputs/options ({'; '.join(diffs)})",
                            "use --overwrite, or another OUT")
        if st == "unrecorded":
            raise CaseError(self.source, f"{self.out} exists but has no medldm record {self.record.name} "
                            "(another program, an older medldm, or an interrupted run)",
                            "use --overwrite to replace it, or another OUT")
        return False

    def owned(self, folder: Path) -> bool:
        """May --overwrite replace this existing DICOM folder? Only when medldm wrote it: the files its
        record lists, or only DICOM files with medldm's implementation UID."""
        rec = self._read() or {}
        listed = set(rec.get("files") or [])
        try:
            names = {e.name for e in os.scandir(folder)}
        except OSError:
            return False
        return (bool(listed) and names <= listed) or medldm_written(folder)

    def finish(self, outputs: Iterable[Path], extra_fields: dict | None = None) -> Path:
        """Write the record (last: its presence marks the case done), with ``extra_fields`` (``nest``: the
        resume key under ``"resume"``, the other fields at the top). Returns its path."""
        from medldm import __version__

        outputs = [Path(p) for p in outputs]
        files = sorted(e.name for e in os.scandir(self.out)) if self.out.is_dir() else []
        rec = dict(extra_fields or {})
        key = {"command": self.key["command"], "options": self.key["options"], "inputs": self.key["inputs"]}
        rec.update({"medldm": __version__, **({"resume": key} if self.nest else key),
                    "outputs": [str(p) for p in outputs], "files": files})
        with atomic_file(self.record) as tmp:
            tmp.write_text(json.dumps(rec, indent=2, default=str))
        return self.record


def resolve_device(name: str, local_rank: int | None = None) -> str:
    """``--device`` of enhance / listen / synthesize, the one place it is mapped: 'auto' and 'cuda' = this process's
    GPU, ``cuda:{local_rank % device_count}`` (under ``torchrun`` each rank its own GPU; a launcher that shows each
    process one GPU makes that ``cuda:0``), made the current device; 'auto' without a GPU = the CPU. A CUDA device
    on a machine without one, or an ordinal that does not exist, is a usage error. ``local_rank``: default the
    launcher's ``LOCAL_RANK`` (0 without one)."""
    import torch

    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if name != "auto" and not name.startswith("cuda"):
        raise UsageError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here; use --device cpu")
    n = torch.cuda.device_count()
    if name in ("auto", "cuda"):
        idx = local_rank % n
    else:
        try:
            idx = int(name.split(":", 1)[1])
        except (IndexError, ValueError):
            raise UsageError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
        if not 0 <= idx < n:
            raise UsageError(f"--device {name}: this process sees {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    torch.cuda.set_device(idx)
    return f"cuda:{idx}"


def once_per_case(make):
    """``make(case)`` built once per case (by ``case.id``): ``is_done`` and ``process`` share one :class:`Resume`,
    so its key (the inputs' stat) is computed once."""
    made: dict = {}

    def get(case):
        if case.id not in made:
            made[case.id] = make(case)
        return made[case.id]

    return get


def check_folder_out(found, out: Path, *, quiet: bool = False) -> None:
    """Folder mode (IN holds several cases): OUT must be a folder; print what discovery skipped or split."""
    from medldm.io.formats import is_nifti

    notes = list(getattr(found, "notes", []) or [])
    if is_nifti(out):
        ids = ", ".join(c.id for c in found.cases[:4]) + (", ..." if len(found.cases) > 4 else "")
        raise UsageError(f"IN holds {len(found.cases)} cases ({ids}): OUT must be a folder, not a NIfTI file name"
                         + (f"; {notes[0]}" if notes else ""))
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if not quiet:
        for line in [*found.skipped, *notes]:
            print(line, file=sys.stderr)


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
    from medldm.io.deidentify import Deidentifier

    return Deidentifier()


def plan_outputs(found, out: Path, args, command: str, *, single: bool, fmt=None, report_name: str,
                 single_report: bool = True, single_record: Path | None = None) -> tuple[dict, Path | None]:
    """Where each case's output goes: ``({case id: output path}, run report path or None)``.

    ``single``: one scan in, OUT names the output itself (``--to`` must agree with OUT's kind; OUT must not be a
    folder of user files); its run report goes beside OUT when ``single_report``. Otherwise OUT is a folder
    mirroring IN (``fmt(case)`` or ``fmt``: the output kind, see :func:`medldm.io.discover.output_path`) with
    ``OUT/<report_name>``. Stale temporaries of killed runs are swept from OUT and the targets' folders."""
    from medldm.io.discover import output_path
    from medldm.io.formats import is_nifti

    if single:
        to = getattr(args, "to", None)
        if to and (to == "nifti") != is_nifti(out):
            raise UsageError(f"--to {to} contradicts OUT {out}")
        check_single_out(out, single_record)
        targets = {found.cases[0].id: out}
        report = single_report_path(out, command) if single_report else None
    else:
        check_folder_out(found, out, quiet=args.quiet)
        targets = {c.id: output_path(c, out, fmt(c) if callable(fmt) else fmt) for c in found.cases}
        report = out / report_name
    sweep_stale(out, targets.values())
    return targets, report


def open_model_or_exit(model: str, kind: str, device: str):
    """``medldm.shipped.open_model`` for a command: any fault of ``-m`` is a usage error (exit 2, one line)."""
    from medldm.shipped import open_model

    try:
        return open_model(model, kind, device=device)
    except CaseError as e:
        raise UsageError(e.line()) from None
