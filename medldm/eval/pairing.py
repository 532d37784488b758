"""Pair predictions with references (and masks) for evaluation.

Rules (docs/evaluation.md):

* folders are scanned with ``medldm.io.scan_folder``; cases pair by **case id** = the path relative
  to the folder without the extension (``sub-01/t1.nii.gz`` -> ``sub-01/t1``; a DICOM series ->
  its folder, plus a series label when a folder holds several). So a NIfTI prediction pairs with a
  DICOM reference of the same relative name, and outputs of ``medldm baseline``/``enhance``
  (which mirror the input layout) pair with their inputs' references;
* when both sides hold exactly one case (e.g. two files, or two single-series folders) they pair
  whatever their names;
* a manifest CSV (``--manifest``) lists pairs explicitly: columns ``case``, ``ref``, ``pred`` (or one
  ``pred:NAME`` column per method) and optionally ``mask``; relative paths are taken from the
  manifest's folder.

A reference without a prediction (or without a mask when masks are given) becomes a failing case;
predictions without a reference are listed as unpaired notes.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medldm.io.discover import Case, scan_folder
from medldm.io.errors import CaseError, UsageError
from medldm.io.reader import load_case, load_scan
from medldm.io.volumes import count_volumes

# our own run reports and resume records: not noted
_RUN_REPORT = re.compile(r"(^|/|\.)(medldm-[a-z]+-report|run_report)\.json$|\.medldm\.json$|\.degradation\.json$")


@dataclass
class Source:
    """Where one image of a case comes from: a discovered ``Case`` or a path (file/folder/list)."""

    label: str
    case: object | None = None
    path: str | None = None
    volume: int | None = None  # one volume of a 4D scan

    def load(self):
        """-> MetaTensor (X, Y, Z) via ``load_case`` / ``load_scan``."""
        if self.case is not None:
            return load_case(self.case, volume=self.volume)
        return load_scan(self.path, volume=self.volume)

    def count_volumes(self) -> int:
        if self.case is not None:
            return count_volumes(self.case)
        p = Path(self.path) if self.path else None
        if p is None or not p.is_file() or not str(p).lower().endswith((".nii", ".nii.gz")):
            return 1
        return count_volumes(Case(id=p.name, kind="nifti", paths=[p], root=p.parent))


def expand_volumes(pairing: Pairing) -> Pairing:
    """Each volume of a 4D reference is a case of its own (``id#volK``), its predictions and mask taken at the same
    volume (a 3D mask serves every volume), so 4D outputs are evaluated volume by volume."""
    cases = []
    for ec in pairing.cases:
        try:
            n = ec.ref.count_volumes() if ec.ref.case is not None or ec.ref.path else 1
        except CaseError:
            n = 1  # loading the case reports why
        if n <= 1:
            cases.append(ec)
            continue

        def at(src, k):
            return None if src is None else dataclasses.replace(src, volume=k, label=f"{src.label}#vol{k}")

        def mask_at(src, k):
            return None if src is None else (at(src, k) if src.count_volumes() > 1 else src)

        cases += [dataclasses.replace(ec, id=f"{ec.id}#vol{k}", ref=at(ec.ref, k),
                                      preds={m: at(s, k) for m, s in ec.preds.items()}, mask=mask_at(ec.mask, k))
                  for k in range(n)]
    return dataclasses.replace(pairing, cases=cases)


@dataclass
class EvalCase:
    """One reference with its predictions (method -> Source, None when missing) and optional mask."""

    id: str
    ref: Source
    preds: dict[str, Source | None]
    mask: Source | None = None
    want_mask: bool = False
    error: CaseError | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.id


@dataclass
class Pairing:
    cases: list[EvalCase]
    methods: list[str]
    notes: list[str]


def parse_pred_args(values: list[str]) -> list[tuple[str, Path]]:
    """``["DIR", "NAME=DIR", ...]`` -> ``[(name, path)]``; a bare DIR is named after its folder."""
    out: list[tuple[str, Path]] = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or os.path.exists(v):
            name, path = Path(v.rstrip("/")).name or "pred", v
            for suf in (".nii.gz", ".nii"):
                name = name[: -len(suf)] if name.endswith(suf) else name
        name = name.strip()
        if any(name == n for n, _ in out):
            raise UsageError(f"method name {name!r} given twice — name them with --pred NAME=DIR")
        out.append((name, Path(path)))
    return out


def _index(root: Path, what: str) -> tuple[dict[str, object], list[str]]:
    if not root.exists():
        raise UsageError(f"{what} {root}: no such file or folder")
    found = scan_folder(root)
    notes = [f"{what}: {s}" for s in found.skipped if not _RUN_REPORT.search(s.split(": skipped")[0])]
    return {c.id: c for c in found.cases}, notes


def _src(case) -> Source:
    return Source(label=getattr(case, "source", "") or str(case.paths[0]), case=case)


def pair_folders(ref: Path, preds: list[tuple[str, Path]], mask: Path | None = None) -> Pairing:
    """Pair the cases of ``ref`` with those of each prediction folder (and ``mask``) by case id."""
    refs, notes = _index(Path(ref), "reference")
    if not refs:
        raise UsageError(f"reference {ref}: no NIfTI file or DICOM series found")
    pred_idx = {}
    for name, p in preds:
        idx, n = _index(Path(p), f"prediction '{name}'")
        pred_idx[name] = idx
        notes += n
    mask_idx = None
    if mask is not None:
        mask_idx, n = _index(Path(mask), "mask")
        notes += n

    def lookup(idx: dict[str, object], cid: str) -> object | None:
        if cid in idx:
            return idx[cid]
        if len(refs) == 1 and len(idx) == 1:  # single case on both sides: pair by position
            return next(iter(idx.values()))
        return None

    cases = []
    for cid, rc in refs.items():
        ec = EvalCase(cid, _src(rc), {}, want_mask=mask is not None)
        if rc.error is not None:
            ec.error = rc.error
        for name, _ in preds:
            pc = lookup(pred_idx[name], cid)
            ec.preds[name] = _src(pc) if pc is not None else None
        if mask_idx is not None:
            mc = lookup(mask_idx, cid)
            ec.mask = _src(mc) if mc is not None else None
        cases.append(ec)
    for name, idx in pred_idx.items():
        extra = sorted(set(idx) - set(refs)) if not (len(refs) == 1 and len(idx) == 1) else []
        if extra:
            more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
            notes.append(f"prediction '{name}': {len(extra)} case(s) without a reference ignored: "
                         f"{', '.join(extra[:5])}{more}")
    return Pairing(cases, [n for n, _ in preds], notes)


def pair_manifest(manifest: Path) -> Pairing:
    """Pairs from a CSV with columns ``case, ref, pred | pred:NAME..., [mask]``."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UsageError(f"manifest {manifest}: no such file")
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    pred_cols = [c for c in cols if c == "pred" or c.startswith("pred:")]
    missing = [c for c in ("case", "ref") if c not in cols]
    if missing or not pred_cols:
        raise UsageError(f"manifest {manifest}: needs columns case, ref and pred (or pred:NAME per method); "
                         f"found {', '.join(cols) or 'none'}")
    methods = [c.split(":", 1)[1].strip() if ":" in c else "pred" for c in pred_cols]
    base = manifest.parent

    def src(value: str) -> Source | None:
        if not value:
            return None
        p = Path(value) if Path(value).is_absolute() else base / value
        return Source(label=str(p), path=str(p))

    cases, seen = [], set()
    for i, r in enumerate(rows, start=2):
        cid = r["case"]
        if not cid:
            raise UsageError(f"manifest {manifest}, line {i}: empty 'case'")
        if cid in seen:
            raise UsageError(f"manifest {manifest}, line {i}: case {cid!r} listed twice")
        seen.add(cid)
        ref = src(r["ref"])
        ec = EvalCase(cid, ref or Source(label=cid), {m: src(r[c]) for m, c in zip(methods, pred_cols, strict=True)},
                      mask=src(r.get("mask", "")), want_mask="mask" in cols)
        if ref is None:
            ec.error = CaseError(f"{manifest}:{i}", f"case {cid!r} has no reference", "fill the 'ref' column")
        cases.append(ec)
    if not cases:
        raise UsageError(f"manifest {manifest}: no rows")
    return Pairing(cases, methods, [])
