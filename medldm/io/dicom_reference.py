"""The source series of a derived DICOM series (:func:`medldm.io.dicom_write.save_dicom_series`): its headers
(:func:`load_reference`; an enhanced multi-frame object as one classic-like header per frame, :func:`frame_headers`),
which source slices each output slice copies and references (:func:`_nearest`), their encoding and burned-in
annotation, and the private diffusion attributes a derived slice keeps (:data:`DIFFUSION_PRIVATE`)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medldm.io.dicom import drop_command_set
from medldm.io.errors import CaseError

log = logging.getLogger("medldm.io.dicom_write")  # the writer's messages, as before the split


def load_reference(reference: str | os.PathLike | Sequence, where: object) -> list[Dataset]:
    """Headers (no pixels) of the reference series: a folder, a file, or a list of files."""
    if isinstance(reference, str | os.PathLike):
        p = Path(reference)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        strict = not p.is_dir()
    else:
        files, strict = [Path(f) for f in reference], True
    headers = []
    for f in files:
        try:
            ds = drop_command_set(pydicom.dcmread(f, stop_before_pixels=True, force=not strict))
        except Exception as e:  # a folder may hold non-DICOM files
            if strict:
                raise CaseError(f, f"cannot read reference DICOM file ({e})", "check --reference") from e
            continue
        if "Rows" in ds and "SOPInstanceUID" in ds:
            ds.filename = str(f)
            headers.append(ds)
    if not headers:
        raise CaseError(reference if isinstance(reference, str | os.PathLike) else where,
                        "no DICOM image found in the reference", "pass the source series folder or files")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        raise CaseError(headers[0].filename, f"the reference holds {len(series)} series",
                        "pass the folder or files of one series only")
    headers.sort(key=_sort_key)
    orients = [np.asarray(ds.ImageOrientationPatient, float) for ds in headers if "ImageOrientationPatient" in ds]
    if orients and np.max(np.abs(np.array(orients) - orients[0])) > 1e-3:
        raise CaseError(headers[0].filename, "the reference series holds slices of several orientations (stacks)",
                        "pass the files of the one stack the image came from (img.meta['source_files'])")
    for ds in headers:
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise CaseError(ds.filename, "the reference is a colour image",
                            "derived series are written from grey-scale references only; convert without --reference")
        if (int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds) \
                and str(ds.SOPClassUID) not in CLASSIC_OF_ENHANCED:
            raise CaseError(ds.filename, f"the reference is a multi-frame {ds.SOPClassUID.name} object",
                            "derived series are written from single-frame or enhanced CT / MR references; "
                            "convert without --reference")
    return [f for ds in headers for f in frame_headers(ds)]


#: the classic (single-frame) storage class a derived series of an enhanced multi-frame source is written in
CLASSIC_OF_ENHANCED = {"1.2.840.10008.5.1.4.1.1.4.1": "1.2.840.10008.5.1.4.1.1.4",  # Enhanced MR -> MR Image
                       "1.2.840.10008.5.1.4.1.1.2.1": "1.2.840.10008.5.1.4.1.1.2"}  # Enhanced CT -> CT Image


def frame_headers(ds: Dataset) -> list[Dataset]:
    """A single-frame header per frame of an enhanced multi-frame object (``ds`` itself for a single-frame one): the
    top level without the functional groups, then each frame's shared and per-frame group attributes (position,
    orientation, pixel spacing, thickness, echo / diffusion / timing, rescale) at the top level, and the classic
    SOP class. Derived slices are written from these as from classic headers; each keeps which object and frame it
    came from (``medldm_source``: SOP class, SOP instance, frame number) for its SourceImageSequence."""
    if not (int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds):
        return [ds]
    skip = {"PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "NumberOfFrames"}
    base = Dataset()
    for elem in ds:
        if elem.keyword not in skip:
            base.add(copy.deepcopy(elem))
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    classic = CLASSIC_OF_ENHANCED[str(ds.SOPClassUID)]
    is_mr = classic == "1.2.840.10008.5.1.4.1.1.4"
    out = []
    for k in range(max(int(ds.get("NumberOfFrames", 1) or 1), len(per))):
        h = copy.deepcopy(base)
        found: dict[str, object] = {}
        for group in (shared, per[k] if k < len(per) else None):
            for macro in (group or []):
                if macro.VR == "SQ" and macro.value:
                    _collect(macro.value[0], found)
        for key, value in found.items():
            setattr(h, _AS_CLASSIC.get(key, key), value)
        if "InPlanePhaseEncodingDirection" in h:  # enhanced COLUMN / ROW / OTHER -> classic COL / ROW / ""
            h.InPlanePhaseEncodingDirection = {"COLUMN": "COL", "ROW": "ROW"}.get(
                str(h.InPlanePhaseEncodingDirection).upper(), "")
        if is_mr:  # the MR Image module's type 1 / 2 attributes the enhanced IOD words differently
            epi = str(ds.get("EchoPlanarPulseSequence", "")).upper() == "YES"
            pulse = str(ds.get("EchoPulseSequence", "")).upper()
            h.ScanningSequence = h.get("ScanningSequence") or (
                "EP" if epi else {"SPIN": "SE", "GRADIENT": "GR"}.get(pulse, "RM"))
            h.SequenceVariant = h.get("SequenceVariant") or "NONE"
            for key in ("ScanOptions", "MRAcquisitionType", "EchoTime", "RepetitionTime", "EchoTrainLength"):
                if key not in h:
                    setattr(h, key, "")
        h.SOPClassUID = classic
        h.filename = f"{getattr(ds, 'filename', '')}#frame{k + 1}"
        h.medldm_source = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), k + 1)
        out.append(h)
    return out


#: attributes a derived classic slice takes from an enhanced source's functional group macros (as they are, or
#: under their classic name): geometry, rescale and window, and the acquisition values that tell volumes apart
_FROM_MACROS = {"ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter",
                "WindowWidth", "EffectiveEchoTime", "RepetitionTime", "FlipAngle", "EchoTrainLength", "InversionTimes",
                "DiffusionBValue", "DiffusionGradientOrientation", "TemporalPositionIndex", "NominalCardiacTriggerDelayTime",
                "MRAcquisitionType", "InPlanePhaseEncodingDirection"}
_AS_CLASSIC = {"EffectiveEchoTime": "EchoTime", "InversionTimes": "InversionTime",
               "TemporalPositionIndex": "TemporalPositionIdentifier", "NominalCardiacTriggerDelayTime": "TriggerTime"}


def _collect(item: Dataset, found: dict) -> None:
    """The :data:`_FROM_MACROS` values in a functional group macro item (and the sequences nested in it, e.g. the
    diffusion gradient direction)."""
    for elem in item:
        if elem.VR == "SQ":
            for sub in elem.value[:1]:
                _collect(sub, found)
        elif elem.keyword in _FROM_MACROS and elem.value not in (None, ""):
            value = elem.value
            if elem.keyword == "InversionTimes" and not isinstance(value, int | float):
                value = value[0] if len(value) else ""
            found[elem.keyword] = copy.deepcopy(value)


def header_int(value, default: int = 0) -> int:
    """An IS value as written by real scanners ("5", "5.0", " 12 ", empty, a list) as an int; ``default`` when it
    holds no whole number. Writers read such numbers from the source, so a "5.0" never fails a run."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        f = float(str(value).strip()) if value is not None and str(value).strip() else None
    except ValueError:
        return default
    return int(f) if f is not None and np.isfinite(f) and f == int(f) else default


def _sort_key(ds: Dataset) -> tuple[float, int]:
    """Position along the slice's own normal (then InstanceNumber): the order the reader uses."""
    try:
        o = np.asarray(ds.ImageOrientationPatient, float)
        d = float(np.dot(np.asarray(ds.ImagePositionPatient, float), np.cross(o[:3], o[3:])))
    except (AttributeError, TypeError, ValueError):
        d = 0.0
    return d, header_int(ds.get("InstanceNumber", 0))


def _nearest(headers: list[Dataset], grid, nz: int) -> tuple[list[int], list[list[int]]]:
    """Per output slice: the reference slice whose header it copies (the nearest by position along the
    normal), and the reference slices it is derived from (its SourceImageSequence): only parallel ones
    within half the larger of the two slice spacings. A source slice at another position (e.g. across
    a gap in the reference) is never referenced."""
    n = len(headers)
    try:
        pr = np.array([np.dot(np.asarray(ds.ImagePositionPatient, float), grid.normal) for ds in headers])
        normals = []
        for ds in headers:
            o = np.asarray(ds.ImageOrientationPatient, float)
            nn = np.cross(o[:3], o[3:])
            normals.append(nn / np.linalg.norm(nn))
    except (AttributeError, TypeError, ValueError, IndexError):  # no geometry: by index, references only 1:1
        if n == nz:
            return list(range(nz)), [[k] for k in range(nz)]
        return [min(n - 1, max(0, round((k + 0.5) * n / nz - 0.5))) for k in range(nz)], [[] for _ in range(nz)]
    pk = np.array([np.dot(grid.position(k), grid.normal) for k in range(nz)])
    nearest = [int(np.argmin(np.abs(pr - p))) for p in pk]
    spacings = [s for s in (_ref_spacing(headers, grid.normal), grid.spacing if nz > 1 else None) if s]
    # a source slice is referenced when it lies within the output slice's slab, or the output slice centre
    # within the source slice's slab (interpolated from it); a slice one step away is never referenced
    tol = 0.5 * max(spacings) * (1 + 1e-6) + 1e-4 if spacings else 1e-3
    parallel = [1.0 - abs(float(nn @ grid.normal)) <= 1e-6 for nn in normals]
    sources = [[i for i in range(n) if parallel[i] and abs(pr[i] - p) <= tol] for p in pk]
    return nearest, sources


def _ref_spacing(headers: list[Dataset], normal: np.ndarray) -> float | None:
    try:
        pr = np.sort([np.dot(np.asarray(ds.ImagePositionPatient, float), normal) for ds in headers])
    except (AttributeError, TypeError, ValueError):
        return None
    d = np.diff(pr)
    d = d[d > 1e-4]
    if d.size:
        return float(np.median(d))
    st = headers[0].get("SliceThickness")
    return float(st) if st not in (None, "") else None


def _ref_encoding(headers: list[Dataset]) -> tuple[float, float, bool] | None:
    try:
        encs = {(float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0),
                 int(ds.get("PixelRepresentation", 0)) == 1) for ds in headers}
    except (TypeError, ValueError):
        return None
    enc = encs.pop() if len(encs) == 1 else None
    return enc if enc is not None and np.isfinite(enc[0]) and np.isfinite(enc[1]) and enc[0] != 0 else None


def _burned_in(headers: list[Dataset], deid, out_dir: object) -> str | None:
    """BurnedInAnnotation of the derived series: ``YES`` when any reference slice says YES (the text is
    in the pixels medldm processed, so it is still there; a warning, and refused with ``deidentify``),
    ``NO`` when the reference says NO, else absent (medldm adds no text to pixels)."""
    vals = {str(ds.get("BurnedInAnnotation", "") or "").strip().upper() for ds in headers}
    if "YES" in vals:
        if deid is not None:
            raise CaseError(headers[0].filename if hasattr(headers[0], "filename") else out_dir,
                            "the reference marks BurnedInAnnotation YES: text burned into the pixels "
                            "(names, dates) survives in the derived images and header de-identification "
                            "cannot remove it",
                            "remove the burned-in text from the images first, or write without --deidentify")
        log.warning("%s: the reference series has burned-in annotation (BurnedInAnnotation YES): the derived "
                    "images still show it; BurnedInAnnotation YES is kept", out_dir)
        return "YES"
    return "NO" if "NO" in vals else None


#: Private elements that carry a volume's diffusion encoding where the vendor keeps it outside the standard tags
#: (DiffusionBValue (0018,9087) and DiffusionGradientOrientation (0018,9089) are public and copied anyway):
#: (group, private creator, element offsets), the ones dcm2niix reads for bval/bvec. Without them a derived GE or
#: Siemens DWI series came back from dcm2niix without bval/bvec.
DIFFUSION_PRIVATE = (
    (0x0019, "GEMS_ACQU_01", (0xBB, 0xBC, 0xBD)),  # GE gradient direction
    (0x0043, "GEMS_PARM_01", (0x39,)),  # GE b-value (first value)
    (0x0019, "SIEMENS MR HEADER", (0x0C, 0x0D, 0x0E, 0x27)),  # Siemens b-value, directionality, direction, B matrix
    (0x2001, "Philips Imaging DD 001", (0x03, 0x04, 0x0B)),  # Philips b-value, direction, slice orientation
    (0x2005, "Philips MR Imaging DD 001", (0xB0, 0xB1, 0xB2)),  # Philips gradient direction
)


def _copy_diffusion_private(ref: Dataset, ds: Dataset) -> None:
    """Copy the :data:`DIFFUSION_PRIVATE` elements ``ref`` has into ``ds`` (same creator; de-identification,
    applied after, removes private tags again)."""
    for group, creator, offsets in DIFFUSION_PRIVATE:
        try:
            src = ref.private_block(group, creator)
        except KeyError:
            continue
        dst = None
        for off in offsets:
            if off in src:
                elem = src[off]
                dst = dst or ds.private_block(group, creator, create=True)
                dst.add_new(off, elem.VR, copy.deepcopy(elem.value))
