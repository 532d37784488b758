"""Issue 20 items 15 and 16: small faults of real use (series numbers, run reports, hints, odd paths, no pixels)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataelem import RawDataElement

from medldm.cli import main


def _ct_with_series_number(tmp_path, raw: str):
    """pydicom's real CT_small.dcm with SeriesNumber stored as the raw text ``raw`` (as some writers do)."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw += " " * (len(raw) % 2)
    ds._dict[0x00200011] = RawDataElement(0x00200011, "IS", len(raw), raw.encode(), 0, False, True)
    src = tmp_path / "in" / "ct.dcm"
    src.parent.mkdir()
    ds.save_as(src)
    return src


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("raw, number", [("abc", 1000), ("5.0", 1005), ("7", 1007)])
def test_a_malformed_series_number_never_fails_the_dicom_output(tmp_path, raw, number):
    src = _ct_with_series_number(tmp_path, raw)
    out = tmp_path / "out"
    assert main(["baseline", "--task", "denoise", "--method", "gaussian", "-i", str(src), "-o", str(out),
                 "--to", "dicom", "--quiet"]) == 0
    files = sorted(out.glob("*.dcm"))
    assert files and int(pydicom.dcmread(files[0]).SeriesNumber) == number
