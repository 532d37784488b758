"""`medldm convert` on real scans: single scans both ways, folders of cases with a broken file,
resume, usage errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medldm.cli import main
from medldm.io.reader import load_scan


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_nifti_to_dicom_to_nifti(tmp_path, dipy_files):
    src = dipy_files / "aniso_vox.nii.gz"
    assert main(["convert", str(src), str(tmp_path / "dcm"), "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "dcm"), str(tmp_path / "back.nii.gz"), "--quiet"]) == 0
    a, b = nib.load(src), nib.load(tmp_path / "back.nii.gz")
    assert b.get_data_dtype() == a.get_data_dtype()
    assert np.array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)


def test_dicom_to_nifti_to_derived_dicom_with_reference(tmp_path, dicomdir_tests):
    series = dicomdir_tests / "98892001" / "CT5N"
    before = _tree_digest(series)
    assert main(["convert", str(series), str(tmp_path / "ct.nii.gz"), "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "ct.nii.gz"), str(tmp_path / "derived"), "--reference", str(series),
                 "--description", "roundtrip", "--quiet"]) == 0
    src, out = load_scan(series), load_scan(tmp_path / "derived")
    assert np.array_equal(out.numpy(), src.numpy())
    ds, ref = (pydicom.dcmread(sorted((tmp_path / "derived").iterdir())[0]),
               pydicom.dcmread(load_scan(series).meta["source_files"][0]))
    assert ds.PatientID == ref.PatientID and ds.StudyInstanceUID == ref.StudyInstanceUID
    assert ds.SeriesInstanceUID != ref.SeriesInstanceUID and "[medldm roundtrip]" in ds.SeriesDescription
    assert _tree_digest(series) == before


def test_folder_with_a_broken_file(tmp_path, dipy_files, dicomdir_tests, capsys):
    inp = tmp_path / "in"
    (inp / "dicom").mkdir(parents=True)
    shutil.copy(dipy_files / "aniso_vox.nii.gz", inp / "aniso_vox.nii.gz")
    shutil.copytree(dicomdir_tests / "98892001" / "CT5N", inp / "dicom" / "CT5N")
    (inp / "broken.nii.gz").write_bytes((dipy_files / "S0_10slices.nii.gz").read_bytes()[:2000])
    before = _tree_digest(inp)
    out = tmp_path / "out"
    assert main(["convert", str(inp), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "broken.nii.gz" in failed[0] and " — " in failed[0]
    assert load_scan(out / "aniso_vox").shape == (58, 58, 24)  # NIfTI -> DICOM series folder
    assert np.array_equal(load_scan(out / "dicom" / "CT5N.nii.gz").numpy(),
                          load_scan(inp / "dicom" / "CT5N").numpy())  # DICOM -> NIfTI
    report = json.loads((out / "medldm-convert-report.json").read_text())
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    assert _tree_digest(inp) == before
    # resume: converted cases are skipped, the broken one fails again
    assert main(["convert", str(inp), str(out), "--quiet"]) == 1
    report = json.loads((out / "medldm-convert-report.json").read_text())
    statuses = sorted(c["status"] for c in report["cases"])
    assert statuses == ["done", "done", "failed"]  # the record of the run that did the work is kept
    assert main(["convert", str(inp), str(out), "--to", "nifti", "--quiet"]) == 1
    assert (out / "aniso_vox.nii.gz").exists()


def test_4d_volume_selection(tmp_path):
    src = pytest.importorskip("nibabel").__path__[0] + "/tests/data/example4d.nii.gz"
    assert main(["convert", src, str(tmp_path / "v1.nii.gz"), "--volume", "1", "--quiet"]) == 0
    full = np.asarray(nib.load(src).dataobj)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "v1.nii.gz").dataobj), full[..., 1])
    assert main(["convert", src, str(tmp_path / "all.nii.gz"), "--quiet"]) == 0  # 4D without --volume: all of it
    assert np.array_equal(np.asarray(nib.load(tmp_path / "all.nii.gz").dataobj), full)


def test_usage_errors(tmp_path, dipy_files, dicomdir_tests, capsys):
    src = dipy_files / "aniso_vox.nii.gz"
    assert main(["convert", str(tmp_path / "missing.nii"), str(tmp_path / "o")]) == 2
    assert main(["convert", str(src), str(tmp_path / "o.nii"), "--reference", str(dicomdir_tests)]) == 2
    assert main(["convert", str(dicomdir_tests / "98892003"), str(tmp_path / "o"),
                 "--reference", str(dicomdir_tests / "98892001" / "CT5N")]) == 2
    assert main(["convert", str(dicomdir_tests / "98892003"), str(dicomdir_tests / "98892003" / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _first_header(folder):
    return pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)


def test_deidentify_folder_keeps_study_links_with_new_uids(tmp_path, dicomdir_tests):
    """--deidentify: no source identifier in the derived series; series of one source study share one new
    StudyInstanceUID (consistent within the run); without it the derived series keep the source's study."""
    src = tmp_path / "in"
    shutil.copytree(dicomdir_tests / "98892003" / "MR2", src / "MR2")
    files = sorted((src / "MR2").iterdir())
    series = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files})
    assert len(series) == 3  # three series of three studies: put the last two in one study
    shared = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    for f in files:
        ds = pydicom.dcmread(f)
        if str(ds.SeriesInstanceUID) != series[0]:
            ds.StudyInstanceUID = shared + ".9"
            ds.save_as(f)
    before = _tree_digest(src)
    src_hdr = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    src_studies = {str(ds.StudyInstanceUID) for ds in src_hdr.values()}
    assert len(src_studies) == 2

    assert main(["convert", str(src), str(tmp_path / "plain"), "--to", "dicom", "--quiet"]) == 0
    assert main(["convert", str(src), str(tmp_path / "deid"), "--to", "dicom", "--deidentify", "--quiet"]) == 0
    assert _tree_digest(src) == before
    plain = sorted({p.parent.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*.dcm")})
    deid = sorted({p.parent.relative_to(tmp_path / "deid") for p in (tmp_path / "deid").rglob("*.dcm")})
    assert plain == deid and len(plain) >= 3  # one derived series per source stack
    plain = [tmp_path / "plain" / r for r in plain]
    deid = [tmp_path / "deid" / r for r in deid]
    new_study_of_old = {}
    for p, d in zip(plain, deid, strict=True):
        a, b = _first_header(p), _first_header(d)
        assert str(a.StudyInstanceUID) in src_studies  # plain derived series: same study as the source
        assert str(a.PatientName) == "Doe^Peter" and str(a.PatientID) == "98890234"
        assert str(b.StudyInstanceUID) not in src_studies
        assert "Doe" not in str(b.get("PatientName", "")) and str(b.get("PatientID", "")) != "98890234"
        new_study_of_old.setdefault(str(a.StudyInstanceUID), set()).add(str(b.StudyInstanceUID))
    assert all(len(v) == 1 for v in new_study_of_old.values())  # one new study UID per source study
    assert len({next(iter(v)) for v in new_study_of_old.values()}) == 2


def test_deidentify_with_nifti_output_is_a_usage_error(tmp_path, dipy_files, capsys):
    assert main(["convert", str(dipy_files / "aniso_vox.nii.gz"), str(tmp_path / "o.nii.gz"), "--deidentify"]) == 2
    assert "--deidentify applies to DICOM output only" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
