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
    assert main(["convert", src, str(tmp_path / "none.nii.gz"), "--quiet"]) == 1  # 4D without --volume


def test_usage_errors(tmp_path, dipy_files, dicomdir_tests, capsys):
    src = dipy_files / "aniso_vox.nii.gz"
    assert main(["convert", str(tmp_path / "missing.nii"), str(tmp_path / "o")]) == 2
    assert main(["convert", str(src), str(tmp_path / "o.nii"), "--reference", str(dicomdir_tests)]) == 2
    assert main(["convert", str(dicomdir_tests / "98892003"), str(tmp_path / "o"),
                 "--reference", str(dicomdir_tests / "98892001" / "CT5N")]) == 2
    assert main(["convert", str(dicomdir_tests / "98892003"), str(dicomdir_tests / "98892003" / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
