"""Dataset fingerprint: what a folder of scans holds, as a JSON-serializable dict (nnU-Net's idea).

:func:`fingerprint` finds the cases under one or more folders (:func:`medldm.io.discover.scan_folder`: NIfTI
files and DICOM series), reads each through :func:`medldm.io.reader.read_case` (numpy only, no torch) in
parallel (``concurrent.futures``), and records per scan:

* modality (DICOM ``Modality``; NIfTI: ``CT`` when the intensities look like Hounsfield units), shape, spacing,
  orientation (axis codes) and anisotropy (largest / smallest spacing);
* intensity percentiles of all finite voxels and of the foreground (voxels above the minimum);
* estimated noise (:func:`medldm.data.noise.estimate_noise_sigma`, the wavelet MAD estimator, median over 5 slices)
  in scanner units and relative to the 0.5-99.5 percentile range;
* the reader's integrity warnings (gaps / splits, non-finite voxels, ...), a constant-volume flag;
* a pixel hash (sha256 of shape + float32 voxels) that finds duplicates;
* the subject, for splitting by subject: DICOM PatientID, else StudyInstanceUID; NIfTI: a BIDS ``sub-<label>``
  in the path, else the folder (files directly in the data folder: one subject per file, the flat layout of
  nnU-Net / Medical Segmentation Decathlon datasets).

Records are cached in a JSON file keyed by the case's files' ``(path, size, mtime_ns)``, so a second run only
reads what changed. Unreadable cases are skipped with a one-line reason. :func:`summarize` aggregates the
records (medians, ranges, duplicate groups, subjects).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medldm.data.noise import estimate_noise_sigma
from medldm.io.atomic import atomic_file
from medldm.io.discover import scan_folder
from medldm.io.reader import read_case
from medldm.io.volumes import count_volumes

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 2  # 2: 4D scans are fingerprinted (by volume 0), with their number of volumes
PERCENTILES = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)
#: intensity statistics use at most this many voxels (an evenly strided subset: fast on large CT)
MAX_STAT_VOXELS = 2_000_000
_BIDS = re.compile(r"(?:^|[/_])(sub-[A-Za-z0-9]+)")
_NON_SCAN = ("not a NIfTI or DICOM file", "hidden file", "hidden folder", "not a regular file", "cannot be opened",
             "link to a folder")


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/medldm/fingerprint.json`` (``~/.cache/medldm/fingerprint.json``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medldm" / "fingerprint.json"


def _file_key(paths: Sequence[Path]) -> str:
    h = hashlib.sha256(f"v{FINGERPRINT_VERSION}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _header_ids(case) -> tuple[str, str]:
    ds = (case.headers or [None])[0]
    if ds is None:
        return "", ""
    return str(ds.get("PatientID", "") or "").strip(), str(ds.get("StudyInstanceUID", "") or "").strip()


def subject_of(case, data_root: Path) -> tuple[str, str]:
    """(subject key, where it came from) for splitting by subject."""
    pid, study = _header_ids(case)
    if pid:
        return f"PatientID:{pid}", "DICOM PatientID"
    if study:
        return f"StudyInstanceUID:{study}", "DICOM StudyInstanceUID"
    first = Path(case.paths[0])
    m = _BIDS.search(first.as_posix())
    if m:
        return f"BIDS:{m.group(1)}", "BIDS sub- label"
    folder = first.parent
    if case.kind != "nifti" or folder.resolve() != data_root.resolve():
        return f"folder:{folder}", "folder"
    return f"file:{first}", "file (flat folder: one subject per file)"


def _stat_sample(a: np.ndarray) -> np.ndarray:
    flat = a.ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size > MAX_STAT_VOXELS:
        flat = flat[:: int(np.ceil(flat.size / MAX_STAT_VOXELS))]
    return flat.astype(np.float64, copy=False)


def _looks_like_ct(p: dict[str, float], lo: float, hi: float) -> bool:
    """HU-like intensities: air around -1000 and tissue/bone above 0."""
    return lo <= -900.0 and p["1.0"] <= -500.0 and hi >= 100.0


def scan_record(case, data_root: Path) -> dict[str, Any]:
    """Fingerprint of one case (raises CaseError / OSError when it cannot be read)."""
    t0 = time.perf_counter()
    n_vol = count_volumes(case)  # a 4D scan: fingerprinted by its first volume; training takes every volume
    data, affine, meta = read_case(case, volume=0 if n_vol > 1 else None)
    sample = _stat_sample(data)
    finite = sample.size > 0
    lo, hi = (float(sample.min()), float(sample.max())) if finite else (float("nan"), float("nan"))
    pct = {f"{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES), strict=True)} if finite else {}
    fg = sample[sample > lo] if finite else sample
    fg_pct = {f"{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(fg, PERCENTILES), strict=True)} if fg.size else {}
    modality = str(meta.get("modality") or "unknown").upper()
    modality_from = "DICOM Modality" if case.kind != "nifti" and modality != "UNKNOWN" else ""
    if modality in ("UNKNOWN", "") and finite:
        modality, modality_from = ("CT", "intensities look like HU (air at -1000)") if _looks_like_ct(pct, lo, hi) \
            else ("MR", "no modality in the file; intensities are not HU-like")
    spacing = [float(s) for s in meta["spacing"]]
    shape = [int(s) for s in data.shape]
    used = [s for s, n in zip(spacing, shape, strict=True) if n > 1] or spacing
    rng = (pct.get("99.5", hi) - pct.get("0.5", lo)) if finite else 0.0
    # median over 5 non-constant slices of the central 60 % (in-plane noise, unaffected by slice thickness)
    sigma = estimate_noise_sigma(data, max_slices=5, span=(0.2, 0.8), min_side=4) if finite and hi > lo else 0.0
    h = hashlib.sha256(repr(shape).encode())
    h.update(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    subject, subject_from = subject_of(case, data_root)
    pid, study = _header_ids(case)
    return {
        "id": case.id, "root": str(data_root), "kind": case.kind, "source": case.source or str(case.paths[0]),
        "paths": [str(p) for p in case.paths] if case.kind == "nifti" or len(case.paths) <= 3 else
                 [str(case.paths[0]), f"... {len(case.paths)} files"],
        "n_files": len(case.paths), "folder": str(Path(case.paths[0]).parent),
        "modality": modality, "modality_from": modality_from,
        "shape": shape, "spacing": spacing, "orientation": "".join(nib.aff2axcodes(affine)),
        "anisotropy": float(max(used) / max(min(used), 1e-6)),
        "dtype": str(meta.get("original_dtype", "")),
        "min": lo, "max": hi, "percentiles": pct, "foreground_percentiles": fg_pct,
        "foreground_fraction": float(fg.size / max(sample.size, 1)),
        "constant": bool(not finite or hi <= lo),
        "nonfinite_voxels": int(meta.get("nonfinite_voxels", 0)),
        "noise_sigma": sigma, "noise_relative": float(sigma / rng) if rng > 0 else 0.0,
        "warnings": list(meta.get("warnings", [])), "integrity": _jsonable(meta.get("integrity", {})),
        "pixel_hash": h.hexdigest(), "subject": subject, "subject_from": subject_from,
        "patient_id": pid, "study_uid": study, "series_uid": str(meta.get("series_uid", "")),
        "volumes": n_vol, "read_s": round(time.perf_counter() - t0, 3),
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _load_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data.get("records", {}) if data.get("version") == FINGERPRINT_VERSION else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path | None, records: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = _load_cache(path)
        old.update(records)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"version": FINGERPRINT_VERSION, "records": old}))
    except OSError as e:  # a cache that cannot be written only costs time
        log.warning("fingerprint cache %s not written: %s", path, e)


def fingerprint(roots: Sequence[str | os.PathLike], *, workers: int | None = None, cache: str | Path | None = None,
                say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fingerprint every scan under ``roots`` (folders or scan files). Returns ``{"version", "roots", "scans": [...],
    "skipped": [lines], "non_image": [lines], "notes": [...], "summary": {...}}``.

    ``cache``: JSON cache file (None: no cache); ``say``: called with one line per skipped case / progress note."""
    say = say or (lambda _line: None)
    cache_path = Path(cache) if cache is not None else None
    cached = _load_cache(cache_path)
    jobs, skipped, non_image, notes = [], [], [], []
    for n_root, r in enumerate(roots):
        root = Path(r)
        disc = scan_folder(root)
        base = root if root.is_dir() else root.parent
        notes += disc.notes
        for line in disc.skipped:
            (skipped if any(k in line for k in _NON_SCAN) else non_image).append(line)
        for case in disc.cases:
            where = case.source or str(case.paths[0])
            if case.error is not None:
                skipped.append(f"{where}: unreadable: {case.error.line() if hasattr(case.error, 'line') else case.error}")
                continue
            jobs.append((case, base, where, case.id if len(roots) == 1 else f"{n_root}:{case.id}"))
    records: list[dict | None] = [None] * len(jobs)
    new: dict[str, dict] = {}

    def work(i: int) -> tuple[int, dict | None, str | None]:
        case, base, where, cid = jobs[i]
        try:
            key = _file_key(case.paths)
        except OSError as e:
            return i, None, f"{where}: unreadable: {e.strerror or e}"
        if key in cached and cached[key].get("root") == str(base):
            return i, {**cached[key], "id": cid}, None
        try:
            rec = scan_record(case, base)
        except Exception as e:  # noqa: BLE001 - one line per unreadable case, the others go on
            line = e.line() if hasattr(e, "line") else f"{where}: {type(e).__name__}: {e}"
            return i, None, f"{line}" if line.startswith(str(where)) else f"{where}: unreadable: {line}"
        rec["cache_key"], rec["id"] = key, cid
        return i, rec, None

    n_workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        for i, rec, err in pool.map(work, range(len(jobs))):
            if err is not None:
                skipped.append(err)
                say(f"skipped {err}")
                continue
            records[i] = rec
            if rec is not None and rec["cache_key"] not in cached:
                new[rec["cache_key"]] = rec
    _save_cache(cache_path, new)
    scans = [r for r in records if r is not None]
    return {"version": FINGERPRINT_VERSION, "roots": [str(Path(r)) for r in roots], "scans": scans,
            "skipped": skipped, "non_image": non_image, "notes": notes, "summary": summarize(scans)}


def _median(vals: list[float]) -> float | None:
    return float(np.median(vals)) if vals else None


def duplicate_groups(scans: list[dict]) -> list[list[str]]:
    """Ids of scans with the same pixel hash (likely duplicates), one list per group of two or more."""
    by: dict[str, list[str]] = defaultdict(list)
    for s in scans:
        by[s["pixel_hash"]].append(s["id"])
    return [ids for ids in by.values() if len(ids) > 1]


def summarize(scans: list[dict]) -> dict[str, Any]:
    """Dataset-level figures from the per-scan records."""
    if not scans:
        return {"n_scans": 0}
    mods = Counter(s["modality"] for s in scans)
    spac = np.array([s["spacing"] for s in scans], dtype=np.float64)
    shp = np.array([s["shape"] for s in scans], dtype=np.float64)
    usable = [s for s in scans if not s["constant"]]
    pct = {q: _median([s["percentiles"][q] for s in usable if q in s["percentiles"]]) for q in map(str, PERCENTILES)}
    subjects = Counter(s["subject"] for s in scans)
    return {
        "n_scans": len(scans),
        "modalities": dict(mods), "modality": mods.most_common(1)[0][0],
        "median_spacing": [float(v) for v in np.median(spac, axis=0)],
        "min_spacing": [float(v) for v in spac.min(axis=0)], "max_spacing": [float(v) for v in spac.max(axis=0)],
        "median_shape": [int(v) for v in np.median(shp, axis=0)],
        "min_shape": [int(v) for v in shp.min(axis=0)], "max_shape": [int(v) for v in shp.max(axis=0)],
        "median_anisotropy": _median([s["anisotropy"] for s in scans]),
        "orientations": dict(Counter(s["orientation"] for s in scans)),
        "percentiles": pct,
        "p_low": min((s["percentiles"].get("1.0", s["min"]) for s in usable), default=None),
        "p_high": max((s["percentiles"].get("99.0", s["max"]) for s in usable), default=None),
        "median_noise_relative": _median([s["noise_relative"] for s in usable]),
        "duplicates": duplicate_groups(scans),
        "n_subjects": len(subjects), "subject_from": dict(Counter(s["subject_from"] for s in scans)),
        "constant": [s["id"] for s in scans if s["constant"]],
        "with_warnings": sum(bool(s["warnings"]) for s in scans),
        "voxels_total": int(sum(int(np.prod(s["shape"])) for s in scans)),
    }
