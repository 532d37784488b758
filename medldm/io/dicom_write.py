"""Write a volume as a DICOM series (one file per slice, Explicit VR Little Endian, uncompressed).

* With a ``reference`` (the source series' files, e.g. ``img.meta["source_files"]``, or its folder):
  a DERIVED series of the same patient and study — new Series/SOP Instance UIDs, ImageType
  ``DERIVED\\SECONDARY\\...``, SeriesDescription ``<original> [medldm <description>]``, per-slice
  headers copied from the nearest reference slice (so a grid with more or fewer slices works) with
  geometry, pixels, rescale and window recomputed (see docs/io_writing.md).
* Without a reference: a new anonymous patient/study/series (no identifiers of any real patient);
  CT Image Storage for CT, Secondary Capture (with the geometry kept as extra tags) otherwise.

Geometry always comes from ``img.affine`` (RAS, converted to LPS): ImagePositionPatient for every
slice, ImageOrientationPatient, PixelSpacing (row spacing \\ column spacing), SliceThickness,
SpacingBetweenSlices. Slices are written in ascending order along ``row_cos x col_cos``; a volume
whose slice axis points the other way is flipped along k first (same image in world space).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import DSfloat

from medldm import __version__
from medldm.io.atomic import atomic_dir
from medldm.io.deidentify import Deidentifier
from medldm.io.dicom_frames import is_mosaic
from medldm.io.dicom_headers import add_software, clean_reference, new_series_header, now, patient_orientation
from medldm.io.dicom_pixels import Encoding, choose_encoding
from medldm.io.dicom_reference import (  # noqa: F401 (load_reference, header_int: part of the writer's interface)
    _burned_in,
    _copy_diffusion_private,
    _nearest,
    _ref_encoding,
    _ref_spacing,
    header_int,
    load_reference,
)
from medldm.io.dicom_uids import (  # noqa: F401 (derived_series_uid, provenance_key: part of the writer's interface)
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    derived_series_uid,
    derived_uid,
    new_uid,
    provenance_key,
)
from medldm.io.errors import CaseError
from medldm.io.geometry import ras_to_lps

log = logging.getLogger(__name__)

#: Code for SourceImageSequence items (DCM 121322, CID 7202).
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
#: PurposeOfReferenceCodeSequence of medldm's ContributingEquipmentSequence item (CID 7005 "Contributing
#: Equipment Purposes of Reference"): DCM 109102 "Processing Equipment", the equipment that processed the source
#: images into new instances. Not 109103 "Modifying Equipment", which edits attributes of an existing instance
#: without creating a new one. (CID 7005 has no "Processing Algorithm" code; 109102 is the one IHE AI Results uses
#: for the software that produced derived images.)
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")
#: Said by every derived series' SeriesDescription (within its 64 characters).
RESEARCH_NOTE = "research use only"


@dataclass
class Grid:
    """Slice geometry in LPS: voxel (i, j, k) -> ``origin + i*dx*row_cos + j*dy*col_cos + k*step``."""

    row_cos: np.ndarray  # (3,) direction of increasing column index i
    col_cos: np.ndarray  # (3,) direction of increasing row index j
    dx: float  # column spacing (along i)
    dy: float  # row spacing (along j)
    step: np.ndarray  # (3,) LPS offset from slice k to k+1 (may have an in-plane part: tilt/shear)
    origin: np.ndarray  # (3,) LPS centre of voxel (0, 0, 0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)

    @property
    def spacing(self) -> float:
        """Distance between slice planes (mm)."""
        return float(np.dot(self.step, self.normal))

    def position(self, k: int) -> np.ndarray:
        return self.origin + k * self.step


def grid_from_affine(vol: np.ndarray, affine: np.ndarray, where: object) -> tuple[np.ndarray, Grid]:
    """``(vol, grid)`` with ``vol`` (X, Y, Z) flipped along k if needed so slices ascend along the normal."""
    a = ras_to_lps(affine)
    dx, dy = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
    if dx <= 0 or dy <= 0:
        raise CaseError(where, "the affine has a zero-length axis", "fix the image geometry before writing DICOM")
    row_cos, col_cos = a[:3, 0] / dx, a[:3, 1] / dy
    if abs(float(np.dot(row_cos, col_cos))) > 1e-4:
        raise CaseError(where, "the in-plane axes of the affine are not perpendicular (sheared grid)",
                        "DICOM cannot store it; resample to an orthogonal grid or write NIfTI instead")
    normal = np.cross(row_cos, col_cos)
    step = a[:3, 2].copy()
    origin = a[:3, 3].copy()
    nz = vol.shape[2]
    along = float(np.dot(step, normal))
    if nz > 1 and abs(along) < 1e-6 * max(1.0, float(np.linalg.norm(step))):
        raise CaseError(where, "the slice axis of the affine lies in the image plane",
                        "fix the image geometry before writing DICOM")
    if nz == 1:  # a single slice: its step is only a thickness
        step = normal * max(abs(along), float(np.linalg.norm(step)))
    elif along < 0:
        vol = vol[:, :, ::-1]
        origin = origin + (nz - 1) * step
        step = -step
    return vol, Grid(row_cos, col_cos, dx, dy, step, origin)


def _ds(x: float) -> DSfloat:
    return DSfloat(float(x), auto_format=True)


def _dslist(v) -> list[DSfloat]:
    return [_ds(x) for x in v]


def _window(vol: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(vol, [0.5, 99.5]) if vol.size else (0.0, 1.0)
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))  # width >= 1 (PS3.3 C.11.2.1.2)


def _described(old: str, description: str, n: int = 64) -> str:
    """``<old> [medldm <description>] research use only`` within ``n`` characters (LO): the old text is
    shortened first, then the description (a leading ``medldm`` in it is not repeated)."""
    description = description.strip()
    if description.lower().startswith("medldm "):
        description = description[7:].strip()
    note = f" {RESEARCH_NOTE}"
    tag = f"[medldm {description}]"
    if len(tag) + len(note) > n:
        tag = tag[: n - len(note) - 1] + "]"
    tag += note
    room = n - len(tag) - 1
    old = old.strip()[: max(room, 0)].rstrip()
    return f"{old} {tag}" if old else tag


def save_dicom_series(img, out_dir: str | os.PathLike, *, reference=None, description: str = "medldm",
                      modality: str | None = None, replace: bool = True, owned=None,
                      deidentify=False, provenance: dict | None = None) -> list[Path]:
    """Write ``img`` (MetaTensor (X, Y, Z), scanner units, ``.affine`` RAS) as a DICOM series in
    ``out_dir`` (appears atomically); returns the written files ``IM00001.dcm`` ... in slice order. An existing
    non-empty ``out_dir`` is replaced only when ``replace`` and ``owned(out_dir)`` (default: it holds only
    DICOM files medldm wrote; see ``medldm.io.atomic.atomic_dir``), else FileExistsError.

    ``reference``: files (sorted like the reader does) or folder of the source series -> a derived
    series of that patient/study; None -> a new anonymous series. ``modality`` (no reference only):
    default ``img.meta["modality"]``, ``OT`` when unknown. Reference files are only read.

    ``deidentify``: False, True, or a :class:`medldm.io.deidentify.Deidentifier` (a secret shared by the
    series of one run): every header is passed through the DICOM PS3.15 basic confidentiality profile
    (see docs/io.md); True uses the process-wide secret, so the series written by one run share
    consistent new Study / Frame of Reference UIDs. A reference with BurnedInAnnotation YES is then refused.

    ``provenance`` (default ``img.meta["provenance"]``): what made the pixels, e.g. ``{"model": "mr-denoise-2d",
    "model_hash": "...", "task": "denoise", "steps": 2, "sampler": "ddim", "seed": 0}`` (any JSON-able values;
    ``"key"``: the options key, default the whole dict). It goes into DerivationDescription and the
    ContributingEquipmentSequence item (IHE AI Results, see docs/io_writing.md), and, with a reference, makes the
    Series and SOP Instance UIDs deterministic (:func:`derived_series_uid`): the same source series processed
    with the same model and options gets the same UIDs, so a PACS store can detect a re-run.
    """
    out_dir = Path(out_dir)
    meta = getattr(img, "meta", {}) or {}
    where = str(meta.get("filename_or_obj", "") or "") or out_dir  # faults of the image name its input
    vol = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
    if vol.ndim == 2:
        vol = vol[:, :, None]
    if vol.ndim == 3:
        vol = vol[..., None]
    if vol.ndim != 4:
        raise CaseError(where, f"expected a (X, Y, Z) volume or (X, Y, Z, T) volumes, got shape {vol.shape}",
                        "select one volume")
    affine = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
    n_vol = vol.shape[3]
    vols = []
    for t in range(n_vol):
        v, grid = grid_from_affine(vol[..., t], affine, where)
        vols.append(v)
    nz = vols[0].shape[2]
    # 4D with a source: ``reference`` holds each volume's source files (meta["volume_sources"]), so volume t is
    # derived from (and references) the source images of volume t
    per_volume = n_vol > 1 and reference is not None and not isinstance(reference, str | os.PathLike)
    if per_volume and len(reference) != n_vol:
        raise CaseError(where, f"{n_vol} volumes but {len(reference)} source volumes", "write the volumes one by one")
    vol_headers = [load_reference(r, out_dir) for r in reference] if per_volume else None
    headers = [h for hs in vol_headers for h in hs] if per_volume else \
        (load_reference(reference, out_dir) if reference is not None else [])
    deid = _deidentifier(deidentify)
    prov = provenance if provenance is not None else meta.get("provenance")
    if prov is not None and not isinstance(prov, dict):
        raise TypeError(f"provenance must be a dict, got {type(prov).__name__}")
    burned = _burned_in(headers, deid, out_dir) if headers else None
    try:
        odt = str(meta.get("original_dtype", "") or "")
        enc = choose_encoding(vol, _ref_encoding(headers) if headers else None,
                              prefer_signed=odt.startswith("int"))
    except ValueError as e:
        raise CaseError(where, f"cannot be written as DICOM: {e}", "fix the image values before writing DICOM") from e
    if enc.max_error > 0:
        log.warning("%s: values stored with RescaleSlope %g: max error %.3g", out_dir, enc.slope, enc.max_error)
    if headers:
        modality = str(headers[0].get("Modality", "OT") or "OT")
    else:
        modality = (modality or str(meta.get("modality", "")) or "OT").upper()
        modality = "OT" if modality in ("UNKNOWN", "") else modality
    series = _series_context(headers, grid, modality, description, vol, prov)
    series.update(deidentify=deid, burned_in=burned)
    # a 4D source whose volumes differ in TriggerTime as a time stamp (Philips fMRI), the time points recorded in
    # TemporalPositionIdentifier too: without the vendor's private dimension tags, a derived series keeping
    # TriggerTime is split by dcm2niix into one series per volume ("trigger time varies"), so it is left out
    drop_trigger = per_volume and all(
        len({str(hs[0].get(k, "")) for hs in vol_headers if hs}) == len(vol_headers)
        for k in ("TriggerTime", "TemporalPositionIdentifier"))
    names = [f"IM{k + 1:05d}.dcm" for k in range(nz * n_vol)]
    with atomic_dir(out_dir, replace=replace, owned=owned) as tmp:
        for t in range(n_vol):
            hs = vol_headers[t] if per_volume else headers
            if len(hs) == 1 and is_mosaic(hs[0]):  # a Siemens mosaic: one file holds every slice of the volume
                nearest, sources = [0] * nz, [[0] for _ in range(nz)]
            else:
                nearest, sources = _nearest(hs, grid, nz) if hs else ([None] * nz, [[] for _ in range(nz)])
            ctx = {**series, "sources": [[hs[i] for i in s] for s in sources], "offset": t * nz}
            for k in range(nz):
                ds = _slice_header(hs[nearest[k]] if hs else None, ctx, grid, k)
                if drop_trigger and "TriggerTime" in ds:
                    del ds.TriggerTime
                _set_pixels(ds, vols[t][:, :, k], enc, modality, series["rescale"])
                _write(ds, tmp / names[t * nz + k])
    return [out_dir / n for n in names]


def _derivation(description: str, prov: dict | None, source_series: str | None) -> str:
    """DerivationDescription (ST, 1024): what medldm did, with which model and options, from which series."""
    what = f"medldm {__version__} {description}"
    if prov:
        parts = []
        if prov.get("task"):
            parts.append(f"task {prov['task']}")
        if prov.get("model"):
            parts.append(f"model {prov['model']}" + (f" (sha256 {prov['model_hash']})" if prov.get("model_hash") else ""))
        for k in ("steps", "sampler", "samples", "seed", "noise_level"):
            if prov.get(k) is not None:
                parts.append(f"{k.replace('_', ' ')} {prov[k]}")
        what += ": " + ", ".join(parts) if parts else ""
    src = f"; pixel data and geometry recomputed from series {source_series}" if source_series else \
        "; written without a DICOM source"
    return (what + src)[:1024]


def _equipment_item(ctx: dict) -> Dataset:
    """medldm's ContributingEquipmentSequence item (SOP Common module, IHE AI Results)."""
    prov = ctx.get("provenance") or {}
    item = Dataset()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROCESSING_EQUIPMENT
    item.PurposeOfReferenceCodeSequence = [code]
    item.Manufacturer = "medldm"
    model = str(prov.get("model") or "").strip()
    h = str(prov.get("model_hash") or "").strip()
    item.ManufacturerModelName = (" ".join(x for x in (model, f"sha256:{h[:16]}" if h else "") if x)
                                  or "medldm")[:64]
    item.SoftwareVersions = str(__version__)
    da, tm = ctx["date"]
    item.ContributionDateTime = da + tm
    item.ContributionDescription = ctx["derivation"]
    return item


def _series_context(headers, grid, modality, description, vol, prov=None) -> dict:
    """Values shared by every slice of the new series."""
    ctx: dict = {"series_uid": new_uid(), "description": description, "date": now(),
                 "rescale": any("RescaleSlope" in ds for ds in headers), "provenance": prov,
                 "deterministic": False}
    ctx["derivation"] = _derivation(description, prov, str(headers[0].SeriesInstanceUID) if headers else None)
    if headers:
        ref = headers[0]
        if prov:
            ctx["series_uid"] = derived_series_uid(str(ref.SeriesInstanceUID), prov,
                                                   [ds.get("SOPInstanceUID", "") for ds in headers])
            ctx["deterministic"] = True
        old = str(ref.get("SeriesDescription", "") or "").strip()
        ctx["series_description"] = _described(old, description)
        ctx["series_number"] = header_int(ref.get("SeriesNumber", 0)) + 1000
        frame = str(ref.get("FrameOfReferenceUID", "") or "")
        if not frame or frame == str(ref.get("StudyInstanceUID", "")):  # missing or invalid in the source
            frame = derived_uid("frame-of-reference", frame or str(ref.get("SeriesInstanceUID", "")))
        ctx["frame_uid"] = frame
        rs = _ref_spacing(headers, grid.normal)
        same_grid = rs is not None and abs(rs - grid.spacing) < 1e-3 * max(1.0, rs)
        st = ref.get("SliceThickness")
        ctx["thickness"] = float(st) if same_grid and st not in (None, "") else grid.spacing
        if modality == "CT" and "WindowCenter" in ref and "WindowWidth" in ref:
            ctx["window"] = {k: ref.get(k) for k in ("WindowCenter", "WindowWidth",
                                                     "WindowCenterWidthExplanation", "VOILUTFunction") if k in ref}
        ctx["base"] = None
    else:
        base = new_series_header(modality)
        base.SOPClassUID = CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage
        base.SeriesDescription = _described("", description)
        ctx["base"] = base
        ctx["thickness"] = grid.spacing
    if "window" not in ctx:
        c, w = _window(vol)
        ctx["window"] = {"WindowCenter": _ds(c), "WindowWidth": _ds(w)}
    return ctx


def _slice_header(ref: Dataset | None, ctx: dict, grid: Grid, k: int) -> Dataset:
    """Header of output slice ``k``: reference (cleaned) or new-series modules, then recomputed values."""
    da, tm = ctx["date"]
    if ref is not None:
        ds = clean_reference(ref)
        ds.SeriesDescription = ctx["series_description"]
        ds.SeriesNumber = ctx["series_number"]
        ds.FrameOfReferenceUID = ctx["frame_uid"]
        if "PositionReferenceIndicator" not in ds:
            ds.PositionReferenceIndicator = ""
        if not ds.get("BodyPartExamined") and "Laterality" not in ds and "ImageLaterality" not in ds:
            ds.Laterality = ""  # Type 2C: required (may be empty) when the body part is unknown
        if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
                "DeidentificationMethod" in ds or "DeidentificationMethodCodeSequence" in ds):
            ds.DeidentificationMethod = "unknown: source marked de-identified without a method"
        old_type = [str(v).strip() for v in (ref.get("ImageType") or [])]
        srcs = ctx.get("sources", [[ref]] * (k + 1))[k]  # only source slices in this slice's plane
        items, insts = [], []
        for s in srcs:
            src = Dataset()
            cls, uid, frame = getattr(s, "medldm_source", (s.SOPClassUID, s.SOPInstanceUID, None))
            src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = cls, uid
            if frame is not None:  # a frame of an enhanced multi-frame source
                src.ReferencedFrameNumber = frame
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _SOURCE_PURPOSE
            src.PurposeOfReferenceCodeSequence = [code]
            items.append(src)
            if any(i.ReferencedSOPInstanceUID == uid for i in insts):
                continue
            inst = Dataset()
            inst.ReferencedSOPClassUID, inst.ReferencedSOPInstanceUID = cls, uid
            insts.append(inst)
        if items:
            ds.SourceImageSequence = items
            rser = Dataset()
            rser.SeriesInstanceUID = ref.SeriesInstanceUID
            rser.ReferencedInstanceSequence = insts
            ds.ReferencedSeriesSequence = [rser]
        if ctx.get("burned_in"):
            ds.BurnedInAnnotation = ctx["burned_in"]
        elif "BurnedInAnnotation" in ds:
            del ds.BurnedInAnnotation
        ds.DerivationDescription = ctx["derivation"]
        _copy_diffusion_private(ref, ds)
        add_software(ds)
    else:
        ds = copy.deepcopy(ctx["base"])
        old_type = []
        ds.DerivationDescription = ctx["derivation"]
        ds.Laterality = ""  # Type 2C: required (empty: unknown) as the body part is unknown
        if ds.SOPClassUID == CTImageStorage:
            ds.PatientPosition, ds.KVP, ds.AcquisitionNumber = "", "", ""  # Type 2: unknown
        if ds.SOPClassUID == SecondaryCaptureImageStorage:
            ds.ConversionType = "WSD"
            ds.PatientOrientation = patient_orientation(grid.row_cos, grid.col_cos)
    ds.ImageType = ["DERIVED", "SECONDARY"] + [v for v in old_type[2:] if v.upper() != "MOSAIC"]  # one slice each
    if ds.SOPClassUID == CTImageStorage and len(ds.ImageType) < 3:
        ds.ImageType = list(ds.ImageType) + ["AXIAL"]
    ds.SeriesInstanceUID = ctx["series_uid"]
    number = ctx.get("offset", 0) + k + 1  # volume t of a 4D series: after the t volumes before it
    ds.SOPInstanceUID = derived_uid("derived-instance", f"{ctx['series_uid']}|{number}") if ctx["deterministic"] \
        else new_uid()
    ds.InstanceNumber = number
    ds.ContentDate, ds.ContentTime = da, tm
    ds.InstanceCreationDate, ds.InstanceCreationTime = da, tm
    ds.SeriesDate, ds.SeriesTime = ds.get("SeriesDate") or da, ds.get("SeriesTime") or tm
    pos = grid.position(k)
    ds.ImagePositionPatient = _dslist(pos)
    ds.ImageOrientationPatient = _dslist(list(grid.row_cos) + list(grid.col_cos))
    ds.PixelSpacing = _dslist([grid.dy, grid.dx])
    ds.SliceThickness = _ds(ctx["thickness"])
    ds.SpacingBetweenSlices = _ds(grid.spacing)
    ds.SliceLocation = _ds(float(np.dot(pos, grid.normal)))
    for key, val in ctx["window"].items():
        setattr(ds, key, val)
    deid = ctx.get("deidentify")
    if deid is not None:  # PS3.15 basic profile, then medldm's own (non-identifying) descriptions back
        deid.apply(ds)
        ds.SeriesDescription = _described("", ctx["description"])
        ds.DerivationDescription = (f"medldm {__version__} {ctx['description']}: pixel data and geometry "
                                    "recomputed" + (" from a de-identified source series" if ref is not None else ""))
    # medldm's own contribution, after de-identification (it names no patient, site or source UID there)
    item = _equipment_item(ctx)
    if deid is not None:
        item.ContributionDescription = ds.DerivationDescription
    ds.ContributingEquipmentSequence = [*ds.get("ContributingEquipmentSequence", []), item]
    return ds


def _deidentifier(deidentify):
    """``None`` (no de-identification) or the :class:`~medldm.io.deidentify.Deidentifier` to use."""
    if deidentify is False or deidentify is None:
        return None
    return deidentify if isinstance(deidentify, Deidentifier) else Deidentifier()


def _set_pixels(ds: Dataset, plane: np.ndarray, enc: Encoding, modality: str, rescale: bool) -> None:
    """Image Pixel + rescale attributes for one slice ``plane`` (X, Y) in real units. Rescale tags are
    written for CT, when the reference had them, or when the encoding is not the identity."""
    stored = enc.encode(plane.T)  # (rows = Y, columns = X)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if enc.signed else 0
    if rescale or modality == "CT" or ds.SOPClassUID == CTImageStorage or not enc.identity:
        ds.RescaleSlope = _ds(enc.slope)
        ds.RescaleIntercept = _ds(enc.intercept)
        if ds.SOPClassUID != CTImageStorage:
            ds.RescaleType = "HU" if modality == "CT" else "US"
    ds.PixelData = np.ascontiguousarray(stored).astype("<" + stored.dtype.str[1:]).tobytes()
    ds["PixelData"].VR = "OW"


def _write(ds: Dataset, path: Path) -> None:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ds.SOPClassUID
    fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    fm.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = fm
    ds.save_as(path, enforce_file_format=True)
