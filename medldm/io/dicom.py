"""DICOM file-level helpers: reading headers, telling images from other objects, decoding pixels
into scanner units (Modality LUT), and per-slice geometry in LPS.

Stacking slices into a volume lives in :mod:`medldm.io.dicom_series`, multi-frame objects in
:mod:`medldm.io.dicom_multiframe`.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medldm.io.dicom_geometry import (  # noqa: F401 (the geometry of one image: part of the readers' interface)
    ORTHO_TOL,
    SliceGeom,
    _floats,
    affine_lps,
    orientation,
    pixel_spacing,
    slice_geometry,
    thickness,
)
from medldm.io.errors import CaseError
from medldm.io.limits import max_voxels

CODECS_HINT = "install the decoders: pip install 'medldm[dicom-codecs]'"
NO_DECODER_HINT = ("export the series again from the scanner/PACS as uncompressed (or JPEG / JPEG 2000) images; "
                   "a video encoding cannot be read as a scan")

# Modalities / SOP classes that hold no image to process (reason shown in `skipped`).
NON_IMAGE_MODALITIES = {
    "SR": "structured report",
    "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan",
    "RTRECORD": "RT treatment record",
    "RTDOSE": "RT dose grid (not a scan)",
    "PR": "presentation state",
    "KO": "key object selection",
    "REG": "registration",
    "SEG": "segmentation",
    "ECG": "waveform",
    "HD": "waveform",
    "AU": "audio waveform",
    "DOC": "encapsulated document",
}


# Files never tried as preamble-less DICOM during discovery (a forced read of them is pointless).
NOT_DICOM_SUFFIXES = (".txt", ".md", ".json", ".csv", ".tsv", ".py", ".yaml", ".yml", ".xml", ".html", ".log",
                      ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".npz", ".pt", ".zip", ".gz",
                      ".tar", ".pdf", ".safetensors", ".mha", ".mhd", ".nrrd")


def _is_dicom_file(path: Path) -> bool:
    """True when the file carries the ``DICM`` magic after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def file_kind(path: str | Path) -> str | None:
    """``None`` for a regular file (symbolic links followed), else what it is (``"FIFO"``,
    ``"character device"``, ...). Raises OSError when it cannot be examined (broken link, no permission)."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_regular(path: str | Path) -> None:
    """Raise :class:`CaseError` unless ``path`` is a regular file: reading a FIFO or a device (e.g. a
    link to /dev/zero) would block or never end."""
    try:
        kind = file_kind(path)
    except OSError as e:
        raise CaseError(path, f"cannot open the file ({e.strerror or e})", "check the path and its permissions") from e
    if kind is not None:
        raise CaseError(path, f"not a regular file ({kind})", "give a regular DICOM file")


def read_header(path: str | Path, *, strict: bool = False) -> Dataset | None:
    """Header of a DICOM file (pixel data deferred, not loaded), or ``None`` when it is not DICOM.

    Files with the ``DICM`` preamble are read as DICOM; files without it (old ACR-NEMA style) are
    accepted only when a forced read yields an SOP class or image geometry. A file that claims to
    be DICOM but cannot be parsed raises :class:`CaseError` (with ``strict`` also for the others).
    """
    path = Path(path)
    check_regular(path)
    magic = _is_dicom_file(path)
    if not magic and not strict and path.name.lower().endswith(NOT_DICOM_SUFFIXES):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = drop_command_set(pydicom.dcmread(path, defer_size=1024, force=not magic))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if magic or strict:
            raise CaseError(path, f"cannot read the DICOM header ({type(e).__name__}: {e})",
                            "the file is damaged or incomplete; copy it again from the source") from e
        return None
    except Exception as e:  # pydicom raises a wide range of errors on garbage; keep the case isolated
        if magic or strict:
            raise CaseError(path, f"cannot read the DICOM header ({type(e).__name__}: {e})",
                            "the file is damaged or incomplete; copy it again from the source") from e
        return None
    if not magic and not ("SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds and "Modality" in ds)):
        if strict:
            raise CaseError(path, "not a DICOM file", "give a NIfTI file, a DICOM file or a folder")
        return None
    return ds


def is_dicomdir(ds: Dataset) -> bool:
    """A DICOMDIR media index (no image of its own)."""
    return "DirectoryRecordSequence" in ds or str(getattr(ds.get("file_meta", {}), "MediaStorageSOPClassUID", "")) \
        == "1.2.840.10008.1.3.10"


def non_image_reason(ds: Dataset) -> str | None:
    """Why ``ds`` is not an image we can load (``None`` when it is one).

    Raises :class:`CaseError` for an image object whose pixel data is missing (truncated file).
    """
    if is_dicomdir(ds):
        return "DICOMDIR is a media index, not an image"
    modality = str(ds.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"{modality} is not an image ({NON_IMAGE_MODALITIES[modality]})"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = _sop_class(ds)
        if "Image Storage" in sop:  # an image object cut short (pydicom reads truncated files silently)
            raise CaseError(getattr(ds, "filename", None) or "<dataset>",
                            f"{sop} object without pixel data: the file is truncated or incomplete",
                            "copy it again from the source (or remove it)")
        return f"{modality or sop or 'object'} has no pixel data"
    return None


def _sop_class(ds: Dataset) -> str:
    """Name of the SOP class (from the dataset or the file meta, which survives truncation)."""
    for uid in (ds.get("SOPClassUID", None), getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", None)):
        name = getattr(uid, "name", "")
        if name:
            return str(name)
    return ""


def series_uid(ds: Dataset) -> str:
    """SeriesInstanceUID, or an empty string when the header lacks it."""
    return str(ds.get("SeriesInstanceUID", "") or "")


def modality(ds: Dataset) -> str:
    return str(ds.get("Modality", "") or "unknown").upper()


def n_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def drop_command_set(ds: Dataset) -> Dataset:
    """Remove Command Set elements (group 0000) from ``ds`` in place and return it. They belong to DIMSE messages,
    not to stored objects, but some DIMSE nodes store them in files (and a PACS returns them over WADO); pydicom
    refuses to write a dataset holding them. Every dataset medldm reads goes through here."""
    for tag in [e.tag for e in ds if e.tag.group == 0]:
        del ds[tag]
    return ds


def load_full(path: str | Path) -> Dataset:
    """Read a whole file (pixel data included); errors become :class:`CaseError`."""
    check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return drop_command_set(pydicom.dcmread(path, force=not _is_dicom_file(Path(path))))
    except Exception as e:
        raise CaseError(path, f"cannot read the DICOM file ({type(e).__name__}: {e})",
                        "the file is damaged or incomplete; copy it again from the source") from e


def transfer_syntax(ds: Dataset, path: str | Path):
    """The file's TransferSyntaxUID (``None`` when absent); :class:`CaseError` when it is not a
    transfer syntax pydicom knows (a damaged header or a private encoding)."""
    from pydicom.uid import UID

    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is None:
        return None
    tsuid = UID(str(tsuid))
    if not (tsuid.is_valid and tsuid.is_transfer_syntax):
        raise CaseError(path, f"unknown transfer syntax {str(tsuid)[:64]!r}: the pixel data cannot be decoded",
                        "the header is damaged or the encoding is private; export the series again from the "
                        "scanner/PACS, or re-encode it with a DICOM toolkit (e.g. gdcmconv --raw)")
    return tsuid


def check_decodable(ds: Dataset, path: str | Path) -> None:
    """Raise :class:`CaseError` naming the codecs extra when the transfer syntax cannot be decoded here."""
    from pydicom.pixels import get_decoder

    tsuid = transfer_syntax(ds, path)
    if tsuid is None or not tsuid.is_compressed:
        return
    try:
        dec = get_decoder(tsuid)
    except NotImplementedError as e:  # no decoder exists (video: MPEG-2/4, HEVC): the codecs extra cannot help
        raise CaseError(path, f"transfer syntax {tsuid.name} is not supported by pydicom (no decoder exists; "
                        "medldm reads image series, not video)", NO_DECODER_HINT) from e
    if not dec.is_available:
        raise CaseError(path, f"pixel data is compressed ({tsuid.name}) and no decoder is installed", CODECS_HINT)


def _default_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (old ACR-NEMA style): take the syntax the dataset was read with
    (in memory only; the file is not touched)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _int(ds: Dataset, key: str, default: int) -> int:
    try:
        v = ds.get(key, default)
        return default if v in (None, "") else int(v)
    except (TypeError, ValueError):
        return -1


def check_pixel_size(ds: Dataset, path: str | Path) -> None:
    """Refuse, before anything is allocated, an image whose header claims more pixels than the file
    can hold or than ``max_voxels()`` (``MEDLDM_MAX_VOXELS``; a NumberOfFrames / Rows / Columns "bomb"), or none at all."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    nf_raw = ds.get("NumberOfFrames", 1)
    try:
        nf = 1 if nf_raw in (None, "") else int(nf_raw)
    except (TypeError, ValueError):
        raise CaseError(path, f"NumberOfFrames {str(nf_raw)[:20]!r} is not a number",
                        "the header is damaged; export the file again from the source") from None
    spp, bits = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 16)
    if rows <= 0 or cols <= 0 or nf <= 0 or spp <= 0 or bits <= 0:
        raise CaseError(path, f"image of {cols}x{rows} pixels, {nf} frame(s), {spp} sample(s) of {bits} bits "
                              "in the header: nothing to read",
                        "the header is damaged; export the file again from the source (or remove it)")
    n = nf * rows * cols * spp
    limit = max_voxels()
    if nf * rows * cols > limit:
        raise CaseError(path, f"the header claims {nf} frame(s) of {cols}x{rows} pixels ({nf * rows * cols:,} "
                              f"voxels), above medldm's limit of {limit:,} (MEDLDM_MAX_VOXELS)",
                        "the header is damaged (NumberOfFrames/Rows/Columns); export the file again, "
                        "split the object into smaller series, or raise MEDLDM_MAX_VOXELS")
    try:
        size = os.path.getsize(path)
    except (OSError, TypeError):
        return
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        compressed = bool(tsuid is not None and tsuid.is_compressed)
    except ValueError:  # unknown syntax: transfer_syntax() says so when decoding
        return
    need = 8 * nf if compressed else math.ceil(n * bits / 8)  # each compressed frame is >= one 8-byte item
    if need > size:
        what = (f"{nf} compressed frames" if compressed else
                f"{nf} frame(s) of {cols}x{rows}x{spp} at {bits} bits = {need:,} bytes of pixel data")
        raise CaseError(path, f"the header claims {what}, but the file holds only {size:,} bytes "
                              "(NumberOfFrames/Rows/Columns inconsistent with the file)",
                        "the file is damaged or truncated; copy it again from the source (or remove it)")


def decode_pixels(ds: Dataset, path: str | Path) -> np.ndarray:
    """Stored pixel values, shape ``(frames, rows, cols)``; errors become :class:`CaseError`."""
    _default_transfer_syntax(ds)
    check_decodable(ds, path)
    check_pixel_size(ds, path)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if spp != 1 or photometric.upper() == "PALETTE COLOR":
        raise CaseError(path, f"colour image ({photometric or '?'}, {spp} sample{'s' * (spp > 1)}/pixel)",
                        "medldm works with greyscale scans (CT, MR, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as e:
        msg = str(e).splitlines()[0]
        if "missing dependencies" in str(e):
            raise CaseError(path, f"cannot decode the pixel data ({msg})", CODECS_HINT) from e
        if "raised by all available plugins" in str(e):
            detail = " ".join(str(e).split())[:200]
            raise CaseError(path, f"the installed decoders failed on this file ({detail})",
                            "convert it to an uncompressed transfer syntax (e.g. dcmdjpeg / gdcmconv --raw)") from e
        raise CaseError(path, f"cannot decode the pixel data ({type(e).__name__}: {msg})",
                        "the file is damaged or truncated; copy it again from the source") from e
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    return arr


def rescale_params(ds: Dataset, path: str | Path) -> tuple[float, float, list[str]]:
    """``(slope, intercept, warnings)`` of RescaleSlope/RescaleIntercept in ``ds`` (a header or a Pixel Value
    Transformation item). An absent or empty slope is 1 (empty: with a warning), an absent intercept 0.
    A slope of 0 maps every pixel to the intercept: the real values (HU) are unknowable, so it is
    refused, as are values that are not finite numbers."""
    warns: list[str] = []
    vals = []
    for key, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(key, None)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if key in ds:
                warns.append(f"{key} is present but empty: assumed {default:g}")
            vals.append(default)
            continue
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise CaseError(path, f"{key} {str(raw)[:20]!r} is not a number",
                            "the header is damaged; export the series again from the scanner/PACS") from None
        if not math.isfinite(v):
            raise CaseError(path, f"{key} is {v}: the real values cannot be computed",
                            "the header is damaged; export the series again from the scanner/PACS")
        vals.append(v)
    if vals[0] == 0.0:
        raise CaseError(path, "RescaleSlope is 0: every pixel would map to the intercept, so the real values "
                              "(e.g. HU) are unknowable",
                        "the header is damaged; export the series again from the scanner/PACS")
    return vals[0], vals[1], warns


def rescale(arr: np.ndarray, ds: Dataset, path: str | Path = "<dataset>") -> tuple[np.ndarray, bool]:
    """Apply the Modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) of a single-frame
    header. Returns ``(values, changed)``; ``values`` keeps the stored dtype when nothing applies.
    A slope of 0 or a non-finite slope/intercept raises :class:`CaseError` (see :func:`rescale_params`)."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(arr, ds)), True
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope, inter, _ = rescale_params(ds, path)
        if slope == 1.0 and inter == 0.0:
            return arr, False
        if np.issubdtype(arr.dtype, np.integer) and slope.is_integer() and inter.is_integer():
            # exact integer arithmetic (CT HU): same values as apply_modality_lut, integer dtype
            wide = np.int64 if arr.dtype.itemsize >= 4 else np.int32
            return arr.astype(wide) * int(slope) + int(inter), True
        return arr.astype(np.float64) * slope + inter, True  # as apply_modality_lut computes it
    return arr, False


def exact_dtype(values: np.ndarray, stored: np.dtype, rescaled: bool) -> str:
    """The numpy dtype (str) that holds ``values`` exactly: the stored type without rescaling,
    ``int16``/``int32`` for integer results of a rescale (CT HU), else ``float32``."""
    if not rescaled or values.size == 0:
        return exact_dtype_from_stats(0.0, 0.0, False, stored, rescaled)
    integral = bool(np.issubdtype(values.dtype, np.integer) or np.all(np.mod(values, 1) == 0))
    return exact_dtype_from_stats(float(values.min()), float(values.max()), integral, stored, rescaled)


def exact_dtype_from_stats(lo: float, hi: float, integral: bool, stored: np.dtype, rescaled: bool) -> str:
    """:func:`exact_dtype` from the value range and whether every value is an integer."""
    if not rescaled:
        return str(np.dtype(stored))
    if integral and np.isfinite(lo) and np.isfinite(hi):
        for cand in (np.int16, np.int32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand).name
    return "float32"
