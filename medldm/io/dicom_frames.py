"""Turn DICOM objects into :class:`~medldm.io.dicom_series.Frame` records: one per single-frame
image, one per frame of a multi-frame object (enhanced CT/MR with functional groups, or plain
multi-frame such as ``emri_small.dcm``)."""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medldm.io.dicom import (
    SliceGeom,
    _floats,
    check_pixel_size,
    decode_pixels,
    n_frames,
    orientation,
    rescale,
    rescale_params,
    slice_geometry,
    thickness,
)
from medldm.io.dicom_series import Frame
from medldm.io.errors import CaseError


def _num(v, default=0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _tiebreak(ds: Dataset) -> tuple:
    """Orders images that share a position: time point, acquisition, echo, trigger, instance."""
    return (
        _num(ds.get("TemporalPositionIdentifier", 0)),
        _num(ds.get("AcquisitionNumber", 0)),
        _num(ds.get("EchoNumbers", 0)),
        _num(ds.get("TriggerTime", 0)),
        _num(ds.get("InstanceNumber", 0)),
    )


def _check_image_header(path: str | Path, ds: Dataset) -> list[str]:
    """Header checks done before any pixel is read (sizes, rescale); returns warnings."""
    if "Rows" not in ds or "Columns" not in ds:
        raise CaseError(path, "image object without Rows/Columns: the header is incomplete",
                        "copy the file again from the source (or remove it)")
    check_pixel_size(ds, path)
    return [] if "ModalityLUTSequence" in ds else rescale_params(ds, path)[2]


PHILIPS_PRIVATE = "Philips MR Imaging DD 001"
PHILIPS_NOTE = ("Philips: floating-point values (display value / (RescaleSlope x MRScaleSlope)), as dcm2niix writes "
                "them; MEDLDM_PHILIPS_SCALING=display for the display values")


def philips_scaling() -> str:
    """``$MEDLDM_PHILIPS_SCALING``: ``float`` (default, dcm2niix's default) or ``display``."""
    v = os.environ.get("MEDLDM_PHILIPS_SCALING", "float").strip().lower() or "float"
    if v not in ("float", "display"):
        raise CaseError(f"MEDLDM_PHILIPS_SCALING={v!r}", "not a Philips scaling", "set it to float or display")
    return v


def _philips_item(per: Dataset | None) -> Dataset | None:
    """The Philips private per-frame item (a sequence in group 2005) of an enhanced frame, if any."""
    for elem in (per or []):
        if elem.tag.group == 0x2005 and elem.VR == "SQ" and elem.value:
            return elem.value[0]
    return None


def philips_float_factor(ds: Dataset, item: Dataset | None, path, slope: float | None = None) -> float | None:
    """Philips MR stores a scale slope (MRScaleSlope, private 2005,100E of "Philips MR Imaging DD 001") beside the
    rescale: the floating-point value is the display value / (RescaleSlope x MRScaleSlope). dcm2niix writes these
    by default (``UsePhilipsFloatNotDisplayScaling``); so does medldm unless ``MEDLDM_PHILIPS_SCALING=display``.
    Returns the factor to multiply display values by, or None (not Philips, no scale slope, display asked for)."""
    if item is None or "philips" not in str(ds.get("Manufacturer", "")).lower() or philips_scaling() == "display":
        return None
    try:
        ss = float(item.private_block(0x2005, PHILIPS_PRIVATE)[0x0E].value)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if slope is None:
        try:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        except (TypeError, ValueError):
            slope = 1.0
    if not (np.isfinite(ss) and ss > 0 and np.isfinite(slope) and slope > 0) or ss * slope == 1.0:
        return None
    return 1.0 / (slope * ss)


def single_frame(path: str | Path, ds: Dataset) -> Frame:
    """A Frame for a single-frame image file (pixels decoded lazily from ``ds``)."""
    warns = _check_image_header(path, ds)

    fp = philips_float_factor(ds, ds, path)

    def pixels():
        stored = decode_pixels(ds, path)[0]
        vals, changed = rescale(stored, ds, path)
        if fp is not None:
            return np.asarray(vals, np.float64) * fp, stored.dtype, True
        return vals, stored.dtype, changed

    geom = slice_geometry(ds)
    geom.warnings.extend(warns)  # the same text for every slice: reported once per volume
    if fp is not None:
        geom.warnings.append(PHILIPS_NOTE)
    return Frame(str(path), geom, (int(ds.Rows), int(ds.Columns)), pixels,
                 uid=str(ds.get("SOPInstanceUID", "")), tiebreak=_tiebreak(ds))


def _item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None or keyword not in seq_owner:
        return None
    seq = seq_owner[keyword].value
    return seq[0] if seq else None


def _fg(per: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro for one frame: per-frame first, shared otherwise."""
    return _item(per, keyword) or _item(shared, keyword)


def multi_frame(path: str | Path, ds: Dataset) -> list[Frame]:
    """Frames of a multi-frame object, with per-frame geometry and rescale where the headers give them.

    Without functional groups, frames are placed along the normal of the top-level orientation
    (or the z axis) at SpacingBetweenSlices / SliceThickness, with a warning.
    """
    top_warns = _check_image_header(path, ds)
    nf = n_frames(ds)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_seq = list(ds.PerFrameFunctionalGroupsSequence) if "PerFrameFunctionalGroupsSequence" in ds else []
    shape = (int(ds.Rows), int(ds.Columns))

    @lru_cache(maxsize=1)
    def decoded() -> np.ndarray:
        return decode_pixels(ds, path)

    frames = []
    top = slice_geometry(ds)
    for k in range(nf):
        per = per_seq[k] if k < len(per_seq) else None
        warns: list[str] = []
        pm = _fg(per, shared, "PixelMeasuresSequence")
        po = _fg(per, shared, "PlaneOrientationSequence")
        pp = _fg(per, shared, "PlanePositionSequence")
        pv = _fg(per, shared, "PixelValueTransformationSequence")
        if pm is not None and _floats(pm.get("PixelSpacing", None) or [], 2) is not None:
            ps = _floats(pm.PixelSpacing, 2)
            spacing = (float(ps[1]), float(ps[0]))
            th = thickness(pm)
        else:
            spacing, th = top.spacing, top.thickness
            warns = list(top.warnings)
        row, col = orientation(po.get("ImageOrientationPatient", None), f"{path}#frame{k + 1}") \
            if po is not None else (None, None)
        if row is None and top.row_cos is not None:
            row, col = top.row_cos, top.col_cos
        pos = _floats(pp.get("ImagePositionPatient", None) or [], 3) if pp is not None else None
        if pos is None and top.position is not None and row is not None:
            step = th if th else 1.0
            pos = top.position + k * step * np.cross(row, col)
            if k == 0:
                warns.append(f"multi-frame without per-frame positions: frames placed {step:g} mm apart "
                             "along the normal (from SpacingBetweenSlices/SliceThickness)")
        if pos is None and row is None:
            row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
            step = _num(ds.get("SpacingBetweenSlices", 0)) or th or 1.0
            pos = np.array([0.0, 0.0, k * step])
            if k == 0:
                warns.append(f"multi-frame without patient geometry: identity orientation, frames {step:g} mm "
                             "apart (from SpacingBetweenSlices/SliceThickness or 1 mm)")
        if k == 0:
            warns.extend(top_warns)
        slope = inter = None
        if pv is not None:
            slope, inter, pv_warns = rescale_params(pv, f"{path} (frame {k + 1})")
            if k == 0:
                warns.extend(pv_warns)
        geom = SliceGeom(pos, row, col, spacing, th, warns)
        content = _item(per, "FrameContentSequence")
        # the object's own order first: one enhanced file per volume (Siemens XA) puts its frames after the earlier
        # files' at the same positions
        tb = (*_tiebreak(ds), _num(content.get("TemporalPositionIndex", 0)) if content is not None else 0.0, float(k))

        fp = philips_float_factor(ds, _philips_item(per), path, slope)
        if fp is not None and k == 0:
            warns.append(PHILIPS_NOTE)

        def pixels(k=k, slope=slope, inter=inter, fp=fp):
            stored = decoded()[k]
            if fp is not None:
                vals = stored * slope + inter if slope is not None else rescale(stored, ds, path)[0]
                return np.asarray(vals, np.float64) * fp, stored.dtype, True
            if slope is not None and (slope != 1.0 or inter != 0.0):
                if np.issubdtype(stored.dtype, np.integer) and slope.is_integer() and inter.is_integer():
                    return stored.astype(np.int64) * int(slope) + int(inter), stored.dtype, True
                return stored * slope + inter, stored.dtype, True
            if slope is None:
                vals, changed = rescale(stored, ds, path)
                return vals, stored.dtype, changed
            return stored, stored.dtype, False

        frames.append(Frame(f"{path}#frame{k}", geom, shape, pixels, uid="", tiebreak=tb))
    return frames


def is_mosaic(ds: Dataset) -> bool:
    """A Siemens mosaic: the slices of one volume tiled in one image (ImageType MOSAIC)."""
    return "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType", None) or [])]


def mosaic_frames(path: str | Path, ds: Dataset) -> list[Frame]:
    """The slices of a Siemens mosaic as frames, with dcm2niix's geometry: the number of slices
    (NumberOfImagesInMosaic) and the slice normal from the CSA image header, the first slice's position corrected
    from the mosaic's ImagePositionPatient (which names the corner of the whole tiled image), the slices spaced by
    SpacingBetweenSlices (else SliceThickness) along the normal. nibabel's ``nicom`` reads the CSA header
    (``MosaicWrapper``). Slice k is tile k of the mosaic, row by row."""
    warns = _check_image_header(path, ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental on import
            from nibabel.nicom import dicomwrappers

            w = dicomwrappers.MosaicWrapper(ds)
            n, size = int(w.n_mosaic), int(w.mosaic_size)
            first, normal = np.asarray(w.image_position, float), np.asarray(w.slice_normal, float)
            step = float(w.voxel_sizes[2])
    except Exception as e:  # no or damaged CSA header
        raise CaseError(path, f"Siemens mosaic whose CSA header cannot be read ({type(e).__name__}: {e}): the "
                              "number of slices and their positions are unknown",
                        "convert the series with dcm2niix and give medldm the NIfTI file") from e
    rows, cols = int(ds.Rows) // size, int(ds.Columns) // size
    if n < 1 or n > size * size or rows < 1 or cols < 1:
        raise CaseError(path, f"Siemens mosaic of {n} slices in a {size} x {size} grid of {ds.Rows} x {ds.Columns} "
                              "pixels does not add up", "convert the series with dcm2niix")
    top = slice_geometry(ds)
    top.warnings.extend(warns)

    @lru_cache(maxsize=1)
    def decoded():
        stored = decode_pixels(ds, path)[0]
        vals, changed = rescale(stored, ds, path)
        return vals, stored.dtype, changed

    def tile(k: int):
        vals, dt, changed = decoded()
        r, c = divmod(k, size)
        return vals[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols], dt, changed

    sop = str(ds.get("SOPInstanceUID", ""))
    return [Frame(f"{path}#frame{k + 1}", SliceGeom(first + k * step * normal, top.row_cos, top.col_cos, top.spacing,
                                                      top.thickness, list(top.warnings)),
                  (rows, cols), lambda k=k: tile(k), uid=f"{sop}#{k + 1}", tiebreak=_tiebreak(ds))
            for k in range(n)]


def frames_of(path: str | Path, ds: Dataset) -> list[Frame]:
    """All frames of one DICOM object (a Siemens mosaic: its slices)."""
    if n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return multi_frame(path, ds)
    if is_mosaic(ds):
        return mosaic_frames(path, ds)
    return [single_frame(path, ds)]
