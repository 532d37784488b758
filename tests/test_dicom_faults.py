"""Issue 10, DICOM input and discovery faults, each on real series copied to tmp_path and edited with
pydicom: missing / odd slices (item 4), one series in several folders (8), RescaleSlope 0 (6),
unknown transfer syntax and NumberOfFrames bombs (12), FIFOs and links to /dev/zero (10), hidden
files (16), messages naming the input (14), `info` JSON / exit status (15), PHI in derived series (17)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medldm.cli import main
from medldm.io.discover import scan_folder
from medldm.io.errors import CaseError, UsageError
from medldm.io.geometry import lps_to_ras
from medldm.io.reader import load_case, load_scan

ATOL_MM = 1e-3


def ras_position(f) -> np.ndarray:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    return (lps_to_ras(np.eye(4)) @ np.r_[np.asarray(ds.ImagePositionPatient, float), 1.0])[:3]


def z_of(f) -> float:
    return float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])


@pytest.fixture
def ct5n(dicomdir_tests, tmp_path) -> list[Path]:
    """A copy of 98892001/CT5N (5 axial CT slices, 2.5 mm apart) in tmp_path/in/ct, sorted by position."""
    dest = tmp_path / "in" / "ct"
    shutil.copytree(dicomdir_tests / "98892001" / "CT5N", dest)
    return sorted(dest.iterdir(), key=z_of)


def assert_true_positions(img) -> None:
    """Every slice centre of the loaded volume is where its source file says (LPS -> RAS)."""
    aff = img.affine.numpy()
    files = img.meta["source_files"]
    assert len(files) == img.shape[2]
    for k, f in enumerate(files):
        np.testing.assert_allclose(aff[:3] @ [0, 0, k, 1], ras_position(f), atol=ATOL_MM)


# ---------------------------------------------------------------- item 4: missing / odd slices

def test_missing_slice_splits_into_regular_parts_at_true_positions(ct5n, capsys):
    ct5n[2].unlink()  # 2.5 mm steps, one missing: a 5 mm gap
    d = scan_folder(ct5n[0].parent)
    assert [(c.id, len(c.paths)) for c in d.cases] == [("series-5_04.16302.0.6_part-1", 2),
                                                      ("series-5_04.16302.0.6_part-2", 2)]
    for j, c in enumerate(d.cases):
        img = load_case(c)
        assert_true_positions(img)
        w = c.warnings[0]
        assert w.startswith("missing slices: gap of 5 mm between the slices at 1.26 mm")
        assert "6.26 mm" in w and ct5n[1].name in w and ct5n[3].name in w and f"part {j + 1} of 2" in w
        assert c.integrity["split"]["gaps"][0]["missing"] == 1
    assert any("split into 2 regular parts" in n for n in d.notes)
    # a list of files with a gap is never stacked
    with pytest.raises(CaseError, match="missing slices: gap of 5 mm") as e:
        load_scan([ct5n[0], ct5n[1], ct5n[3], ct5n[4]])
    assert "\n" not in str(e.value)
    # info: text and JSON say so
    assert main(["info", str(ct5n[0].parent)]) == 0
    out, err = capsys.readouterr()
    assert out.count("part      ") == 2 and "warning   missing slices: gap of 5 mm" in out
    assert "split into 2 regular parts, one case each" in err
    assert main(["info", str(ct5n[0].parent), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["integrity"]["split"]["part"] for e in entries] == [1, 2]
    assert all(any(w.startswith("missing slices") for w in e["warnings"]) for e in entries)


def test_gap_never_places_a_slice_wrong_in_converted_dicom(ct5n, tmp_path):
    """DICOM -> DICOM through `convert`: each derived slice sits at, and references, its own source slice."""
    ct5n[2].unlink()
    out = tmp_path / "out"
    assert main(["convert", str(ct5n[0].parent), str(out), "--to", "dicom", "--quiet"]) == 0
    parts = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in parts] == ["series-5_04.16302.0.6_part-1", "series-5_04.16302.0.6_part-2"]
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in ct5n if f.exists()}
    n = 0
    for part in parts:
        for f in sorted(part.iterdir()):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            refs = [str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence]
            assert len(refs) == 1
            np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, float),
                                       np.asarray(pydicom.dcmread(by_uid[refs[0]]).ImagePositionPatient, float),
                                       atol=ATOL_MM)
            n += 1
    assert n == 4


def test_reference_with_a_gap_is_never_referenced_across_it(ct5n, tmp_path):
    """A regular 5-slice volume written with a gapped reference: the slice in the gap references nothing."""
    from medldm.io.dicom_write import save_dicom_series

    img = load_scan(ct5n[0].parent)
    ct5n[2].unlink()
    files = save_dicom_series(img, tmp_path / "d", reference=ct5n[0].parent)
    refs = [[str(i.ReferencedSOPInstanceUID) for i in pydicom.dcmread(f).get("SourceImageSequence", [])]
            for f in files]
    src = [str(pydicom.dcmread(f).SOPInstanceUID) for f in ct5n if f.exists()]
    assert refs == [[src[0]], [src[1]], [], [src[2]], [src[3]]]


@pytest.mark.parametrize("fault", ["odd-size", "odd-orientation"])
def test_odd_slice_is_its_own_stack_and_the_rest_splits(ct5n, fault):
    ds = pydicom.dcmread(ct5n[2])
    if fault == "odd-size":
        ds.PixelData = ds.pixel_array[::2, ::2].copy().tobytes()
        ds.Rows = ds.Columns = 8
    else:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.save_as(ct5n[2])
    d = scan_folder(ct5n[0].parent)
    ids = [c.id for c in d.cases]
    assert ids == ["series-5_04.16302.0.6_stack-1_part-1", "series-5_04.16302.0.6_stack-1_part-2",
                   "series-5_04.16302.0.6_stack-2"]
    for c in d.cases:
        img = load_case(c)
        if "stack-1" in c.id:
            assert img.shape[2] == 2
            assert_true_positions(img)


def test_pixel_less_slice_fails_the_series_naming_the_file(ct5n, tmp_path, capsys):
    """Item 14: not 'IN holds 2 cases: OUT must be a folder' but what is wrong with which file."""
    raw = ct5n[2].read_bytes()
    ct5n[2].write_bytes(raw[: raw.index(b"\xe0\x7f\x10\x00")])  # cut before (7FE0,0010) Pixel Data
    d = scan_folder(ct5n[0].parent)
    assert len(d.cases) == 1 and d.cases[0].error is not None and len(d.cases[0].paths) == 5
    assert str(ct5n[2]) in d.cases[0].error.line() and "without pixel data" in d.cases[0].error.line()
    assert main(["convert", str(ct5n[0].parent), str(tmp_path / "ct.nii.gz"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "holds 2 cases" not in err and "unexpected error" not in err
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and str(ct5n[2]) in failed[0] and "copy it again" in failed[0]


def test_slices_off_the_grid_without_a_clean_gap_are_refused(ct5n):
    ds = pydicom.dcmread(ct5n[3])
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.6]  # 24 % of the 2.5 mm step
    ds.save_as(ct5n[3])
    (case,) = scan_folder(ct5n[0].parent).cases
    assert case.error is not None and "not on a regular grid" in case.error.line()
    assert ct5n[3].name in case.error.line() and "\n" not in case.error.line()
    with pytest.raises(CaseError, match="not on a regular grid"):
        load_scan(ct5n)


def test_small_jitter_still_loads_with_a_warning(ct5n):
    ds = pydicom.dcmread(ct5n[3])
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.05]  # 2 % of the step: below the 5 % refusal level
    ds.save_as(ct5n[3])
    img = load_scan(ct5n[0].parent)
    assert img.shape[2] == 5 and any("non-uniform slice spacing" in w for w in img.meta["warnings"])


# ---------------------------------------------------------------- item 8: one series in several folders

def test_same_series_in_two_folders_stays_two_cases(dicomdir_tests, tmp_path):
    src = dicomdir_tests / "98892001" / "CT5N"
    for sub in ("copy1", "copy2"):
        shutil.copytree(src, tmp_path / "in" / sub)
    bad = sorted((tmp_path / "in" / "copy2").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:1500])  # one bad copy fails only its own folder
    d = scan_folder(tmp_path / "in")
    assert [(c.id, len(c.paths)) for c in d.cases] == [("copy1", 5), ("copy2", 5)]
    assert d.cases[0].error is None and d.cases[1].error is not None and str(bad) in d.cases[1].error.line()
    assert load_case(d.cases[0]).shape == (16, 16, 5)
    assert any("found in 2 folders" in n for n in d.notes)


# ---------------------------------------------------------------- items 6 and 12: header faults

def _edited(src: Path, dest: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in changes.items():
        if k == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = v
        else:
            setattr(ds, k, v)
    ds.save_as(dest)
    return dest


def test_rescale_slope_zero_is_refused(pydicom_files, tmp_path, capsys):
    f = _edited(pydicom_files / "CT_small.dcm", tmp_path / "slope0.dcm", RescaleSlope=0)
    with pytest.raises(CaseError, match="RescaleSlope is 0: .*unknowable") as e:
        load_scan(f)
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)
    assert main(["info", str(f)]) == 1
    err = capsys.readouterr().err
    assert "RescaleSlope is 0" in err and "unexpected error" not in err


def test_unknown_transfer_syntax_is_a_one_line_case_error(pydicom_files, tmp_path, capsys):
    f = _edited(pydicom_files / "CT_small.dcm", tmp_path / "ts.dcm", TransferSyntaxUID="1.2.3.4.5.6.7")
    with pytest.raises(CaseError, match=r"unknown transfer syntax '1\.2\.3\.4\.5\.6\.7'.* — "):
        load_scan(f)
    assert main(["info", str(f)]) == 1
    err = capsys.readouterr().err
    assert "unknown transfer syntax" in err and "unexpected error" not in err and "please report" not in err


@pytest.mark.parametrize("changes", [{"NumberOfFrames": 100000}, {"Rows": 60000, "Columns": 60000},
                                     {"NumberOfFrames": 2_000_000_000}])
def test_size_bombs_are_refused_before_allocating(pydicom_data, tmp_path, capsys, changes):
    import resource

    f = _edited(pydicom_data / "693_UNCI.dcm", tmp_path / "bomb.dcm", **changes)
    t0, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CaseError, match="the header claims") as e:
        load_scan(f)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(f))
    assert main(["info", str(f)]) == 1
    err = capsys.readouterr().err
    assert "the header claims" in err and "unexpected error" not in err
    assert time.perf_counter() - t0 < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 500_000  # KiB: nothing big allocated


# ---------------------------------------------------------------- item 10: FIFOs and devices

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_and_link_to_dev_zero_are_skipped_not_read(ct5n, tmp_path):
    folder = ct5n[0].parent
    os.mkfifo(folder / "pipe")
    os.symlink("/dev/zero", folder / "zero.dcm")
    os.symlink(folder / "missing", folder / "dangling")
    code = ("import sys, json; from medldm.io.discover import scan_folder; d = scan_folder(sys.argv[1]); "
            "print(json.dumps({'cases': [c.id for c in d.cases], 'skipped': d.skipped}))")
    res = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["cases"] == ["ct"]
    sk = "\n".join(out["skipped"])
    assert f"{folder / 'pipe'}: skipped: not a regular file (FIFO" in sk
    assert f"{folder / 'zero.dcm'}: skipped: not a regular file (character device)" in sk
    assert f"{folder / 'dangling'}: skipped: cannot be opened" in sk
    res = subprocess.run([sys.executable, "-m", "medldm", "convert", str(folder), str(tmp_path / "ct.nii.gz"),
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert load_scan(tmp_path / "ct.nii.gz").shape == (16, 16, 5)
    with pytest.raises(UsageError, match="not a regular file or folder"):
        scan_folder(folder / "pipe")
    with pytest.raises(CaseError, match="not a regular file"):
        load_scan(folder / "zero.dcm")


# ---------------------------------------------------------------- item 16: hidden files

def test_hidden_files_are_listed_medldm_temporaries_are_not(ct5n):
    folder = ct5n[0].parent
    shutil.copy(ct5n[0], folder / ".hidden_copy.dcm")
    (folder / ".cache").mkdir()
    shutil.copy(ct5n[1], folder / ".cache" / "IM1")
    (folder / ".medldm-tmp.123.host.ct.abc").mkdir()
    shutil.copy(ct5n[2], folder / ".medldm-tmp.123.host.ct.abc" / "IM2")
    (folder / "ct.nii.gz.medldm.json").write_text("{}")
    d = scan_folder(folder.parent)
    assert [c.id for c in d.cases] == ["ct"] and len(d.cases[0].paths) == 5
    sk = "\n".join(d.skipped)
    assert f"{folder / '.hidden_copy.dcm'}: skipped: hidden file" in sk
    assert f"{folder / '.cache'}: skipped: hidden folder" in sk
    assert "medldm-tmp" not in sk and "medldm.json" not in sk


# ---------------------------------------------------------------- item 15: info

def test_info_json_is_strict_json_for_an_all_nan_volume(dipy_files, tmp_path, capsys):
    import nibabel as nib

    src = nib.load(dipy_files / "aniso_vox.nii.gz")
    nan = np.full(src.shape, np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(nan, src.affine), tmp_path / "nan.nii.gz")
    main(["info", str(tmp_path / "nan.nii.gz"), "--json"])
    out = capsys.readouterr().out

    def no_constants(name):
        raise ValueError(f"invalid JSON constant {name}")

    (e,) = json.loads(out, parse_constant=no_constants)
    assert e["range"] == {"min": None, "max": None, "p1": None, "p99": None}


def test_info_exit_2_when_nothing_is_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no scan here")
    assert main(["info", str(tmp_path / "notes"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "error: no NIfTI file or DICOM image series found" in err and "readme.txt: skipped" in err


# ---------------------------------------------------------------- item 17: PHI in derived series

@pytest.fixture
def phi_series(ct5n) -> Path:
    """CT5N with free-text comments and burned-in annotation added to every slice."""
    for f in ct5n:
        ds = pydicom.dcmread(f)
        ds.ImageComments = "pt John Q Public, MRN 991122, called 555-0199"
        ds.StudyComments = "follow-up for Mrs Public"
        ds.PatientComments = "allergic to iodine"
        ds.AdditionalPatientHistory = "history: fall at home"
        ds.InstitutionName = "St Example Hospital"
        ds.OperatorsName = "Tech^Alice"
        ds.BurnedInAnnotation = "NO"
        ds.save_as(f)
    return ct5n[0].parent


def test_free_text_is_never_copied_and_burned_in_is_not_copied_blindly(phi_series, tmp_path, caplog):
    from medldm.io.dicom_write import save_dicom_series

    img = load_scan(phi_series)
    files = save_dicom_series(img, tmp_path / "d", reference=img.meta["source_files"])
    for f in files:
        ds = pydicom.dcmread(f)
        for kw in ("ImageComments", "StudyComments", "PatientComments", "AdditionalPatientHistory"):
            assert kw not in ds, kw
        assert "Public" not in str(ds) and "iodine" not in str(ds)
        assert ds.BurnedInAnnotation == "NO"
        assert ds.PatientID == pydicom.dcmread(img.meta["source_files"][0]).PatientID  # same patient kept
    for f in img.meta["source_files"]:
        ds = pydicom.dcmread(f)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(f)
    with caplog.at_level("WARNING"):
        files = save_dicom_series(img, tmp_path / "e", reference=img.meta["source_files"])
    assert pydicom.dcmread(files[0]).BurnedInAnnotation == "YES"
    assert "burned-in annotation" in caplog.text
    with pytest.raises(CaseError, match="BurnedInAnnotation YES"):
        save_dicom_series(img, tmp_path / "f", reference=img.meta["source_files"], deidentify=True)
    assert not (tmp_path / "f").exists()


def test_deidentify_basic_profile_keeps_links_consistent(phi_series, tmp_path):
    from medldm.io.deidentify import Deidentifier
    from medldm.io.dicom_write import save_dicom_series

    img = load_scan(phi_series)
    src = [pydicom.dcmread(f) for f in img.meta["source_files"]]
    deid = Deidentifier(b"one run's secret")
    a = save_dicom_series(img, tmp_path / "a", reference=img.meta["source_files"], deidentify=deid)
    b = save_dicom_series(img, tmp_path / "b", reference=img.meta["source_files"], deidentify=deid,
                          description="other")
    secrets = [str(src[0].get(k)) for k in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                            "FrameOfReferenceUID", "StudyDate", "InstitutionName", "OperatorsName",
                                            "AccessionNumber", "StudyID", "PatientBirthDate")
               if src[0].get(k) not in (None, "")]
    secrets += [str(s.SOPInstanceUID) for s in src]
    assert len(secrets) >= 10
    da = [pydicom.dcmread(f) for f in a]
    db = [pydicom.dcmread(f) for f in b]
    for k, ds in enumerate(da):
        text = str(ds) + str(ds.file_meta)
        for s in secrets:
            assert len(s) < 4 or s not in text, s
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.StudyDate == "" and "SeriesDate" not in ds and "InstitutionName" not in ds
        assert ds.PatientID.startswith("MEDLDM-") and ds.PatientID == db[k].PatientID
        # links kept: same new Study / Frame of Reference UIDs across the series of one run; sources mapped
        assert ds.StudyInstanceUID == db[k].StudyInstanceUID == deid.uid(src[0].StudyInstanceUID)
        assert ds.FrameOfReferenceUID == db[k].FrameOfReferenceUID == deid.uid(src[0].FrameOfReferenceUID)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == deid.uid(src[k].SOPInstanceUID)
        assert ds.SeriesInstanceUID != db[k].SeriesInstanceUID and ds.SOPInstanceUID != db[k].SOPInstanceUID
        assert pydicom.uid.UID(ds.StudyInstanceUID).is_valid
    other = Deidentifier(b"another run")
    assert other.uid(src[0].StudyInstanceUID) != deid.uid(src[0].StudyInstanceUID)
    back = load_scan(tmp_path / "a")
    assert np.array_equal(back.numpy(), img.numpy())
    if shutil.which("dciodvfy"):
        for f in a:
            res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
            assert not [line for line in (res.stdout + res.stderr).splitlines() if "Error" in line], f
