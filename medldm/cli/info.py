"""``medldm info PATH... [--json] [--volume K]``: describe every scan found under the given paths
(NIfTI files, DICOM series): kind, modality, shape, spacing, RAS affine, original dtype,
intensity range and percentiles, integrity warnings (including how discovery split a series at
missing slices). ``--json`` output is strict JSON: values that are not finite numbers are ``null``.
Exit status: 0 all described, 1 some case failed, 2 usage error or nothing found."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from medldm.cli.common import run_cases
from medldm.cli.remote import is_remote, resolve_remote_input
from medldm.io.discover import scan_folder
from medldm.io.errors import CaseError, UsageError
from medldm.io.reader import read_case  # numpy only: `medldm info` never imports torch or MONAI
from medldm.io.volumes import describe_volumes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="NIfTI file, DICOM file, or folder (searched recursively)")
    parser.add_argument("--json", action="store_true", help="print a JSON list (one entry per scan) on stdout")
    parser.add_argument("--query", metavar="QIDO",
                        help="with PATH http(s)://…/dicom-web: a QIDO-RS search, e.g. 'Modality=MR&StudyDate=20240101-' "
                             "(docs/pacs.md)")
    parser.add_argument("--volume", type=int, default=None, metavar="K",
                        help="for 4D inputs (NIfTI, DICOM with echoes/time points): the volume to describe (0-based)")


def describe(img, case=None) -> dict:
    """Summary of a loaded scan as a JSON-ready dict. ``img``: ``(data, affine, meta)`` as
    :func:`medldm.io.reader.read_case` returns it (numpy; no torch), or a MetaTensor ``(X, Y, Z)``."""
    from nibabel.orientations import aff2axcodes

    if isinstance(img, tuple):
        arr, aff, meta = img
    else:
        arr, aff, meta = img.detach().cpu().numpy(), img.affine, img.meta
    arr = np.asarray(arr)
    aff = np.asarray(aff, dtype=np.float64)
    warnings = [*(case.warnings if case is not None else []), *meta.get("warnings", [])]
    integrity = {**meta.get("integrity", {}), **(case.integrity if case is not None else {})}
    finite = arr[np.isfinite(arr)]
    p1, p99 = (np.percentile(finite, [1, 99]) if finite.size else (float("nan"), float("nan")))
    entry = {
        "path": case.source if case is not None else str(meta.get("filename_or_obj", "")),
        "id": case.id if case is not None else "",
        "kind": meta.get("kind"),
        "modality": meta.get("modality"),
        "shape": [int(s) for s in arr.shape],
        "original_ndim": int(meta.get("original_ndim", 3)),
        "spacing": [round(float(s), 6) for s in meta.get("spacing", ())],
        "axes": "".join(aff2axcodes(aff)),
        "affine": [[round(float(v), 6) for v in row] for row in aff],
        "dtype": meta.get("original_dtype"),
        "range": {"min": float(finite.min()) if finite.size else None,
                  "max": float(finite.max()) if finite.size else None,
                  "p1": float(p1), "p99": float(p99)},
        "n_files": len(meta.get("source_files", [])),
        "series_uid": meta.get("series_uid", ""),
        "series_description": meta.get("series_description", ""),
        "warnings": list(dict.fromkeys(warnings)),
        "integrity": integrity,
    }
    return _jsonable(entry)


def _jsonable(obj):
    """Plain JSON values: numpy scalars unwrapped, NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_text(e: dict) -> str:
    """Human-readable block for one entry."""
    g = lambda v: f"{v:.6g}" if isinstance(v, float) else "n/a" if v is None else str(v)  # noqa: E731
    r = e["range"]
    lines = [
        f"{e['id'] or e['path']}",
        f"  path      {e['path']}",
        f"  kind      {e['kind']} ({e['n_files']} file{'s' * (e['n_files'] != 1)}), modality {e['modality']}"
        + (f", '{e['series_description']}'" if e["series_description"] else ""),
        f"  shape     {' x '.join(map(str, e['shape']))}  ({e['original_ndim']}D)   spacing "
        f"{' x '.join(f'{s:.4g}' for s in e['spacing'])} mm   axes {e['axes']}",
        f"  dtype     {e['dtype']}   range [{g(r['min'])}, {g(r['max'])}]   p1/p99 [{g(r['p1'])}, {g(r['p99'])}]",
        "  affine    " + "\n            ".join("[" + " ".join(f"{v:10.4f}" for v in row) + "]"
                                            for row in e["affine"]),
    ]
    if e.get("volumes", 1) > 1:
        vals = e.get("values")
        shown = ", ".join(f"{v:g}" for v in vals[:8]) + (", ..." if len(vals) > 8 else "") if vals else ""
        lines.insert(4, f"  volumes   4D: {e['volumes']} volumes ({e.get('varies', 'unknown')}"
                        + (f": {shown}" if shown else "") + "); shape, range and affine of volume 0; every command "
                        "processes all volumes (--volume K: one)")
    if e.get("form"):
        lines.insert(3, f"  form      {e['form']} DICOM")
    split = e.get("integrity", {}).get("split")
    if split:
        where = (f"{split['slices']} slices, {split['from_mm']:.2f} to {split['to_mm']:.2f} mm" if split["slices"] > 1
                 else f"1 slice at {split['from_mm']:.2f} mm")
        lines.append(f"  part      {split['part']} of {split['parts']} of a series split at missing slices "
                     f"({where} along the slice normal)")
    lines += [f"  warning   {w}" for w in e["warnings"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cases, skipped, notes = [], [], []
    for p in args.paths:
        if is_remote(p):  # a DICOMweb study/series URL, or a QIDO search with --query: retrieved into the cache
            try:
                found = resolve_remote_input(p, args.query).found
            except CaseError as e:  # the server could not be searched: nothing to describe
                print(f"medldm info: error: {e.line()}", file=sys.stderr)
                return 1
        else:
            found = scan_folder(p)  # UsageError (exit 2) for a missing path
        cases.extend(found.cases)
        skipped.extend(found.skipped)
        notes.extend(found.notes)
    for line in skipped + notes:
        print(line, file=sys.stderr)
    if not cases:
        raise UsageError(f"no NIfTI file or DICOM image series found in {', '.join(args.paths)}"
                         + (f" ({len(skipped)} file(s) skipped, listed above)" if skipped else ""))

    entries: list[dict] = []

    def process(case):
        vols = describe_volumes(case) if args.volume is None else {}
        if vols.get("volumes", 1) > 1:  # a 4D case: described by its first volume, and what its volumes are
            entry = describe(read_case(case, volume=0), case)
            entry["warnings"] = [w for w in entry["warnings"] if not w.endswith("volume 0 selected")]
        else:
            entry = describe(read_case(case, volume=args.volume), case)
        entry.update(vols)
        entries.append(entry)
        if not args.json:
            print(format_text(entry), flush=True)
        return {"outputs": []}

    status, _ = run_cases(cases, process, name=lambda c: c.source or c.id, desc="info",
                          command="medldm info", quiet=args.json)
    if args.json:
        json.dump(entries, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    return status
