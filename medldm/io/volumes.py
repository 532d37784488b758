"""4D scans (DWI, fMRI, perfusion, multi-echo: most of an MR export) volume by volume.

Every command reads a 4D case as its volumes, each an ordinary ``(X, Y, Z)`` scan (``load_case(case, volume=k)``:
the images of one time point / b-value / echo of a DICOM series, or ``[..., k]`` of a 4D NIfTI), runs its 3D work on
each, and writes one 4D result with :func:`stack_volumes`: a 4D NIfTI with the same affine, or a derived DICOM
series whose volume ``k`` is made from (and references) the source images of volume ``k``, so per-volume
attributes (echo time, temporal position, b-value and gradient where the source has them) stay with their volume.
``--volume K`` picks one volume instead (:func:`load_volumes`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medldm.io.dicom_frames import is_mosaic
from medldm.io.dicom_series import volume_count, volume_groups
from medldm.io.errors import CaseError
from medldm.io.limits import max_voxels
from medldm.io.reader import ScanArray, _dicom_frames, load_case


def _strip_selected(img, k: int):
    meta = img.meta
    meta["warnings"] = [w for w in meta.get("warnings", []) if not w.endswith(f"volume {k} selected")]
    return img


def load_volumes(case, volume: int | None = None, *, as_numpy: bool = False) -> list:
    """The scan(s) a command processes for ``case``: ``[the picked volume]`` with ``volume``, every volume of a 4D
    case (each ``(X, Y, Z)``, in order; all of them together within ``MEDLDM_MAX_VOXELS``), or ``[the scan]`` for a
    3D case. ``as_numpy``: :class:`~medldm.io.reader.ScanArray` (no torch), else MetaTensors."""
    n = 1 if volume is not None else count_volumes(case)
    if n <= 1:
        return [load_case(case, volume=volume, as_numpy=as_numpy)]
    first = load_case(case, volume=0, as_numpy=as_numpy)
    check_4d_size(case, tuple(first.shape), n)
    vols = [_strip_selected(first, 0)] + [_strip_selected(load_case(case, volume=k, as_numpy=as_numpy), k)
                                          for k in range(1, n)]
    first.meta["warnings"] = [*first.meta.get("warnings", []),
                              f"4D: {n} volumes, each processed on its own and written as one 4D result"]
    return vols


def source_reference(vols: list):
    """What a derived DICOM series of these (input) volumes references: the source files (3D), one list per volume
    (4D), or None for a NIfTI input."""
    if (vols[0].meta or {}).get("kind") != "dicom-series":
        return None
    if len(vols) == 1:
        return vols[0].meta.get("source_files")
    return [list(v.meta.get("source_files") or []) for v in vols]


def check_4d_size(case, shape3d: tuple[int, ...], count: int) -> None:
    """All volumes of a 4D case together within ``MEDLDM_MAX_VOXELS`` (each was checked on its own)."""
    total = math.prod(shape3d) * count
    if total > max_voxels():
        raise CaseError(case.source or case.id, f"{count} volumes of {'x'.join(map(str, shape3d))} voxels ({total:,}) "
                                                 f"exceed medldm's limit of {max_voxels():,} voxels (MEDLDM_MAX_VOXELS)",
                        "process one volume at a time with --volume K, or raise MEDLDM_MAX_VOXELS")


def stack_volumes(vols: list):
    """One 4D scan ``(X, Y, Z, T)`` from 3D results on one grid (same shape and affine): a MetaTensor, or a
    :class:`~medldm.io.reader.ScanArray` when given those; meta from the first, with ``volume_sources`` (each
    volume's source files, for a derived DICOM series) and ``original_ndim`` 4. One volume is returned as it is."""
    if len(vols) == 1:
        return vols[0]
    a0 = np.asarray(vols[0].affine, dtype=np.float64)
    for k, v in enumerate(vols[1:], 1):
        if tuple(v.shape) != tuple(vols[0].shape) or not np.allclose(np.asarray(v.affine, np.float64), a0, atol=1e-4):
            src = (vols[0].meta or {}).get("filename_or_obj", "<image>")
            raise CaseError(src, f"volume {k} is on another grid than volume 0 ({tuple(v.shape)} vs "
                                 f"{tuple(vols[0].shape)})", "process the volumes one by one with --volume K")
    meta = {k: v for k, v in dict(vols[0].meta).items() if k not in ("affine", "original_affine", "spatial_shape")}
    meta["original_ndim"] = 4
    meta["volume_sources"] = [list((v.meta or {}).get("source_files") or []) for v in vols]
    if not hasattr(vols[0], "detach"):  # ScanArray: numpy only
        return ScanArray(np.stack([np.asarray(v.data, dtype=np.float32) for v in vols], axis=-1), a0, meta)
    import torch
    from monai.data import MetaTensor

    data = torch.stack([torch.as_tensor(v).float() for v in vols], dim=-1)
    return MetaTensor(data.contiguous(), affine=torch.as_tensor(a0), meta=meta)


def count_volumes(case) -> int:
    """How many volumes a :class:`~medldm.io.discover.Case` holds (4D NIfTI: the 4th dimension; a DICOM series: the
    images per slice position, i.e. time points, b-values, echoes), from the headers alone; 1 for a 3D scan. A case
    whose volumes cannot be told apart (uneven images per position) counts 1: reading it then says why."""
    if case.error is not None:
        raise case.error
    if case.kind == "nifti":
        import nibabel as nib

        try:
            shape = tuple(int(s) for s in nib.load(str(case.paths[0])).shape)
        except Exception:  # the read reports it
            return 1
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        return shape[3] if len(shape) == 4 else 1
    paths = [Path(p) for p in case.paths]
    frames, *_ = _dicom_frames(paths, str(case.source or paths[0]), case.headers)
    return volume_count(frames)


#: header attributes that tell a 4D series' volumes apart, in the order ``medldm info`` names them by
VOLUME_ATTRIBUTES = (("b-value", ("DiffusionBValue", (0x0043, 0x1039), (0x0019, 0x100C))),
                     ("echo time", ("EchoTime",)), ("inversion time", ("InversionTime",)),
                     ("time point", ("TemporalPositionIdentifier", "AcquisitionNumber", "AcquisitionTime",
                                     "TriggerTime", "InstanceNumber")))


def _header_number(ds, key) -> float | None:
    try:
        v = ds[key].value if not isinstance(key, str) else ds.get(key)
    except KeyError:
        return None
    if isinstance(v, bytes):
        v = v.decode("latin-1", "replace").strip("\x00 ").split("\\")[0]
    if v is not None and not isinstance(v, str | bytes) and hasattr(v, "__len__"):
        v = v[0] if len(v) else None
    try:
        f = float(str(v).strip()) if v is not None and str(v).strip() else None
    except ValueError:
        return None
    return f if f is not None and np.isfinite(f) else None


def describe_volumes(case) -> dict:
    """What the volumes of a case are: ``{"volumes": n}`` plus, for a DICOM series, ``"varies"`` (the attribute
    that differs between volumes: b-value, echo time, inversion time or time point) and its ``"values"`` per volume,
    and ``"form"`` (``classic`` single-frame files or ``enhanced multi-frame``)."""
    if case.kind == "nifti" or case.error is not None:
        return {"volumes": count_volumes(case)}
    paths = [Path(p) for p in case.paths]
    frames, _, _, n_multi, headers = _dicom_frames(paths, str(case.source or paths[0]), case.headers)
    n = volume_count(frames)  # the frame list built once (count_volumes would build it again)
    out: dict = {"volumes": n}

    out["form"] = "enhanced multi-frame" if n_multi else \
        "Siemens mosaic" if any(is_mosaic(h) for h in headers) else "classic"
    if n <= 1:
        return out
    by_path = {str(p): h for p, h in zip(paths, headers, strict=True)}
    first = [frames[g[0]] for g in volume_groups(frames)]  # each volume's first image
    for name, keys in VOLUME_ATTRIBUTES:
        for key in keys:
            vals = [_header_number(by_path.get(f.source.split("#frame")[0]), key) for f in first]
            # diffusion: some volume has b > 0 (b0 volumes may carry none; GE writes b = 0 into every fMRI image)
            if name == "b-value" and any(v for v in vals):
                out.update(varies="diffusion (b-values)", values=[v or 0.0 for v in vals])
                return out
            if all(v is not None for v in vals) and len(set(vals)) > 1:
                out.update(varies=name, values=vals)
                return out
    out["varies"] = "unknown (no header attribute differs between the volumes)"
    return out
