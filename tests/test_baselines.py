"""Classical baselines on real scans: denoising improves PSNR on noisy MR, interpolation beats nearest
on down-sampled MR, outputs keep the physical extent, and the `medldm baseline` command mirrors folders."""

from __future__ import annotations

import importlib.util
import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import medldm.metrics as M
from medldm.cli import main
from medldm.eval import baselines as B
from medldm.io.geometry import resized_affine, world_corners

R = 255.0


@pytest.fixture(scope="module")
def mni(mni152):
    """(volume (128, 128, 4) float32 from the MNI152 T1, its affine)."""
    img = nib.load(str(mni152))
    sl = (slice(34, 162), slice(50, 178), slice(80, 88, 2))
    vol = np.asarray(img.dataobj, dtype=np.float32)[sl]
    aff = img.affine @ np.array([[1, 0, 0, 34], [0, 1, 0, 50], [0, 0, 2, 80], [0, 0, 0, 1]], dtype=float)
    return vol, aff


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(M.psnr(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], data_range=R)[0])


def _mt(vol: np.ndarray, aff: np.ndarray, **meta):
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(np.ascontiguousarray(vol)), affine=torch.as_tensor(aff), meta=meta)


@pytest.fixture(scope="module")
def noisy(mni):
    vol, _ = mni
    return vol + np.random.default_rng(3).normal(0, 12, vol.shape).astype(np.float32)


def test_noise_estimate_and_gaussian_nlm_improve_psnr(mni, noisy):
    clean, _ = mni
    assert B.estimate_noise_sigma(noisy) == pytest.approx(12, rel=0.15)
    base = _psnr(noisy, clean)
    gauss, ginfo = B.denoise(noisy, "gaussian")
    nlm, info = B.denoise(noisy, "nlm")
    assert _psnr(gauss, clean) > base + 2 and ginfo["filter_sigma_voxels"] == 1.0
    assert _psnr(nlm, clean) > base + 4  # measured ~ +7 dB
    assert _psnr(nlm, clean) > _psnr(gauss, clean)
    # the documented rule: h = 0.8 sigma, fast mode, 5x5 patches searched within 6 px, in scanner units
    assert info["noise_sigma"] == pytest.approx(12, rel=0.15)
    assert info["nlm"]["h"] == pytest.approx(0.8 * info["noise_sigma"])
    assert (info["nlm"]["patch_size"], info["nlm"]["patch_distance"], info["nlm"]["fast_mode"]) == (5, 6, True)
    # 3D mode and a given sigma work too; intensities stay in scanner units
    crop = (slice(32, 96), slice(32, 96))
    nlm3, info3 = B.denoise(noisy[crop], "nlm", dims=3, sigma=12.0)
    assert info3["noise_sigma"] == pytest.approx(12.0) and _psnr(nlm3, clean[crop]) > _psnr(noisy[crop], clean[crop]) + 4
    assert nlm.dtype == np.float32 and abs(float(nlm.mean()) - float(clean.mean())) < 2


def test_bm3d_improves_psnr(mni, noisy):
    if importlib.util.find_spec("bm3d") is None:
        from conftest import skip_or_fail

        skip_or_fail("optional extra: pip install 'medldm[bm3d]' (the test extra installs it)")
    clean = mni[0][16:112, 16:112, :1]
    out, info = B.denoise(noisy[16:112, 16:112, :1], "bm3d", sigma=12.0)
    assert _psnr(out, clean) > _psnr(noisy[16:112, 16:112, :1], clean) + 4


def test_bm3d_missing_names_the_extra(monkeypatch, tmp_path, capsys, mni):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d -> ImportError
    with pytest.raises(B.MissingExtraError, match=r"pip install 'medldm\[bm3d\]'"):
        B.denoise(mni[0][:32, :32, :1], "bm3d", sigma=1.0)
    nib.save(nib.Nifti1Image(mni[0], mni[1]), str(tmp_path / "a.nii"))
    rc = main(["baseline", "--task", "denoise", "--method", "bm3d", "-i", str(tmp_path / "a.nii"),
               "-o", str(tmp_path / "out.nii")])
    assert rc == 2 and "pip install 'medldm[bm3d]'" in capsys.readouterr().err


def _block_mean(vol: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    x, y, z = (s // k for s, k in zip(vol.shape, f, strict=True))
    v = vol[: x * f[0], : y * f[1], : z * f[2]]
    return v.reshape(x, f[0], y, f[1], z, f[2]).mean(axis=(1, 3, 5))


def test_sr_interpolation_beats_nearest_and_keeps_extent(mni):
    hr, aff = mni
    lr = _block_mean(hr, (2, 2, 1))
    lr_aff = resized_affine(aff, hr.shape, lr.shape)
    scores = {}
    for method in B.SR_METHODS:
        out = B.upsample_scan(_mt(lr, lr_aff), 2, method)
        assert out.shape == hr.shape
        np.testing.assert_allclose(np.asarray(out.affine), aff, atol=1e-9)  # back on the HR grid
        scores[method] = _psnr(out.numpy(), hr)
    assert scores["linear"] > scores["nearest"] + 0.5
    assert scores["bicubic"] > scores["nearest"] + 0.5 and scores["bspline"] > scores["nearest"] + 0.5
    assert scores["bicubic"] > scores["linear"]


def test_keys_bicubic_matches_torch_for_a_minus_075(mni):
    img = mni[0][:40, :50, 0].astype(np.float64)
    ours = B.cubic_convolution_resize(img, (80, 100), a=-0.75)
    ref = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(80, 100), mode="bicubic",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert B.keys_kernel(np.array([0.0, 1.0, 2.0]), -0.5).tolist() == [1.0, 0.0, 0.0]  # interpolating


def test_through_plane_sr_on_real_mr(dipy_files):
    from medldm.io.reader import load_scan

    img = load_scan(dipy_files / "S0_10slices.nii.gz")
    out = B.upsample_scan(img, 2, "linear", axis="through")
    assert tuple(out.shape) == (img.shape[0], img.shape[1], 2 * img.shape[2])
    np.testing.assert_allclose(world_corners(np.asarray(out.affine), out.shape),
                               world_corners(np.asarray(img.affine), img.shape), atol=1e-6)
    assert out.meta["spacing"][2] == pytest.approx(img.meta["spacing"][2] / 2)
    with pytest.raises(ValueError, match="more than one slice"):
        B.upsample(np.zeros((8, 8, 1), np.float32), 2, "linear", axis="through")


def test_cli_sr_mirrors_folder_keeps_kind_and_evaluates_on_reference_grid(mni, pydicom_files, tmp_path):
    import pydicom

    hr, aff = mni
    lr = _block_mean(hr, (2, 2, 1))
    (tmp_path / "ref" / "mr").mkdir(parents=True)
    (tmp_path / "lr" / "mr").mkdir(parents=True)
    (tmp_path / "lr" / "ct").mkdir()
    nib.save(nib.Nifti1Image(hr, aff), str(tmp_path / "ref" / "mr" / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(lr, resized_affine(aff, hr.shape, lr.shape)), str(tmp_path / "lr" / "mr" / "t1.nii.gz"))
    (tmp_path / "lr" / "ct" / "CT_small.dcm").write_bytes((pydicom_files / "CT_small.dcm").read_bytes())
    out = tmp_path / "sr"
    args = ["baseline", "--task", "sr", "--method", "bicubic", "--scale", "2", "-i", str(tmp_path / "lr"), "-o", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert (out / "mr" / "t1.nii.gz").is_file() and (out / "ct").is_dir()
    from medldm.io.reader import load_scan

    ct_in = load_scan(tmp_path / "lr" / "ct" / "CT_small.dcm")
    ct = load_scan(out / "ct")
    assert tuple(ct.shape) == (256, 256, 1)
    np.testing.assert_allclose(ct.meta["spacing"][:2], np.array(ct_in.meta["spacing"][:2]) / 2, rtol=1e-5)
    np.testing.assert_allclose(world_corners(np.asarray(ct.affine), ct.shape)[:, :2],
                               world_corners(np.asarray(ct_in.affine), ct_in.shape)[:, :2], atol=1e-3)
    ds = pydicom.dcmread(ct.meta["source_files"][0])
    assert "DERIVED" in list(ds.ImageType) and "medldm" in ds.SeriesDescription
    report = json.loads((out / "medldm-baseline-report.json").read_text())
    assert report["counts"]["done"] == 2 and report["cases"][0]["extra"]["params"]["method"] == "bicubic"
    # resume: a second run skips both cases
    assert main([*args, "--quiet"]) == 0
    report = json.loads((out / "medldm-baseline-report.json").read_text())
    assert report["counts"]["done"] == 2  # records of the run that did the work are kept
    # the output lies on the reference grid: evaluate pairs it and computes metrics (exit 0)
    rep = tmp_path / "rep"
    assert main(["evaluate", "--pred", f"bicubic={out / 'mr'}", "--ref", str(tmp_path / "ref" / "mr"),
                 "--data-range", "255", "-o", str(rep), "--quiet", "--slices-per-case", "1"]) == 0
    s = json.loads((rep / "summary.json").read_text())
    assert s["methods"]["bicubic"]["psnr"]["volume"]["mean"] > 25


def test_cli_denoise_records_parameters_and_rejects_bad_usage(mni, noisy, tmp_path):
    _, aff = mni
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(noisy, aff), str(tmp_path / "in" / "n.nii"))
    out = tmp_path / "out"
    assert main(["baseline", "--task", "denoise", "--method", "nlm", "-i", str(tmp_path / "in"), "-o", str(out),
                 "--quiet"]) == 0
    params = json.loads((out / "medldm-baseline-report.json").read_text())["cases"][0]["extra"]["params"]
    assert params["noise_sigma_source"] == "estimate_sigma" and params["noise_sigma"] == pytest.approx(12, rel=0.15)
    den = np.asarray(nib.load(str(out / "n.nii")).dataobj, dtype=np.float32)
    assert _psnr(den, mni[0]) > _psnr(noisy, mni[0]) + 4
    bad = ["baseline", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "x")]
    assert main([*bad, "--task", "denoise", "--method", "bicubic"]) == 2
    assert main([*bad, "--task", "sr", "--method", "linear", "--scale", "0.5"]) == 2
    assert main([*bad, "--task", "sr", "--method", "linear", "-o", str(tmp_path / "in" / "sub")]) == 2


def test_cli_denoise_dicom_series_then_evaluate_in_a_ct_window(pydicom_files, tmp_path):
    """A real CT slice with added noise, stored as DICOM: NLM keeps DICOM (derived series) and the
    denoised series pairs with the clean one by folder name."""
    import pydicom

    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    (tmp_path / "clean" / "ct").mkdir(parents=True)
    ds.save_as(tmp_path / "clean" / "ct" / "im1.dcm")
    noisy = ds.pixel_array.astype(np.int32) + np.random.default_rng(5).normal(0, 25, ds.pixel_array.shape).round()
    ds.PixelData = np.clip(noisy, -32768, 32767).astype(ds.pixel_array.dtype).tobytes()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    (tmp_path / "noisy" / "ct").mkdir(parents=True)
    ds.save_as(tmp_path / "noisy" / "ct" / "im1.dcm")
    assert main(["baseline", "--task", "denoise", "--method", "nlm", "-i", str(tmp_path / "noisy"),
                 "-o", str(tmp_path / "nlm"), "--quiet"]) == 0
    out_files = list((tmp_path / "nlm" / "ct").iterdir())
    assert len(out_files) == 1 and "DERIVED" in list(pydicom.dcmread(out_files[0]).ImageType)
    rep = tmp_path / "rep"
    assert main(["evaluate", "--pred", str(tmp_path / "noisy"), "--pred", str(tmp_path / "nlm"),
                 "--ref", str(tmp_path / "clean"), "--window", "ct-soft-tissue", "-o", str(rep), "--quiet"]) == 0
    s = json.loads((rep / "summary.json").read_text())
    assert s["methods"]["nlm"]["psnr"]["volume"]["mean"] > s["methods"]["noisy"]["psnr"]["volume"]["mean"] + 2


def test_degrade_then_upsample_returns_to_the_original_grid(dipy_files):
    """medldm.data.degrade and the SR baselines share the pixel-area grid convention: down-sampling
    then up-sampling by the same factor lands on the original grid (evaluate's grid check passes)."""
    from medldm.data.degrade import downsample, thick_slices
    from medldm.eval.evaluate import check_grid
    from medldm.io.reader import load_scan

    img = load_scan(dipy_files / "S0_10slices.nii.gz")  # 128 x 128 x 10, real MR
    lr = downsample(img, 2)
    assert tuple(lr.shape) == (64, 64, 10)
    thick = thick_slices(img, 2)
    for method in B.SR_METHODS:
        up = B.upsample_scan(lr, 2, method)
        check_grid(img, up, ref_name="S0", other_name=method)
        check_grid(img, B.upsample_scan(thick, 2, method, axis="through"), ref_name="S0", other_name=method)
    hr = img.numpy()
    err = {m: _psnr(B.upsample_scan(lr, 2, m).numpy() / hr.max() * R, hr / hr.max() * R) for m in B.SR_METHODS}
    assert min(err["linear"], err["bicubic"], err["bspline"]) > err["nearest"]
