"""Find the cases under a folder: NIfTI files and DICOM series (any file name, no extension needed).

DICOM files are grouped by the folder holding them first, then by SeriesInstanceUID (a folder may
hold several series; copies of one series in several folders stay separate cases, so the output
mirrors the input). A series whose images do not form one volume (several orientations, e.g. a
localizer, or several image sizes) is split into one case per stack, as dcm2niix does; a stack with
missing slices (a gap) is split into one case per regular run of slices (``..._part-1``, ...), with
a warning naming the gap, so no slice is ever placed at a wrong position. Unreadable files become
cases with ``error`` set (or fail the series they belong to) so the other cases still run; files
that are not scans (non-image objects, hidden files, FIFOs, devices, ...) are listed in ``skipped``
with the reason. Only regular files are opened.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medldm.io.dicom import file_kind, n_frames, non_image_reason, read_header, slice_geometry
from medldm.io.dicom_frames import multi_frame, single_frame
from medldm.io.dicom_series import (
    ORIENT_SPLIT_TOL,
    _orient,
    _positions,
    describe_gap,
    regular_runs,
    split_stacks,
)
from medldm.io.errors import CaseError, UsageError
from medldm.io.formats import NIFTI_SUFFIXES, is_nifti


@dataclass
class Case:
    """One scan to process. ``id`` is relative to ``root``, stable and filesystem-safe."""

    id: str
    kind: str  # "nifti" | "dicom-series"
    paths: list[Path]
    root: Path
    error: CaseError | None = None
    source: str = ""  # what error lines and reports name (file or folder [+ series])
    series_uid: str = ""
    headers: list | None = field(default=None, repr=False, compare=False)
    #: what discovery found about this case (e.g. the series was split at a gap): human lines, and
    #: the same structured (``{"split": {...}}``); shown by ``medldm info`` and meant for run reports
    warnings: list[str] = field(default_factory=list)
    integrity: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.id


@dataclass
class Discovery:
    cases: list[Case]
    skipped: list[str]
    #: one line per decision that changed how the input maps to cases (a series split at a gap into
    #: parts, a series found in several folders), naming the input folder and the case ids
    notes: list[str] = field(default_factory=list)


#: medldm's own temporaries (``.medldm-tmp.*``, ``.medldm-old.*``, see medldm.io.atomic), resume records
#: (``*.medldm.json``, degrade's ``*.degradation.json``) and run reports (``medldm-<cmd>-report.json``,
#: ``<OUT>.medldm-<cmd>-report.json``): skipped without a line.
_OWN = re.compile(r"^\.medldm-(tmp|old)[.-]|\.medldm\.json$|\.degradation\.json$|(^|\.)medldm-[a-z]+-report(\.rank\d+)?\.json$")


def _strip_ext(name: str) -> str:
    low = name.lower()
    for suf in NIFTI_SUFFIXES[::-1] + (".dcm", ".dicom", ".ima"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _safe(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._/+-]+", "_", s).strip("_")
    return re.sub(r"(^|/)\.+", r"\1_", s) or "scan"


def _nifti_ext(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"


def _listed(dirpath: str, names: list[str], what: str, skipped: list[str]):
    """``(name, path)`` of ``names`` in ``dirpath``, sorted, without medldm's own files (silently) and hidden ones
    (a ``skipped`` line each); ``what``: "file" or "folder"."""
    for name in sorted(names):
        full = Path(dirpath) / name
        if _OWN.search(name):
            continue
        if name.startswith("."):
            skipped.append(f"{full}: skipped: hidden {what} (name starts with '.')")
            continue
        yield name, full


def _walk(root: Path, skipped: list[str]):
    """Regular files under ``root`` (links followed only to regular files); the rest goes to ``skipped``."""
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d, full in _listed(dirpath, dirnames, "folder", skipped):
            if full.is_symlink():
                skipped.append(f"{full}: skipped: link to a folder (links to folders are not followed)")
            else:
                keep.append(d)
        dirnames[:] = keep
        for _, full in _listed(dirpath, filenames, "file", skipped):
            try:
                kind = file_kind(full)
            except OSError as e:
                skipped.append(f"{full}: skipped: cannot be opened ({e.strerror or e}; a broken link?)")
                continue
            if kind is not None:
                skipped.append(f"{full}: skipped: not a regular file ({kind})")
                continue
            yield full


@dataclass
class _Unit:
    """Files that load as one case, before ids are given."""

    paths: list[Path]
    headers: list
    stack: int = 0  # index among the series' stacks / multi-frame objects
    part: int = 0  # 1-based part of a stack split at gaps (0: not split)
    error: CaseError | None = None
    warnings: list[str] = field(default_factory=list)
    integrity: dict = field(default_factory=dict)


def _belongs(ds, frames) -> bool:
    """Whether a damaged image header ``ds`` has the size and orientation of the stack ``frames``."""
    try:
        shape = (int(ds.Rows), int(ds.Columns))
        g = slice_geometry(ds)
    except (AttributeError, TypeError, ValueError):
        return False
    o, ref = (None if g.row_cos is None else np.concatenate([g.row_cos, g.col_cos])), _orient(frames[0])
    if shape != frames[0].shape or (o is None) != (ref is None):
        return False
    return o is None or float(np.max(np.abs(o - ref))) <= ORIENT_SPLIT_TOL


def _with_count(e: CaseError, n_more: int) -> CaseError:
    if n_more <= 0:
        return e
    return CaseError(e.path, f"{e.reason} (and {n_more} more damaged file{'s' * (n_more > 1)} in this series)", e.hint)


def _volume_groups(items: list[tuple[Path, object]]) -> list[list[tuple[Path, object]]]:
    """Multi-frame objects of one series grouped into the volumes of one scan: objects whose frames lie at the same
    positions with the same orientation and size (e.g. Siemens XA, one enhanced file per volume of an EPI run) form
    one 4D case, as the same data in classic files would; any other object stays alone."""
    groups: dict[tuple, list[tuple[Path, object]]] = {}
    for p, ds in sorted(items, key=lambda it: str(it[0])):
        try:
            fr = multi_frame(p, ds)
            n = fr[0].geom.normal
            key = (fr[0].shape, tuple(np.round(np.concatenate([fr[0].geom.row_cos, fr[0].geom.col_cos]), 4)),
                   tuple(sorted(round(float(f.geom.position @ n), 2) for f in fr)))
        except Exception:  # noqa: BLE001 - an unreadable object stays alone; loading it reports why
            key = ("alone", str(p))
        groups.setdefault(key, []).append((p, ds))
    return list(groups.values())


def _units_of_series(items: list[tuple[Path, object]], bad: list[tuple[Path, object, CaseError]],
                     where: str) -> list[_Unit]:
    """Split one series' files (of one folder) into loadable units: each multi-frame file alone, single
    frames by stack, each stack by regular runs of slices. ``bad``: damaged files of this series
    (``(path, header or None, error)``); the stack they belong to fails with their error (never
    loaded without them), so the user is told which file to fix."""
    def multi(ds) -> bool:
        return n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds

    bad = list(bad)
    units = [_Unit([p for p, _ in g], [ds for _, ds in g], stack=i)
             for i, g in enumerate(_volume_groups([(p, ds) for p, ds in items if multi(ds)]))]
    frames, by_frame = [], {}
    for p, ds in items:
        if multi(ds):
            continue
        try:
            f = single_frame(p, ds)
        except CaseError as e:
            bad.append((p, ds, e))
            continue
        except (AttributeError, TypeError, ValueError) as e:
            bad.append((p, ds, CaseError(p, f"damaged image header ({type(e).__name__}: {e})",
                                         "copy the file again from the source (or remove it)")))
            continue
        frames.append(f)
        by_frame[id(f)] = (p, ds)
    stacks = sorted(split_stacks(frames), key=lambda st: (-len(st), st[0].source))  # "_stack-1": the biggest
    stack_bad: dict[int, list] = defaultdict(list)
    for b in bad:
        k = next((i for i, st in enumerate(stacks) if b[1] is not None and _belongs(b[1], st)), 0 if stacks else -1)
        stack_bad[k].append(b)
    if -1 in stack_bad:  # damaged files only: one error unit
        bl = stack_bad[-1]
        units.append(_Unit([p for p, _, _ in bl], [ds for _, ds, _ in bl], stack=len(units),
                           error=_with_count(bl[0][2], len(bl) - 1)))
    first_stack = len(units)
    for k, st in enumerate(stacks):
        pairs = [by_frame[id(f)] for f in st]
        sk = first_stack + k
        if stack_bad.get(k):
            bl = stack_bad[k]
            units.append(_Unit([p for p, _ in pairs] + [p for p, _, _ in bl], [ds for _, ds in pairs] + [ds for _, ds, _ in bl],
                               stack=sk, error=_with_count(bl[0][2], len(bl) - 1)))
            continue
        try:
            runs = regular_runs(st, where=where)
        except CaseError as e:
            units.append(_Unit([p for p, _ in pairs], [ds for _, ds in pairs], stack=sk, error=e))
            continue
        if len(runs.runs) == 1:
            units.append(_Unit([p for p, _ in pairs], [ds for _, ds in pairs], stack=sk))
            continue
        gaps = "; ".join(describe_gap(g) for g in runs.gaps)
        n = len(runs.runs)
        for j, run in enumerate(runs.runs):
            rp = [by_frame[id(f)] for f in run]
            pos = _positions(run)
            lo, hi = float(pos.min()), float(pos.max())
            nk = len({round(float(x), 3) for x in pos})
            line = (f"missing slices: {gaps}; the series is split at the gap{'s' * (len(runs.gaps) > 1)} into {n} "
                    f"regular parts (never stacked across a gap), this is part {j + 1} of {n}: "
                    + (f"{nk} slices from {lo:.2f} to {hi:.2f} mm" if nk > 1 else f"1 slice at {lo:.2f} mm"))
            units.append(_Unit([p for p, _ in rp], [ds for _, ds in rp], stack=sk, part=j + 1, warnings=[line],
                               integrity={"split": {"part": j + 1, "parts": n, "slices": nk, "from_mm": round(lo, 4),
                                                    "to_mm": round(hi, 4), "gaps": runs.gaps}}))
    return units


def _check_root(root: Path) -> None:
    """UsageError for a missing ``root``, or one that is neither a regular file nor a folder."""
    if not root.exists():
        raise UsageError(f"{root}: no such file or folder" + (" (broken link)" if root.is_symlink() else ""))
    if not root.is_dir():
        try:
            kind = file_kind(root)
        except OSError as e:
            raise UsageError(f"{root}: cannot be opened ({e.strerror or e})") from None
        if kind is not None:
            raise UsageError(f"{root}: not a regular file or folder ({kind})")


def _sort_files(files, base: Path, cases: list[Case], skipped: list[str]):
    """NIfTI files become cases; DICOM image files are grouped by (folder, SeriesInstanceUID) into ``series``, those
    whose header cannot be read or used into ``bad``; other files are noted in ``skipped``."""
    series: dict[tuple[Path, str], list[tuple[Path, object]]] = defaultdict(list)
    bad: dict[tuple[Path, str], list[tuple[Path, object, CaseError]]] = defaultdict(list)
    for f in files:
        if is_nifti(f):
            cases.append(Case(_safe(_strip_ext(f.relative_to(base).as_posix())), "nifti", [f], base, source=str(f)))
            continue
        try:
            ds = read_header(f)
        except CaseError as e:
            bad[(f.parent, "")].append((f, None, e))
            continue
        if ds is None:
            skipped.append(f"{f}: skipped: not a NIfTI or DICOM file")
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "") or f"nouid:{f}"
        try:
            reason = non_image_reason(ds)
        except CaseError as e:
            bad[(f.parent, uid)].append((f, ds, e))
            continue
        if reason:
            skipped.append(f"{f}: skipped: {reason}")
            continue
        series[(f.parent, uid)].append((f, ds))
    # damaged files of no known series: part of the series when their folder holds only one
    for (folder, uid), items in list(bad.items()):
        here = [k for k in series if k[0] == folder]
        if (uid == "" or uid.startswith("nouid:")) and len(here) == 1:
            bad[here[0]].extend(items)
            del bad[(folder, uid)]
    return series, bad


def _units_by_folder(series: dict, bad: dict) -> dict[Path, list[tuple[str, object, _Unit, int]]]:
    """The units (one per stack / part / multi-frame object) of every series, grouped by the folder holding them, as
    ``(uid, first header, unit, stacks in the series)``; a series whose files are all damaged is one failed unit.
    What stays in ``bad`` are damaged files without a series to join."""
    folders_of: dict[str, list[Path]] = defaultdict(list)
    for folder, uid in series:
        folders_of[uid].append(folder)
    by_folder: dict[Path, list[tuple[str, object, _Unit, int]]] = defaultdict(list)
    for (folder, uid), items in series.items():
        units = _units_of_series(items, bad.pop((folder, uid), []), str(folder))
        n_stacks = len({u.stack for u in units})
        if len(folders_of[uid]) > 1 and not uid.startswith("nouid:"):
            others = sorted(str(f) for f in folders_of[uid] if f != folder)
            for u in units:
                u.warnings.append(f"series {uid} also has files in {len(others)} other folder"
                                  f"{'s' * (len(others) > 1)} ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                                  "each folder is its own case")
        for u in units:
            by_folder[folder].append((uid, items[0][1], u, n_stacks))
    for (folder, uid), items in list(bad.items()):  # a series whose files are all damaged: one failed case
        if len(items) > 1 and uid and not uid.startswith("nouid:"):
            unit = _Unit([p for p, _, _ in items], [ds for _, ds, _ in items], stack=0,
                         error=_with_count(items[0][2], len(items) - 1))
            by_folder[folder].append((uid, items[0][1], unit, 1))
            del bad[(folder, uid)]
    return by_folder


def _unit_id(rel: str, top: str, uid: str, ds, u: _Unit, n_stacks: int, alone: bool) -> str:
    """The case id of a unit in folder ``rel`` (``top`` when the folder holds only this unit)."""
    if alone:
        return top
    if uid.startswith("nouid:"):  # a file without SeriesInstanceUID: named after itself
        return f"{rel}/{_strip_ext(u.paths[0].name)}" if rel else _strip_ext(u.paths[0].name)
    num = ds.get("SeriesNumber", None)
    tail = re.sub(r"[^0-9A-Za-z.]", "", uid.split(":")[-1])[-12:].strip(".")
    label = (f"series-{num}_{tail}" if num not in (None, "") else f"series_{tail}")
    if n_stacks > 1:  # the series was split (orientations, sizes, multi-frame objects)
        label += f"_stack-{u.stack + 1}"
    if u.part:  # the stack was split at missing slices
        label += f"_part-{u.part}"
    return f"{rel}/{label}" if rel else label


def _unique_ids(cases: list[Case]) -> None:
    """``id_2``, ``id_3`` ... for repeated ids (a NIfTI file and a DICOM folder could map to the same id)."""
    seen: dict[str, int] = {}
    for c in sorted(cases, key=lambda c: (c.id, str(c.paths[0]))):
        if c.id in seen:
            seen[c.id] += 1
            c.id = f"{c.id}_{seen[c.id]}"
        else:
            seen[c.id] = 1


def scan_folder(root: str | os.PathLike) -> Discovery:
    """Cases under ``root`` (a folder, or a single file). A missing path raises UsageError."""
    root = Path(root)
    _check_root(root)
    base = root.parent if root.is_file() else root
    cases: list[Case] = []
    skipped: list[str] = []
    files = [root] if root.is_file() else list(_walk(root, skipped))
    series, bad = _sort_files(files, base, cases, skipped)
    by_folder = _units_by_folder(series, bad)
    for items in bad.values():  # damaged files without a series to join: one case each
        for f, _, e in items:
            cases.append(Case(_safe(_strip_ext(f.relative_to(base).as_posix())), "dicom-series", [f], base,
                              error=e, source=str(f)))
    for folder, units in by_folder.items():
        rel = folder.relative_to(base).as_posix() if folder != base else ""
        top = rel or (root.name if root.is_dir() else _strip_ext(root.name))
        for uid, ds, u, n_stacks in units:
            paths = u.paths
            cid = _unit_id(rel, top, uid, ds, u, n_stacks, len(units) == 1)
            if len(paths) == 1:
                src = str(paths[0])
            else:
                src = str(folder) if len(units) == 1 else f"{folder} [{cid.rsplit('/', 1)[-1]}]"
            order = sorted(range(len(paths)), key=lambda i: paths[i])
            cases.append(Case(_safe(cid), "dicom-series", [paths[i] for i in order], base, error=u.error, source=src,
                              series_uid="" if uid.startswith("nouid:") else uid,
                              headers=[u.headers[i] for i in order], warnings=u.warnings, integrity=u.integrity))
    _unique_ids(cases)
    cases.sort(key=lambda c: c.id)
    return Discovery(cases, skipped, _notes(cases))


def _notes(cases: list[Case]) -> list[str]:
    """One line per series split at gaps, and per series found in several folders."""
    notes, parts = [], defaultdict(list)
    for c in cases:
        if "split" in c.integrity:
            parts[(str(c.paths[0].parent), c.series_uid, repr(c.integrity["split"]["gaps"]))].append(c)
    for (folder, _uid, _), cs in parts.items():
        cs.sort(key=lambda c: c.integrity["split"]["part"])
        gaps = "; ".join(describe_gap(g) for g in cs[0].integrity["split"]["gaps"])
        notes.append(f"{folder}: missing slices ({gaps}): the series is split into {len(cs)} regular parts, "
                     f"one case each: {', '.join(c.id for c in cs)}")
    multi = sorted({c.series_uid for c in cases if any("other folder" in w for w in c.warnings)})
    for uid in multi:
        folders = sorted({str(c.paths[0].parent) for c in cases if c.series_uid == uid})
        notes.append(f"series {uid} is found in {len(folders)} folders ({', '.join(folders[:3])}"
                     f"{', ...' if len(folders) > 3 else ''}): one case per folder")
    return notes


def output_path(case: Case, out_root: str | os.PathLike, fmt: str | None = None) -> Path:
    """Where a case's result goes under ``out_root``, mirroring the input layout.

    ``fmt`` None keeps the input kind: NIfTI -> ``OUT/<id>.nii[.gz]`` (same extension as the input),
    DICOM series -> folder ``OUT/<id>/``. ``fmt="nifti"`` -> ``OUT/<id>.nii.gz`` (NIfTI inputs keep
    their extension); ``fmt="dicom"`` -> folder ``OUT/<id>/``.
    """
    out_root = Path(out_root)
    if fmt not in (None, "nifti", "dicom"):
        raise UsageError(f"unknown output format {fmt!r} (nifti or dicom)")
    kind = fmt or ("nifti" if case.kind == "nifti" else "dicom")
    if kind == "dicom":
        return out_root / case.id
    ext = _nifti_ext(case.paths[0]) if case.kind == "nifti" else ".nii.gz"
    return out_root / f"{case.id}{ext}"
