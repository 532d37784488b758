"""``load_scan``: one entry point for NIfTI files, DICOM files, lists of DICOM files and series folders.

Returns a ``monai.data.MetaTensor`` of shape ``(X, Y, Z)`` (2D images: ``(X, Y, 1)``), float32 in
scanner units, ``.affine`` = voxel centre -> RAS mm, and the meta keys listed in docs/io.md.
:func:`read_case` returns the same as numpy ``(data, affine, meta)`` without importing torch or MONAI.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medldm.io.dicom import exact_dtype, modality, n_frames, non_image_reason, read_header
from medldm.io.dicom_frames import frames_of
from medldm.io.dicom_series import describe_stacks, split_stacks, stack
from medldm.io.discover import scan_folder
from medldm.io.errors import CaseError
from medldm.io.formats import NIFTI_SUFFIXES, is_nifti  # noqa: F401 (re-exported)
from medldm.io.geometry import affine_problem, spacing_from_affine
from medldm.io.limits import DEFAULT_MAX_VOXELS, max_voxels  # noqa: F401 (re-exported)


def _finish(data: np.ndarray, affine: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(data (X, Y, Z) float32, RAS affine float64, meta)`` with the derived meta keys (spacing, non-finite
    voxels and their warning, MONAI-compatible keys): what :func:`read_case` returns and a MetaTensor carries."""
    meta = dict(meta)
    meta["warnings"] = list(meta.get("warnings", []))
    n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    meta["nonfinite_voxels"] = n_bad
    if n_bad:
        what = "every voxel is" if n_bad == data.size else f"{n_bad} of {data.size} voxels are"
        meta["warnings"].append(f"{what} NaN or infinite: left out of intensity statistics, and NaN "
                                "again in processed outputs (docs/limits.md)")
    meta["spacing"] = tuple(spacing_from_affine(affine))
    meta["spatial_shape"] = np.asarray(data.shape[:3])
    meta["original_affine"] = np.asarray(affine, dtype=np.float64)
    meta["space"] = "RAS"
    meta["original_channel_dim"] = "no_channel"
    return np.ascontiguousarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64), meta


def _metatensor(data: np.ndarray, affine: np.ndarray, meta: dict):
    """Wrap what :func:`_finish` returns as a MetaTensor."""
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(affine), meta=meta)


def _to_metatensor(data: np.ndarray, affine: np.ndarray, meta: dict):
    """Wrap ``data`` (X, Y, Z) float32 as a MetaTensor with MONAI-compatible meta keys."""
    return _metatensor(*_finish(data, affine, meta))


# ---------------------------------------------------------------- NIfTI

def _nifti_exact_dtype(img, arr: np.ndarray) -> str:
    slope, inter = img.dataobj.slope, img.dataobj.inter
    stored = img.get_data_dtype()
    if (slope in (None, 1.0) or not np.isfinite(slope)) and (inter in (None, 0.0) or not np.isfinite(inter)):
        return np.dtype(stored).name
    return exact_dtype(arr, stored, True)


#: deflate (gzip) cannot expand data by more than about 1032:1
GZIP_MAX_RATIO = 1032


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} PB"


def _check_nifti_size(path: Path, img, shape: tuple[int, ...], n_read: int) -> None:
    """Refuse, before any voxel is read, a header whose image cannot be in the file or is too large.

    ``shape``: the header's full shape; ``n_read``: the voxels that would be allocated (one volume of a 4D).
    """
    if any(s == 0 for s in shape):
        raise CaseError(path, f"the image has a dimension of size 0 (shape {shape}): it holds no voxels",
                        "export the scan again; a zero-size image cannot be processed")
    dt = np.dtype(img.get_data_dtype())
    n = math.prod(shape)
    offset = float(img.header["vox_offset"]) if "vox_offset" in img.header else 0.0
    need = int(max(offset, 0)) + n * dt.itemsize
    size = path.stat().st_size
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    claim = f"the header claims {'x'.join(map(str, shape))} voxels of {dt.name} ({_human(need)})"
    if gz and need > GZIP_MAX_RATIO * size + 65536:
        raise CaseError(path, f"{claim}, but a {_human(size)} gzip file can expand to at most "
                              f"{_human(GZIP_MAX_RATIO * size)}",
                        "the header is damaged or the file truncated; copy it again from the source")
    if not gz and need > size:
        raise CaseError(path, f"{claim}, but the file holds only {_human(size)}",
                        "the file is truncated or its header damaged; copy it again from the source")
    limit = max_voxels()
    if n_read > limit:
        raise CaseError(path, f"{n_read} voxels to read ({'x'.join(map(str, shape))}) exceed the limit of "
                              f"{limit} (about {_human(4 * limit)} as float32)",
                        "crop or split the scan, or raise MEDLDM_MAX_VOXELS if this machine has the memory")


def _raw_pixdim(path: Path, header_class) -> np.ndarray | None:
    """pixdim as stored in the file (nibabel silently turns 0 into 1 when it loads a header)."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            raw = header_class.from_fileobj(f, check=False)
        return np.asarray(raw["pixdim"], dtype=np.float64)
    except Exception:  # the checked header was read fine: no raw value, no warning
        return None


#: qform and sform further apart than this (mm, at a corner voxel centre) are reported
QFORM_SFORM_TOL_MM = 0.01


def _corner_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between the positions two affines give the corner voxel centres of ``shape``."""
    shape = tuple(shape) + (1,) * (3 - len(shape))
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return float(np.linalg.norm((idx @ a.T - idx @ b.T)[:, :3], axis=1).max())


def _nifti_affine(path: Path, img, ndim: int, warns: list[str]) -> np.ndarray:
    """nibabel's pick (sform, else qform, else pixdim) checked: a NaN/singular sform falls back to a valid
    qform (warning); zero pixdim used by the qform/pixdim affine is warned about (nibabel assumes 1 mm);
    no usable affine at all raises :class:`CaseError`."""
    hdr = img.header
    scode = int(hdr["sform_code"]) if "sform_code" in hdr else 0
    qcode = int(hdr["qform_code"]) if "qform_code" in hdr else 0
    candidates: list[tuple[str, np.ndarray]] = []
    if scode > 0:
        candidates.append(("sform", np.asarray(hdr.get_sform(), dtype=np.float64)))
    if qcode > 0:
        candidates.append(("qform", np.asarray(hdr.get_qform(), dtype=np.float64)))
    if not candidates:
        candidates.append(("pixdim", np.asarray(img.affine, dtype=np.float64)))
    problems = []
    for name, aff in candidates:
        why = affine_problem(aff)
        if not why:
            break
        problems.append(f"{name}: {why}")
    else:
        raise CaseError(path, "the voxel geometry is unknown (" + "; ".join(problems) + ")",
                        "fix the header's sform/qform (e.g. with nibabel) or export the scan again")
    if problems:
        warns.append(f"{'; '.join(problems)}: the {name} is used instead")
    if name == "sform" and len(candidates) == 2 and not affine_problem(candidates[1][1]):
        far = _corner_distance(candidates[0][1], candidates[1][1], img.shape[:3])
        if far > QFORM_SFORM_TOL_MM:
            warns.append(f"the header's qform and sform disagree by up to {far:.3g} mm at the image corners (codes "
                         f"sform {scode}, qform {qcode}; e.g. a left/right mirror): the sform is used, as nibabel and "
                         "FSL do, and outputs carry it in both — check which one your other tools use")
    if name != "sform":
        raw = _raw_pixdim(path, type(hdr))
        if raw is not None:
            bad = [i for i in range(1, ndim + 1) if not (np.isfinite(raw[i]) and raw[i] != 0)]
            if bad:
                axes = ", ".join(f"pixdim[{i}]={raw[i]:g}" for i in bad)
                warns.append(f"zero or invalid voxel size in the header ({axes}): 1 mm assumed along "
                             f"{', '.join('XYZ'[i - 1] for i in bad)} — distances and spacing are unreliable")
    return aff


def load_nifti(path: str | os.PathLike, *, volume: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """NIfTI file -> (data (X, Y, Z) float32, RAS affine, meta). 4D needs ``volume``.

    Before reading any voxel the header's claimed size is checked against the file size and
    ``MEDLDM_MAX_VOXELS`` (docs/limits.md); a zero-size image, values beyond float32's range and an
    unusable (NaN / singular) affine raise :class:`CaseError`."""
    import nibabel as nib
    from nibabel.imageglobals import logger as nib_logger

    path = Path(path)
    try:
        was, nib_logger.disabled = nib_logger.disabled, True  # nibabel logs (and fixes) e.g. zero pixdim:
        try:  # reported in meta["warnings"] instead
            img = nib.load(str(path))
        finally:
            nib_logger.disabled = was
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:
        raise CaseError(path, f"cannot read the NIfTI file ({type(e).__name__}: {e})",
                        "the file is damaged or not NIfTI; copy it again from the source") from e
    full_shape = shape
    warns: list[str] = []
    # trailing singleton dimensions beyond 3 (e.g. X, Y, Z, 1) are dropped
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise CaseError(path, f"{len(shape)}D image of shape {shape}", "medldm reads 2D, 3D and 4D NIfTI")
    n_all = math.prod(full_shape)
    _check_nifti_size(path, img, full_shape, n_all // shape[3] if len(shape) == 4 else n_all)  # 4D: one volume read
    if len(shape) == 4:
        if volume is None:
            raise CaseError(path, f"4D image of shape {shape} ({shape[3]} volumes)",
                            f"pass --volume K (0..{shape[3] - 1}) to pick one volume")
        if not 0 <= volume < shape[3]:
            raise CaseError(path, f"volume {volume} out of range: the image holds {shape[3]} volumes",
                            f"pass --volume K with 0 <= K < {shape[3]}")
        try:
            arr = np.asanyarray(img.dataobj[..., volume]).reshape(shape[:3])
        except Exception as e:
            raise CaseError(path, f"cannot read the image data ({type(e).__name__}: {e})",
                            "the file is damaged or truncated; copy it again from the source") from e
        warns.append(f"4D image ({shape[3]} volumes): volume {volume} selected")
    else:
        if volume not in (None, 0):
            warns.append(f"volume {volume} requested but the image is {len(shape)}D: ignored")
        try:
            arr = np.asanyarray(img.dataobj).reshape(shape)
        except Exception as e:
            raise CaseError(path, f"cannot read the image data ({type(e).__name__}: {e})",
                            "the file is damaged or truncated; copy it again from the source") from e
    ndim = 2 if len(shape) == 2 else 3
    if np.iscomplexobj(arr) or arr.dtype.names:
        raise CaseError(path, f"unsupported voxel type {arr.dtype}", "medldm reads real-valued scalar images")
    odt = _nifti_exact_dtype(img, arr)
    with np.errstate(over="ignore", invalid="ignore"):
        data = arr.reshape(shape[:3] + (1,) * (3 - len(shape[:3]))).astype(np.float32)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
        over = int(np.count_nonzero(np.isinf(data) & np.isfinite(arr.reshape(data.shape))))
        if over:
            big = float(np.nanmax(np.abs(np.where(np.isfinite(arr), arr, np.nan))))
            raise CaseError(path, f"{over} voxel(s) beyond float32's range (|value| up to {big:.3g} > 3.4e38)",
                            "rescale the image (e.g. to physical units) before processing; medldm computes in float32")
    affine = _nifti_affine(path, img, ndim, warns)
    hdr = img.header
    meta = {
        "kind": "nifti",
        "modality": "unknown",
        "original_dtype": odt,
        "original_ndim": ndim,
        "warnings": warns,
        "filename_or_obj": str(path),
        "source_files": [str(path)],
        "series_uid": "",
        "series_description": (hdr.get("descrip", b"").tobytes().decode("latin-1").strip("\x00 ")
                               if "descrip" in hdr else ""),
        "integrity": {},
        "sform_code": int(hdr["sform_code"]) if "sform_code" in hdr else 0,
        "qform_code": int(hdr["qform_code"]) if "qform_code" in hdr else 0,
    }
    if len(shape) == 4:  # the step between volumes (e.g. the repetition time), kept by a 4D output
        zooms = img.header.get_zooms()
        meta["volume_step"] = float(zooms[3]) if len(zooms) > 3 and np.isfinite(zooms[3]) and zooms[3] > 0 else None
    return data, affine, meta


# ---------------------------------------------------------------- DICOM

def _dicom_frames(paths: list[Path], where: str, headers: Sequence | None):
    """The image frames of DICOM files of one series (headers only, pixels decoded later): ``(frames, first image
    header, warnings, number of multi-frame objects, headers)``."""
    if headers is None:
        headers = [read_header(p, strict=True) for p in paths]
    warns: list[str] = []
    frames, first = [], None
    n_multi = 0
    for p, ds in zip(paths, headers, strict=True):
        reason = non_image_reason(ds)
        if reason:
            if len(paths) == 1:
                raise CaseError(p, f"not an image: {reason}", "give an image file or series folder")
            warns.append(f"{p}: skipped: {reason}")
            continue
        first = first if first is not None else ds
        n_multi += n_frames(ds) > 1
        frames.extend(frames_of(p, ds))
    if not frames:
        raise CaseError(where, "no image among the DICOM files", "give an image file or series folder")
    if n_multi and n_multi != len(paths) - len(warns):
        raise CaseError(where, "multi-frame and single-frame DICOM objects mixed",
                        "load each multi-frame file on its own")
    return frames, first, warns, n_multi, headers


def load_dicom(paths: Sequence[str | os.PathLike], *, volume: int | None = None, where: str | None = None,
               headers: Sequence | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """DICOM files of one series (or one multi-frame object) -> (data (X, Y, Z), RAS affine, meta).

    Non-image objects among ``paths`` are skipped (warning); several stacks (orientations or image
    sizes) raise :class:`CaseError`.
    """
    paths = [Path(p) for p in paths]
    where = where or (str(paths[0]) if len(paths) == 1 else str(Path(os.path.commonpath(paths))))
    frames, first, warns, n_multi, headers = _dicom_frames(paths, where, headers)
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in headers if not non_image_reason(ds)}

    if len(uids) > 1:
        raise CaseError(where, f"the files belong to {len(uids)} different series",
                        "use scan_folder() / `medldm info FOLDER` to get one case per series")
    stacks = split_stacks(frames)
    if len(stacks) > 1:
        raise CaseError(where, f"the images do not form one volume: {describe_stacks(stacks)}",
                        "use scan_folder() / `medldm info FOLDER`, which gives one case per stack")
    st = stack(stacks[0], where=where, volume=volume)
    single = len(st.sources) == 1 and not n_multi
    sources = list(dict.fromkeys(s.split("#frame")[0] for s in st.sources))  # slice order, no repeats
    meta = {
        "kind": "dicom-series",
        "modality": modality(first),
        "original_dtype": st.original_dtype,
        "original_ndim": 2 if single else 3,
        "warnings": warns + st.warnings,
        "filename_or_obj": where,
        "source_files": sources,
        "series_uid": str(first.get("SeriesInstanceUID", "") or ""),
        "series_description": str(first.get("SeriesDescription", "") or ""),
        "integrity": st.integrity,
    }
    return st.data, st.affine, meta


# ---------------------------------------------------------------- entry point

def load_scan(path: str | os.PathLike | Sequence[str | os.PathLike], *, volume: int | None = None):
    """Load a scan as a MetaTensor ``(X, Y, Z)`` float32 (scanner units) with a RAS affine.

    ``path``: a NIfTI file (.nii/.nii.gz, 2D/3D; 4D needs ``volume``), a DICOM file (single- or
    multi-frame), a list of DICOM files of one series, or a folder holding exactly one scan.
    Raises :class:`CaseError` (one line: path, what is wrong, what to do) for bad input.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise CaseError("<empty list>", "no files given", "pass a file, a folder or a list of DICOM files")
        if len(path) > 1 or not is_nifti(path[0]):
            for p in path:
                if not Path(p).is_file():
                    raise CaseError(p, "file not found", "check the path")
                if is_nifti(p):
                    raise CaseError(p, "NIfTI file in a list of DICOM files", "load NIfTI files one by one")
            return _to_metatensor(*load_dicom(path, volume=volume))
        path = path[0]
    p = Path(path)
    if not p.exists():
        raise CaseError(p, "file or folder not found", "check the path")
    if p.is_dir():
        found = scan_folder(p)
        if len(found.cases) == 1:
            return load_case(found.cases[0], volume=volume)
        if not found.cases:
            why = f" ({len(found.skipped)} file(s) skipped, e.g. {found.skipped[0]})" if found.skipped else ""
            raise CaseError(p, f"no NIfTI file or DICOM image series found{why}",
                            "give a folder holding a scan")
        ids = ", ".join(c.id for c in found.cases[:5]) + (", ..." if len(found.cases) > 5 else "")
        raise CaseError(p, f"the folder holds {len(found.cases)} scans ({ids})",
                        "use scan_folder() (or `medldm info FOLDER`) to process them one by one")
    if is_nifti(p):
        return _to_metatensor(*load_nifti(p, volume=volume))
    return _to_metatensor(*load_dicom([p], volume=volume))


def read_case(case, *, volume: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a :class:`medldm.io.discover.Case` without torch or MONAI: ``(data (X, Y, Z) float32,
    RAS affine (4, 4) float64, meta)``, the same values and meta keys :func:`load_case` puts in its
    MetaTensor (for callers that need only numpy, e.g. ``medldm info``, which then stays free of torch).
    Raises the case's discovery error if it has one."""
    if case.error is not None:
        raise case.error
    if case.kind == "nifti":
        return _finish(*load_nifti(case.paths[0], volume=volume))
    data, affine, meta = load_dicom(case.paths, volume=volume, where=str(case.source), headers=case.headers)
    meta["warnings"] = [*getattr(case, "warnings", []), *meta["warnings"]]  # e.g. "part 1 of 2: split at a gap"
    meta["integrity"] = {**meta["integrity"], **getattr(case, "integrity", {})}
    return _finish(data, affine, meta)


class ScanArray:
    """A scan read without torch: ``data`` (X, Y, Z) float32, ``affine`` (RAS), ``meta`` — the attributes the
    writers (:func:`medldm.io.writer.save_scan`, ``save_nifti``, ``save_dicom_series``) and
    ``print_case_warnings`` read from a MetaTensor, and numpy's array protocol. For commands that only move
    voxels between formats (``medldm convert``), so they need not import torch or MONAI."""

    __slots__ = ("data", "affine", "meta")

    def __init__(self, data: np.ndarray, affine: np.ndarray, meta: dict):
        self.data, self.affine, self.meta = data, affine, meta

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __array__(self, dtype=None, copy=None):
        return np.array(self.data, dtype=dtype, copy=copy) if copy is not None else np.asarray(self.data, dtype=dtype)


def load_case(case, *, volume: int | None = None, as_numpy: bool = False):
    """Load a :class:`medldm.io.discover.Case` as a MetaTensor, or (``as_numpy``) a :class:`ScanArray`
    without importing torch (raises the case's discovery error if it has one)."""
    if as_numpy:
        return ScanArray(*read_case(case, volume=volume))
    return _metatensor(*read_case(case, volume=volume))
