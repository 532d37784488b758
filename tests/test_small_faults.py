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


def test_the_loser_of_two_runs_into_one_out_keeps_the_winners_report(tmp_path):
    """Two runs racing for one OUT: the loser (its outputs "exist — use --overwrite") finishes last; its report
    merge must keep the winner's done cases (issue 20 #16: the report said "0 done, 6 failed" while all 6
    outputs were valid). A later, sequential run's failure still replaces the entry."""
    import json
    import time

    from medldm.io.caseloop import CaseResult, write_report

    report = tmp_path / "medldm-convert-report.json"
    loser_started = time.time()
    winner = [CaseResult(f"c{i}", "done", outputs=[f"o{i}.nii.gz"], finished=time.time()) for i in range(6)]
    write_report(report, winner, command="winner", status=0)
    loser = [CaseResult(f"c{i}", "failed", f"c{i}: output o{i}.nii.gz exists — use --overwrite", finished=time.time())
             for i in range(6)]
    write_report(report, loser, command="loser", status=1, started=loser_started)
    rep = json.loads(report.read_text())
    assert rep["counts"] == {"done": 6, "skipped": 0, "failed": 0}
    assert all(c["status"] == "done" and "exists" in c["concurrent_failure"] for c in rep["cases"])
    later = [CaseResult("c0", "failed", "c0: made with other options", finished=time.time())]
    write_report(report, later, command="rerun", status=1, started=time.time())
    rep = json.loads(report.read_text())
    assert rep["counts"] == {"done": 5, "skipped": 0, "failed": 1}


def test_run_cases_passes_its_start_to_the_report(tmp_path):
    """The same through run_cases: a case done by another run during this run is kept done."""
    import json
    import time

    from medldm.io.caseloop import CaseResult, run_cases, write_report
    from medldm.io.errors import CaseError

    report = tmp_path / "r.json"

    def lose(case):
        write_report(report, [CaseResult(case, "done", outputs=[case], finished=time.time())])  # the winner
        raise CaseError(case, "output exists", "use --overwrite, or another OUT")

    status, _ = run_cases(["a", "b"], lose, report_path=report, quiet=True)
    assert status == 1
    assert json.loads(report.read_text())["counts"] == {"done": 2, "skipped": 0, "failed": 0}


def test_mpeg2_hint_does_not_name_the_codecs_extra(tmp_path):
    """No pydicom decoder exists for MPEG-2 video: the hint must not send the user to install one that cannot
    decode it."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import MPEG2MPML

    from medldm.io.dicom import check_decodable
    from medldm.io.errors import CaseError

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(CaseError) as err:
        check_decodable(ds, "video.dcm")
    line = err.value.line()
    assert "MPEG2" in line and "dicom-codecs" not in line and "uncompressed" in line


def test_a_newline_in_a_path_keeps_the_failed_line_one_line(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    src = tmp_path / "in"
    src.mkdir()
    (src / "bad\nname.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read()[:3000])
    (src / "good.nii.gz").write_bytes(b"")  # another (broken) case: folder mode
    assert main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 1
    failed = [ln for ln in capsys.readouterr().err.splitlines() if "bad" in ln or "name.dcm" in ln]
    assert len(failed) == 1 and failed[0].startswith("FAILED ") and "bad\\nname.dcm: " in failed[0]


def test_a_series_without_pixel_data_is_one_case_saying_so(tmp_path, capsys):
    """8 slices of one series, none with pixel data: one failed case "without pixel data (and 7 more ...)", not
    a usage error "IN holds 8 cases"."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = tmp_path / "in"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    for i in range(8):
        ds.SOPInstanceUID, ds.ImagePositionPatient, ds.InstanceNumber = generate_uid(), [0, 0, 2.0 * i], i + 1
        ds.save_as(src / f"s{i}.dcm")
    assert main(["convert", str(src), str(tmp_path / "ct.nii.gz"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "IN holds" not in err
    assert "without pixel data" in err and "(and 7 more damaged files in this series)" in err


def test_enhance_of_one_series_into_a_folder_of_user_files_is_a_usage_error_like_convert(tmp_path, capsys):
    """docs/guarantees.md: one scan in, OUT an existing folder holding files medldm did not write, is a usage
    error for every command (enhance wrote OUT/<name>/ beside the user's files when IN was a series folder)."""
    import shutil

    from pydicom.data import get_testdata_file

    src = tmp_path / "ct"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "CT_small.dcm")
    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "thesis.txt").write_text("x\n")
    for argv in (["convert", str(src), str(keep)],
                 ["enhance", "-m", "mr-denoise-2d", "-i", str(src), "-o", str(keep), "--device", "cpu"]):
        assert main([*argv, "--quiet"]) == 2
        assert f"give a new folder name for the DICOM series (e.g. {keep / 'series'})" in capsys.readouterr().err
    assert sorted(p.name for p in keep.iterdir()) == ["thesis.txt"]
