"""`medldm degrade`: folders of real scans in, mirrored degraded copies out, with sidecars and resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest

from medldm.cli import main
from medldm.io import load_scan
from medldm.io.geometry import spacing_from_affine, world_corners


@pytest.fixture()
def cases(tmp_path, pydicom_files, dipy_files):
    """IN/ct/CT_small.dcm (a one-slice CT series) and IN/S0_10slices.nii.gz (MR, uint16)."""
    src = tmp_path / "in"
    (src / "ct").mkdir(parents=True)
    shutil.copy(pydicom_files / "CT_small.dcm", src / "ct" / "CT_small.dcm")
    shutil.copy(dipy_files / "S0_10slices.nii.gz", src / "S0_10slices.nii.gz")
    return src


def _report(out):
    return json.loads((out / "medldm-degrade-report.json").read_text())


def test_folder_gaussian_mirrors_records_and_resumes(cases, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(cases), str(out), "--kind", "gaussian", "--level", "0.03", "--seed", "5", "--quiet"]
    assert main(["degrade", *argv]) == 0
    nii, dcm = out / "S0_10slices.nii.gz", out / "ct"
    assert nii.is_file() and dcm.is_dir()
    side = json.loads((out / "S0_10slices.degradation.json").read_text())
    assert side["kind"] == "gaussian" and side["level"] == 0.03 and side["seed"] == 5
    assert side["case_seed"] != json.loads((out / "ct.degradation.json").read_text())["case_seed"]
    # NIfTI out: same grid, measured noise at the requested level
    src_img, deg = load_scan(cases / "S0_10slices.nii.gz"), load_scan(nii)
    assert deg.shape == src_img.shape and np.allclose(deg.affine, src_img.affine)
    diff = deg.numpy().astype(np.float64) - src_img.numpy()
    assert diff.std() == pytest.approx(side["sigma"], rel=0.05)
    assert side["sigma"] == pytest.approx(0.03 * side["intensity_range"])
    # DICOM out: a derived series of the source, described
    ds = pydicom.dcmread(next(dcm.iterdir()))
    src_ds = pydicom.dcmread(cases / "ct" / "CT_small.dcm")
    assert "degraded gaussian 0.03" in ds.SeriesDescription
    assert ds.StudyInstanceUID == src_ds.StudyInstanceUID and ds.SeriesInstanceUID != src_ds.SeriesInstanceUID
    assert _report(out)["counts"] == {"done": 2, "skipped": 0, "failed": 0}
    # resume: nothing redone
    mtime = nii.stat().st_mtime_ns
    assert main(["degrade", *argv]) == 0
    assert nii.stat().st_mtime_ns == mtime
    # same seed elsewhere -> identical data; another seed -> different data
    out2, out3 = tmp_path / "out2", tmp_path / "out3"
    assert main(["degrade", *argv[:1], str(out2), *argv[2:]]) == 0
    assert np.array_equal(load_scan(out2 / "S0_10slices.nii.gz").numpy(), deg.numpy())
    assert main(["degrade", str(cases), str(out3), "--kind", "gaussian", "--level", "0.03", "--seed", "6", "--quiet"]) == 0
    assert not np.array_equal(load_scan(out3 / "S0_10slices.nii.gz").numpy(), deg.numpy())
    # a different job into the same OUT is refused per case, not silently mixed
    assert main(["degrade", str(cases), str(out), "--kind", "rician", "--level", "0.03", "--seed", "5", "--quiet"]) == 1
    assert "was made with other inputs/options (kind \"gaussian\" ≠ \"rician\")" in capsys.readouterr().err


def test_lowdose_on_mr_fails_that_case_only(cases, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["degrade", str(cases), str(out), "--kind", "lowdose", "--level", "0.25", "--seed", "1", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "S0_10slices.nii.gz: lowdose needs CT in Hounsfield units" in err and "rician" in err
    rep = _report(out)
    assert rep["counts"] == {"done": 1, "skipped": 0, "failed": 1}
    ct_out = load_scan(out / "ct")
    ct_in = load_scan(cases / "ct")
    noise = (ct_out.numpy() - ct_in.numpy())[..., 0]
    body = (ct_in.numpy()[..., 0] > -200) & (ct_in.numpy()[..., 0] < 200)
    assert 10 < noise[body].std() < 100  # quarter dose adds tens of HU of noise at the default I0
    assert ct_out.meta["modality"] == "CT" and np.allclose(ct_out.affine, ct_in.affine, atol=1e-4)


def test_single_file_downsample_and_thick(dipy_files, tmp_path):
    src = dipy_files / "S0_10slices.nii.gz"
    out = tmp_path / "low.nii.gz"
    assert main(["degrade", str(src), str(out), "--kind", "downsample", "--level", "2", "--quiet"]) == 0
    a, b = load_scan(src), load_scan(out)
    assert b.shape == (64, 64, 10)
    assert np.allclose(spacing_from_affine(b.affine.numpy()), np.array(spacing_from_affine(a.affine.numpy())) * [2, 2, 1])
    assert np.allclose(world_corners(b.affine.numpy(), b.shape), world_corners(a.affine.numpy(), a.shape), atol=1e-3)
    side = json.loads((tmp_path / "low.degradation.json").read_text())
    assert side["output_shape"] == [64, 64, 10] and isinstance(side["seed"], int)  # fresh seed recorded
    thick = tmp_path / "thick.nii.gz"
    assert main(["degrade", str(src), str(thick), "--kind", "thick", "--level", "2", "--quiet"]) == 0
    t = load_scan(thick)
    assert t.shape == (128, 128, 5)
    assert np.allclose(t.numpy(), a.numpy().reshape(128, 128, 5, 2).mean(-1), atol=0.01)


@pytest.mark.parametrize("argv", [
    ["--kind", "blur", "--level", "1"],
    ["--kind", "lowdose", "--level", "1.5"],
    ["--kind", "thick", "--level", "2.5"],
    ["--kind", "downsample", "--level", "1"],
    ["--kind", "gaussian"],
])
def test_usage_errors(argv, cases, tmp_path):
    assert main(["degrade", str(cases), str(tmp_path / "o"), *argv]) == 2
    assert not (tmp_path / "o").exists()


def test_cli_kinds_match_library():
    from medldm.cli.degrade import KINDS as CLI_KINDS
    from medldm.data.degrade import KINDS

    assert CLI_KINDS == KINDS


def test_missing_input_is_usage_error(tmp_path, capsys):
    assert main(["degrade", str(tmp_path / "nope"), str(tmp_path / "o"), "--kind", "gaussian", "--level", "0.1"]) == 2
    assert "no such file" in capsys.readouterr().err
