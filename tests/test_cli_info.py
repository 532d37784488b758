"""`medldm info`: text and JSON output, failed cases on stderr with exit 1, usage errors exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medldm.cli import main


@pytest.fixture
def folder(tmp_path, dicomdir_tests, dipy_files, pydicom_files):
    shutil.copytree(dicomdir_tests / "98892001" / "CT5N", tmp_path / "in" / "ct")
    shutil.copy(dipy_files / "aniso_vox.nii.gz", tmp_path / "in" / "mr.nii.gz")
    shutil.copy(pydicom_files / "MR_truncated.dcm", tmp_path / "in" / "broken.dcm")
    shutil.copy(pydicom_files / "rtplan.dcm", tmp_path / "in" / "plan.dcm")
    return tmp_path / "in"


def tree_hash(root):
    return hashlib.sha256(b"".join(str(f).encode() + f.read_bytes()
                                   for f in sorted(root.rglob("*")) if f.is_file())).hexdigest()


def test_json_entries_and_failed_case(folder, capsys, dicomdir_tests):
    before = tree_hash(folder)
    rc = main(["info", str(folder), "--json"])
    out, err = capsys.readouterr()
    assert tree_hash(folder) == before
    assert rc == 1  # one case failed
    entries = {e["id"]: e for e in json.loads(out)}
    assert set(entries) == {"ct", "mr"}
    ct = entries["ct"]
    assert ct["kind"] == "dicom-series" and ct["modality"] == "CT" and ct["shape"] == [16, 16, 5]
    assert ct["dtype"] == "int16" and ct["axes"] == "LPS" and ct["n_files"] == 5
    assert ct["spacing"] == pytest.approx([0.488281, 0.488281, 2.5], abs=1e-5)
    hu = np.concatenate([apply_modality_lut(d.pixel_array, d).ravel() for d in
                         (pydicom.dcmread(f) for f in sorted((dicomdir_tests / "98892001" / "CT5N").iterdir()))])
    assert ct["range"]["min"] == hu.min() and ct["range"]["max"] == hu.max()
    assert ct["range"]["p1"] == pytest.approx(np.percentile(hu, 1))
    assert ct["range"]["p99"] == pytest.approx(np.percentile(hu, 99))
    mr = entries["mr"]
    np.testing.assert_allclose(mr["affine"], nib.load(folder / "mr.nii.gz").affine, atol=1e-6)
    assert mr["kind"] == "nifti" and mr["warnings"] == []
    assert "broken.dcm: cannot decode the pixel data" in err and "—" in err
    assert "plan.dcm: skipped: RTPLAN is not an image" in err


def test_text_output_all_ok(dicomdir_tests, capsys):
    """CT2 has a 202.5 mm gap after its first slice: two regular parts, each at its true position."""
    rc = main(["info", str(dicomdir_tests / "77654033" / "CT2")])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "shape     16 x 16 x 1" in out and "shape     16 x 16 x 3" in out and "dtype     int16" in out
    assert "part      1 of 2 of a series split at missing slices" in out
    assert "warning   missing slices: gap of 202.5 mm" in out
    assert "split into 2 regular parts, one case each" in err


def test_volume_option_for_4d(capsys):
    f = nib.__file__.replace("__init__.py", "tests/data/example4d.nii.gz")
    assert main(["info", f, "--json"]) == 0  # a 4D file is described: its first volume and how many it holds
    (e,) = json.loads(capsys.readouterr().out)
    assert e["volumes"] == 2 and e["shape"] == [128, 96, 24]
    assert main(["info", f, "--json", "--volume", "1"]) == 0
    (e,) = json.loads(capsys.readouterr().out)
    assert e["shape"] == [128, 96, 24]


def test_missing_path_is_usage_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err
