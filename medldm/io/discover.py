"""Find the cases under a folder: NIfTI files and DICOM series (any file name, no extension needed).

DICOM files are grouped by SeriesInstanceUID (a folder may hold several series, a series may span
folders); a series whose images do not form one volume (several orientations, e.g. a localizer,
or several image sizes) is split into one case per stack, as dcm2niix does. Unreadable files
become cases with ``error`` set so the other cases still run; non-image objects are listed in
``skipped`` with the reason.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

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

    def __str__(self) -> str:
        return self.id


@dataclass
class Discovery:
    cases: list[Case]
    skipped: list[str]


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


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _units_of_series(items: list[tuple[Path, object]]) -> list[tuple[list[Path], list]]:
    """Split one series' files into loadable units: each multi-frame file alone, single frames by stack."""
    from medldm.io.dicom import n_frames
    from medldm.io.dicom_frames import single_frame
    from medldm.io.dicom_series import split_stacks

    units = [([p], [ds]) for p, ds in items if n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds]
    singles = [(p, ds) for p, ds in items if not (n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds)]
    if singles:
        frames = []
        for p, ds in singles:
            try:
                frames.append((single_frame(p, ds), p, ds))
            except (CaseError, AttributeError, TypeError, ValueError):  # keep it alone: loading says why
                units.append(([p], [ds]))
        by_frame = {id(f): (p, ds) for f, p, ds in frames}
        stacks = sorted(split_stacks([f for f, _, _ in frames]), key=lambda st: (-len(st), st[0].source))
        for st in stacks:  # the biggest stack first: "_stack-1" is the main one
            pairs = [by_frame[id(f)] for f in st]
            units.append(([p for p, _ in pairs], [ds for _, ds in pairs]))
    return units


def scan_folder(root: str | os.PathLike) -> Discovery:
    """Cases under ``root`` (a folder, or a single file). A missing path raises UsageError."""
    from medldm.io.dicom import non_image_reason, read_header

    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or folder")
    base = root.parent if root.is_file() else root
    files = [root] if root.is_file() else list(_walk(root))
    cases: list[Case] = []
    skipped: list[str] = []
    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for f in files:
        rel = f.relative_to(base).as_posix()
        if is_nifti(f):
            cases.append(Case(_safe(_strip_ext(rel)), "nifti", [f], base, source=str(f)))
            continue
        try:
            ds = read_header(f)
        except CaseError as e:
            cases.append(Case(_safe(_strip_ext(rel)), "dicom-series", [f], base, error=e, source=str(f)))
            continue
        if ds is None:
            skipped.append(f"{f}: skipped: not a NIfTI or DICOM file")
            continue
        try:
            reason = non_image_reason(ds)
        except CaseError as e:
            cases.append(Case(_safe(_strip_ext(rel)), "dicom-series", [f], base, error=e, source=str(f)))
            continue
        if reason:
            skipped.append(f"{f}: skipped: {reason}")
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "") or f"nouid:{f}"
        series[uid].append((f, ds))

    # units (one per stack / multi-frame object), grouped by the folder holding them
    by_folder: dict[Path, list[tuple[str, object, list[Path], list, int, int]]] = defaultdict(list)
    for uid, items in series.items():
        units = _units_of_series(items)
        folder = Path(os.path.commonpath([str(p.parent) for p, _ in items]))
        for k, (paths, headers) in enumerate(units):
            by_folder[folder].append((uid, headers[0], paths, headers, k, len(units)))
    for folder, units in by_folder.items():
        rel = folder.relative_to(base).as_posix() if folder != base else ""
        top = rel or (root.name if root.is_dir() else _strip_ext(root.name))
        for uid, ds, paths, headers, k, n_units in units:
            if len(units) == 1:
                cid = top
            elif uid.startswith("nouid:"):  # a file without SeriesInstanceUID: named after itself
                cid = f"{rel}/{_strip_ext(paths[0].name)}" if rel else _strip_ext(paths[0].name)
            else:
                num = ds.get("SeriesNumber", None)
                tail = re.sub(r"[^0-9A-Za-z.]", "", uid.split(":")[-1])[-12:].strip(".")
                label = (f"series-{num}_{tail}" if num not in (None, "") else f"series_{tail}")
                if n_units > 1:  # the series was split (orientations, sizes, multi-frame objects)
                    label += f"_stack-{k + 1}"
                cid = f"{rel}/{label}" if rel else label
            if len(paths) == 1:
                src = str(paths[0])
            else:
                src = str(folder) if len(units) == 1 else f"{folder} [{cid.rsplit('/', 1)[-1]}]"
            cases.append(Case(_safe(cid), "dicom-series", sorted(paths), base, source=src,
                              series_uid="" if uid.startswith("nouid:") else uid,
                              headers=[h for _, h in sorted(zip(paths, headers, strict=True), key=lambda t: t[0])]))
    # unique ids (a NIfTI file and a DICOM folder could map to the same id)
    seen: dict[str, int] = {}
    for c in sorted(cases, key=lambda c: (c.id, str(c.paths[0]))):
        if c.id in seen:
            seen[c.id] += 1
            c.id = f"{c.id}_{seen[c.id]}"
        else:
            seen[c.id] = 1
    cases.sort(key=lambda c: c.id)
    return Discovery(cases, skipped)


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
