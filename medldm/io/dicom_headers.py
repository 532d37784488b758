"""Header building blocks for derived DICOM series: what is kept, removed and created.

* :func:`clean_reference` copies a reference slice's header and removes what no longer applies to
  new pixel data (icons, overlays, curves, LUTs, pixel statistics, padding values, real-world value
  maps, private tags, group lengths, signatures) — see :data:`REMOVED_KEYWORDS`.
* :func:`new_series_header` builds the patient/study/series/equipment modules for a series written
  without a reference: no identifiers of any real patient.
"""

from __future__ import annotations

import copy
import secrets
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset

from medldm import __version__
from medldm.io.dicom_uids import new_uid

#: Attributes dropped from a reference header: they describe the old pixel values, the old
#: encoding or the old file, and would be wrong for the new pixels.
REMOVED_KEYWORDS = (
    "IconImageSequence", "VOILUTSequence", "ModalityLUTSequence", "PresentationLUTShape",
    "RealWorldValueMappingSequence", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "SmallestImagePixelValueInPlane", "LargestImagePixelValueInPlane",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData", "PaletteColorLookupTableUID",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData", "NumberOfFrames", "FrameIncrementPointer",
    "PlanarConfiguration", "PixelAspectRatio", "ImagesInAcquisition", "PixelData", "FloatPixelData",
    "DoubleFloatPixelData", "PixelDataProviderURL", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "DataSetTrailingPadding", "DigitalSignaturesSequence", "MACParametersSequence",
    "EncryptedAttributesSequence", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
    "VOILUTFunction", "RescaleSlope", "RescaleIntercept", "RescaleType", "PixelSpacingCalibrationType",
    "PixelSpacingCalibrationDescription", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceLocation", "SpacingBetweenSlices", "SourceImageSequence",
    "ReferencedSeriesSequence", "DerivationCodeSequence",
)


#: Free text about the patient, the visit or the image, never copied into a derived series (it may
#: hold identifying or clinical details unrelated to the new pixels): every attribute whose keyword
#: contains ``Comment`` (ImageComments, StudyComments, PatientComments, AcquisitionComments, ...) and these.
FREE_TEXT_KEYWORDS = (
    "AdditionalPatientHistory", "TextString", "Impressions", "InterpretationText", "ReasonForStudy",
    "ReasonForTheRequestedProcedure", "ReasonForTheImagingServiceRequest", "MedicalAlerts", "Allergies",
    "PatientState", "SpecialNeeds", "ModifiedImageDescription", "DerivationDescription",
)


def is_free_text(keyword: str) -> bool:
    return "Comment" in keyword or keyword in FREE_TEXT_KEYWORDS


def clean_reference(ref: Dataset) -> Dataset:
    """A fresh copy of ``ref`` (no pixels, no file meta) without :data:`REMOVED_KEYWORDS`, free-text
    comments (:func:`is_free_text`), private tags, Command Set elements (group 0000), group lengths, curves (50xx) and overlays (60xx).
    ``ref`` is not modified."""
    out = Dataset()
    for elem in ref:
        g, e = elem.tag.group, elem.tag.element
        if elem.tag.is_private or g == 0 or e == 0 or 0x5000 <= g <= 0x50FF or 0x6000 <= g <= 0x60FF:
            continue
        if elem.keyword in REMOVED_KEYWORDS or g == 0xFFFA or is_free_text(elem.keyword):
            continue
        out.add(copy.deepcopy(elem))
    return out


def now() -> tuple[str, str]:
    """Current (DA, TM) strings."""
    t = datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


def new_series_header(modality: str) -> Dataset:
    """Patient, study, series, frame-of-reference and equipment modules for a series that has no
    DICOM source: an anonymous patient with a random ID, new study/series/frame UIDs, today's date."""
    da, tm = now()
    ds = Dataset()
    ds.PatientName = "ANONYMOUS^MEDLDM"
    ds.PatientID = "MEDLDM-" + secrets.token_hex(6).upper()
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medldm: new series written without source DICOM headers"
    ds.StudyInstanceUID = new_uid()
    ds.StudyDate, ds.StudyTime = da, tm
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "medldm"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = new_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "medldm"
    ds.SoftwareVersions = f"medldm {__version__}"
    return ds


def patient_orientation(row_cos: np.ndarray, col_cos: np.ndarray) -> list[str]:
    """PatientOrientation (0020,0020) letters for the row and column directions (LPS cosines)."""

    def letters(v: np.ndarray) -> str:
        pos, neg = ("L", "P", "H"), ("R", "A", "F")
        order = np.argsort(-np.abs(v))
        out = ""
        for ax in order:
            if abs(v[ax]) > 1e-3 and len(out) < 3:
                out += pos[ax] if v[ax] > 0 else neg[ax]
        return out

    return [letters(np.asarray(row_cos)), letters(np.asarray(col_cos))]


def add_software(ds: Dataset) -> None:
    """Append ``medldm <version>`` to SoftwareVersions (kept values first)."""
    mine = f"medldm {__version__}"
    old = ds.get("SoftwareVersions")
    if old is None or old == "":
        vals = []
    elif isinstance(old, str):
        vals = [old]
    else:
        vals = [str(v) for v in old]
    if mine not in vals:
        vals.append(mine)
    ds.SoftwareVersions = vals if len(vals) > 1 else vals[0]
