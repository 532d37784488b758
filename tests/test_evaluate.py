"""`medldm evaluate` on real scans (MNI152 crops, their noisy copies, a CT DICOM): metrics, pairing,
summary statistics, grid checks, masks, several methods."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

import medldm.metrics as M
from medldm.cli import main

R = 255.0  # the MNI template is stored as uint8
# three cases (case id -> crop); slices of 170 x 170 leave room for 2D MS-SSIM (> 160 px)
CROPS = {"a": (slice(10, 180), slice(30, 200), slice(70, 82)),
         "sub/b": (slice(14, 184), slice(40, 210), slice(90, 102)),
         "sub/c": (slice(20, 190), slice(20, 190), slice(110, 122))}


def _save(arr: np.ndarray, affine: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(path))


def _crop_affine(affine: np.ndarray, sl) -> np.ndarray:
    a = affine.copy()
    a[:3, 3] = a[:3, :3] @ [s.start for s in sl] + a[:3, 3]
    return a


@pytest.fixture(scope="module")
def folders(mni152, tmp_path_factory):
    """ref/ (clean MNI crops), noisy/ (+ Gaussian noise sd 8), smooth/ (3x3 box-blurred), masks/ (brain)."""
    root = tmp_path_factory.mktemp("eval")
    img = nib.load(str(mni152))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    rng = np.random.default_rng(0)
    from scipy.ndimage import uniform_filter

    for cid, sl in CROPS.items():
        ref = vol[sl]
        aff = _crop_affine(img.affine, sl)
        _save(ref, aff, root / "ref" / f"{cid}.nii.gz")
        # predictions as .nii: pairing ignores the extension
        _save(ref + rng.normal(0, 8, ref.shape), aff, root / "noisy" / f"{cid}.nii")
        _save(uniform_filter(ref, size=(3, 3, 1)), aff, root / "smooth" / f"{cid}.nii")
        _save((ref > 40).astype(np.float32), aff, root / "masks" / f"{cid}.nii")
    return root


def _load(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))


def _rows(report):
    with open(report / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _f(v: str) -> float:
    return float(v) if v not in ("", "nan") else math.nan


@pytest.fixture(scope="module")
def two_methods(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep2")
    rc = main(["evaluate", "--pred", str(folders / "noisy"), "--pred", f"blur={folders / 'smooth'}",
               "--ref", str(folders / "ref"), "--data-range", "255", "-o", str(out), "--quiet"])
    return rc, out


def test_csv_metrics_equal_medldm_metrics(folders, two_methods):
    rc, out = two_methods
    assert rc == 0
    rows = _rows(out)
    assert {r["method"] for r in rows} == {"noisy", "blur"}
    for cid in CROPS:
        ref = _load(folders / "ref" / f"{cid}.nii.gz")
        pred = _load(folders / "noisy" / f"{cid}.nii")
        vol = next(r for r in rows if r["method"] == "noisy" and r["case"] == cid and r["level"] == "volume")
        exp_psnr = float(M.psnr(pred[None, None], ref[None, None], data_range=R)[0])
        exp_ssim = float(M.ssim(pred[None, None], ref[None, None], data_range=R)[0])
        assert _f(vol["psnr"]) == pytest.approx(exp_psnr, abs=1e-4)
        assert _f(vol["ssim"]) == pytest.approx(exp_ssim, abs=1e-5)
        # 3D MS-SSIM needs > 160 voxels along Z: NaN with the reason in the note
        assert math.isnan(_f(vol["ms_ssim"])) and "160" in vol["note"]
        slices = sorted((r for r in rows if r["method"] == "noisy" and r["case"] == cid and r["level"] == "slice"),
                        key=lambda r: int(r["slice"]))
        assert len(slices) == ref.shape[2]
        xs, ys = pred.permute(2, 0, 1)[:, None], ref.permute(2, 0, 1)[:, None]
        np.testing.assert_allclose([_f(r["psnr"]) for r in slices], M.psnr(xs, ys, data_range=R).numpy(), atol=1e-4)
        np.testing.assert_allclose([_f(r["ssim"]) for r in slices], M.ssim(xs, ys, data_range=R).numpy(), atol=1e-5)
        np.testing.assert_allclose([_f(r["ms_ssim"]) for r in slices], M.ms_ssim(xs, ys, data_range=R).numpy(),
                                   atol=1e-5)
    # noise sd 8 on R = 255: PSNR = 20 log10(255 / 8) ≈ 30.07 dB
    assert _f(vol["psnr"]) == pytest.approx(20 * math.log10(255 / 8), abs=0.1)


def test_summary_mean_std_t_interval(two_methods):
    from scipy import stats

    _, out = two_methods
    summary = json.loads((out / "summary.json").read_text())
    assert summary["convention"]["data_range"] == 255.0 and summary["convention"]["window"] is None
    rows = _rows(out)
    for method in ("noisy", "blur"):
        for metric in ("psnr", "ssim"):
            vals = np.array([_f(r[metric]) for r in rows if r["method"] == method and r["level"] == "volume"])
            s = summary["methods"][method][metric]["volume"]
            n, mean, sd = len(vals), vals.mean(), vals.std(ddof=1)
            half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
            assert s["n"] == n == 3
            assert s["mean"] == pytest.approx(mean, rel=1e-9)
            assert s["std"] == pytest.approx(sd, rel=1e-9)
            assert (s["ci_low"], s["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-9)
            # slice level: mean over cases of the per-case slice means
            per_case = [np.mean([_f(r[metric]) for r in rows if r["method"] == method and r["case"] == c
                                 and r["level"] == "slice"]) for c in CROPS]
            assert summary["methods"][method][metric]["slice_mean"]["mean"] == pytest.approx(np.mean(per_case))
    # MS-SSIM 3D missing for every case: n = 0, counted as missing
    assert summary["methods"]["noisy"]["ms_ssim"]["volume"]["n"] == 0
    assert summary["methods"]["noisy"]["ms_ssim"]["volume"]["n_missing"] == 3
    # paired difference blur - noisy, per case
    d = summary["paired"]["differences"]["blur"]["psnr"]["volume"]
    vn = {r["case"]: _f(r["psnr"]) for r in rows if r["method"] == "noisy" and r["level"] == "volume"}
    vb = {r["case"]: _f(r["psnr"]) for r in rows if r["method"] == "blur" and r["level"] == "volume"}
    assert summary["paired"]["baseline_method"] == "noisy"
    assert d["mean"] == pytest.approx(np.mean([vb[c] - vn[c] for c in CROPS]))


def test_bootstrap_ci_contains_mean_and_is_reproducible(folders, tmp_path):
    args = ["evaluate", "--pred", str(folders / "noisy"), "--ref", str(folders / "ref"), "--data-range", "255",
            "--ci", "bootstrap", "--slices-per-case", "0", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "r1")]) == 0
    assert main([*args, "-o", str(tmp_path / "r2")]) == 0
    s1 = json.loads((tmp_path / "r1" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "r2" / "summary.json").read_text())
    p = s1["methods"]["noisy"]["psnr"]["volume"]
    assert "bootstrap" in s1["ci"]["definition"]
    assert p["ci_low"] <= p["mean"] <= p["ci_high"] and p["ci_low"] < p["ci_high"]
    assert p == s2["methods"]["noisy"]["psnr"]["volume"]
    assert not list((tmp_path / "r1").glob("panels/*.png"))


def test_missing_data_range_is_usage_error(folders, tmp_path, capsys):
    rc = main(["evaluate", "--pred", str(folders / "noisy"), "--ref", str(folders / "ref"), "-o", str(tmp_path / "r")])
    assert rc == 2
    assert "--data-range" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["evaluate", "--pred", str(folders / "noisy"), "--ref", str(folders / "ref"),
                 "--window", "no-such-window", "-o", str(tmp_path / "r")]) == 2
    assert main(["evaluate", "--pred", str(folders / "noisy"), "--ref", str(folders / "ref"),
                 "--data-range", "255", "--window", "ct-brain", "-o", str(tmp_path / "r")]) == 2


def test_grid_mismatch_fails_that_case_only(folders, tmp_path):
    pred = tmp_path / "pred"
    for cid in CROPS:
        src = nib.load(str(folders / "noisy" / f"{cid}.nii"))
        arr, aff = np.asarray(src.dataobj), src.affine.copy()
        if cid == "sub/b":
            aff[0, 3] += 2.0  # shifted by two voxels
        if cid == "sub/c":
            arr = arr[:-2]  # wrong shape
        _save(arr, aff, pred / f"{cid}.nii.gz")
    out = tmp_path / "rep"
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(folders / "ref"), "--data-range", "255",
               "-o", str(out), "--quiet"])
    assert rc == 1
    report = {c["case"]: c for c in json.loads((out / "run_report.json").read_text())["cases"]}
    assert report["a"]["status"] == "done"
    assert report["sub/b"]["status"] == "failed" and "affine differs" in report["sub/b"]["message"]
    assert report["sub/c"]["status"] == "failed" and "(168, 170, 12)" in report["sub/c"]["message"]
    assert "resample" in report["sub/c"]["message"]
    assert {r["case"] for r in _rows(out)} == {"a"}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["cases"]["failed"]) == 2 and summary["methods"]["pred"]["psnr"]["volume"]["n"] == 1
    assert "Failed cases" in (out / "report.html").read_text()


def test_missing_prediction_is_a_failed_case(folders, tmp_path):
    pred = tmp_path / "pred"
    src = nib.load(str(folders / "noisy" / "a.nii"))
    _save(np.asarray(src.dataobj), src.affine, pred / "a.nii.gz")
    _save(np.asarray(src.dataobj), src.affine, pred / "extra.nii.gz")
    out = tmp_path / "rep"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(folders / "ref"), "--data-range", "255",
                 "-o", str(out), "--quiet", "--slices-per-case", "0"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert any("no prediction 'pred' for case 'sub/b'" in line for line in summary["cases"]["failed"])
    assert any("without a reference" in n and "extra" in n for n in summary["notes"])


def test_masked_metrics(folders, tmp_path):
    out = tmp_path / "rep"
    rc = main(["evaluate", "--pred", str(folders / "noisy"), "--ref", str(folders / "ref"),
               "--mask", str(folders / "masks"), "--data-range", "255", "-o", str(out), "--quiet"])
    assert rc == 0
    rows = _rows(out)
    ref, pred = _load(folders / "ref" / "a.nii.gz"), _load(folders / "noisy" / "a.nii")
    mask = _load(folders / "masks" / "a.nii") > 0
    vol = next(r for r in rows if r["case"] == "a" and r["level"] == "volume")
    exp = float(M.psnr(pred[None, None], ref[None, None], data_range=R, mask=mask[None, None])[0])
    unmasked = float(M.psnr(pred[None, None], ref[None, None], data_range=R)[0])
    assert _f(vol["psnr"]) == pytest.approx(exp, abs=1e-4)
    assert abs(exp - unmasked) > 1e-3  # the mask changed the number
    exp_ssim = float(M.ssim(pred[None, None], ref[None, None], data_range=R, mask=mask[None, None])[0])
    assert _f(vol["ssim"]) == pytest.approx(exp_ssim, abs=1e-5)


def test_window_convention_and_manifest(pydicom_files, tmp_path):
    """A CT DICOM reference, its noisy copy as NIfTI, paired by a manifest, in a named HU window."""
    from medldm.io.nifti import save_nifti
    from medldm.io.reader import load_scan

    ref = load_scan(pydicom_files / "CT_small.dcm")
    rng = np.random.default_rng(1)
    noisy = ref.clone()
    noisy += torch.from_numpy(rng.normal(0, 20, tuple(ref.shape)).astype(np.float32))
    save_nifti(noisy, tmp_path / "noisy_ct.nii.gz", dtype="float32")
    (tmp_path / "pairs.csv").write_text(f"case,ref,pred:noisy\nct,{pydicom_files / 'CT_small.dcm'},noisy_ct.nii.gz\n")
    out = tmp_path / "rep"
    assert main(["evaluate", "--manifest", str(tmp_path / "pairs.csv"), "--window", "ct-soft-tissue",
                 "-o", str(out), "--quiet"]) == 0
    row = next(r for r in _rows(out) if r["level"] == "volume")
    r2, n2 = ref.as_tensor()[..., 0][None, None], noisy.as_tensor()[..., 0][None, None]
    assert _f(row["psnr"]) == pytest.approx(float(M.psnr(n2, r2, data_range=(-160.0, 240.0))[0]), abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["convention"]["window"] == [-160.0, 240.0] and summary["convention"]["data_range"] == 400.0
    assert "[-160, 240]" in (out / "report.html").read_text()


def test_slices_along_another_axis_and_rerun_replaces_report(folders, tmp_path):
    out = tmp_path / "rep"
    base = ["evaluate", "--pred", str(folders / "noisy"), "--ref", str(folders / "ref"), "--data-range", "255",
            "-o", str(out), "--quiet"]
    assert main([*base, "--slices-per-case", "2"]) == 0
    assert main([*base, "--axis", "1", "--slices-per-case", "1"]) == 0
    rows = [r for r in _rows(out) if r["case"] == "a" and r["level"] == "slice"]
    ref, pred = _load(folders / "ref" / "a.nii.gz"), _load(folders / "noisy" / "a.nii")
    assert len(rows) == ref.shape[1] and {r["axis"] for r in rows} == {"1"}
    xs, ys = pred.permute(1, 0, 2)[:, None], ref.permute(1, 0, 2)[:, None]
    np.testing.assert_allclose([_f(r["psnr"]) for r in sorted(rows, key=lambda r: int(r["slice"]))],
                               M.psnr(xs, ys, data_range=R).numpy(), atol=1e-4)
    panels = json.loads((out / "panels.json").read_text())["panels"]
    assert len(panels) == 3 and all(p["axis"] == 1 for p in panels)
    assert sorted(p.name for p in (out / "panels").iterdir()) == sorted(p["file"][7:] for p in panels)
