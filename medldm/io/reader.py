"""``load_scan``: one entry point for NIfTI files, DICOM files, lists of DICOM files and series folders.

Returns a ``monai.data.MetaTensor`` of shape ``(X, Y, Z)`` (2D images: ``(X, Y, 1)``), float32 in
scanner units, ``.affine`` = voxel centre -> RAS mm, and the meta keys listed in docs/io.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medldm.io.errors import CaseError
from medldm.io.formats import NIFTI_SUFFIXES, is_nifti  # noqa: F401 (re-exported)


def _to_metatensor(data: np.ndarray, affine: np.ndarray, meta: dict):
    """Wrap ``data`` (X, Y, Z) float32 as a MetaTensor with MONAI-compatible meta keys."""
    import torch
    from monai.data import MetaTensor

    from medldm.io.geometry import spacing_from_affine

    aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    meta = dict(meta)
    meta.setdefault("warnings", [])
    meta["spacing"] = tuple(spacing_from_affine(affine))
    meta["spatial_shape"] = np.asarray(data.shape[:3])
    meta["original_affine"] = np.asarray(affine, dtype=np.float64)
    meta["space"] = "RAS"
    meta["original_channel_dim"] = "no_channel"
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), affine=aff, meta=meta)


# ---------------------------------------------------------------- NIfTI

def _nifti_exact_dtype(img, arr: np.ndarray) -> str:
    slope, inter = img.dataobj.slope, img.dataobj.inter
    stored = img.get_data_dtype()
    if (slope in (None, 1.0) or not np.isfinite(slope)) and (inter in (None, 0.0) or not np.isfinite(inter)):
        return np.dtype(stored).name
    from medldm.io.dicom import exact_dtype

    return exact_dtype(arr, stored, True)


def load_nifti(path: str | os.PathLike, *, volume: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """NIfTI file -> (data (X, Y, Z) float32, RAS affine, meta). 4D needs ``volume``."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:
        raise CaseError(path, f"cannot read the NIfTI file ({type(e).__name__}: {e})",
                        "the file is damaged or not NIfTI; copy it again from the source") from e
    warns: list[str] = []
    # trailing singleton dimensions beyond 3 (e.g. X, Y, Z, 1) are dropped
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise CaseError(path, f"{len(shape)}D image of shape {shape}", "medldm reads 2D, 3D and 4D NIfTI")
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
    data = arr.reshape(shape[:3] + (1,) * (3 - len(shape[:3]))).astype(np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)  # nibabel's pick: sform, else qform, else pixdim
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
    return data, affine, meta


# ---------------------------------------------------------------- DICOM

def load_dicom(paths: Sequence[str | os.PathLike], *, volume: int | None = None, where: str | None = None,
               headers: Sequence | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """DICOM files of one series (or one multi-frame object) -> (data (X, Y, Z), RAS affine, meta).

    Non-image objects among ``paths`` are skipped (warning); several stacks (orientations or image
    sizes) raise :class:`CaseError`.
    """
    from medldm.io.dicom import modality, n_frames, non_image_reason, read_header
    from medldm.io.dicom_frames import frames_of
    from medldm.io.dicom_series import describe_stacks, split_stacks, stack

    paths = [Path(p) for p in paths]
    where = where or (str(paths[0]) if len(paths) == 1 else str(Path(os.path.commonpath(paths))))
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
    if n_multi and len(paths) - len(warns) > 1:
        raise CaseError(where, "several DICOM objects including multi-frame ones",
                        "load each multi-frame file on its own")
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
        from medldm.io.discover import scan_folder

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


def load_case(case, *, volume: int | None = None):
    """Load a :class:`medldm.io.discover.Case` (raises its discovery error if it has one)."""
    if case.error is not None:
        raise case.error
    if case.kind == "nifti":
        return _to_metatensor(*load_nifti(case.paths[0], volume=volume))
    return _to_metatensor(*load_dicom(case.paths, volume=volume, where=str(case.source),
                                      headers=case.headers))
