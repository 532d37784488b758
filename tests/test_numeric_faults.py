"""Numeric and NIfTI-header faults injected into real scans (issue 10, items 5, 6, 9, 12, 13): NaN/inf voxels,
float64 values beyond float32, zero pixdim, NaN/singular affines, headers claiming huge images, zero-size,
constant and 1-pixel-wide images. Each must be reported, handled without spreading, or refused in one line
(docs/limits.md) — never a NaN output at exit 0, a silent 1 mm, a 16 GB allocation or an "unexpected error".
"""

from __future__ import annotations

import csv
import gzip
import json
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.cli import main
from medldm.io.errors import CaseError
from medldm.io.reader import load_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a few non-finite voxels, in both slices of a 64 x 64 x 2 crop (one of them on the border)
BAD = [((10, 12, 0), np.nan), ((40, 33, 1), np.inf), ((0, 50, 1), -np.inf), ((31, 31, 0), np.nan)]


def _crop(dipy_files) -> tuple[np.ndarray, np.ndarray]:
    """Real MR (dipy S0_10slices b0), 64 x 64 x 2 brain crop as float32, and its affine."""
    im = nib.load(dipy_files / "S0_10slices.nii.gz")
    return np.asarray(im.dataobj)[32:96, 32:96, 4:6, 0].astype(np.float32), im.affine


def _with_bad(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = a.copy()
    mask = np.zeros(a.shape, bool)
    for idx, v in BAD:
        a[idx] = v
        mask[idx] = True
    return a, mask


def _save(arr, affine, path, dtype=None):
    img = nib.Nifti1Image(arr if dtype is None else arr.astype(dtype), affine)
    nib.save(img, str(path))
    return path


def _psnr(x, y, mask, r: float) -> float:
    d = (np.asarray(x, np.float64) - np.asarray(y, np.float64))[mask]
    return float(10 * np.log10(r * r / np.mean(d * d)))


@pytest.fixture(scope="module")
def scans(dipy_files, tmp_path_factory):
    """clean.nii.gz / bad.nii.gz: a noisy real MR crop, without and with the BAD voxels (float32)."""
    root = tmp_path_factory.mktemp("nf")
    ref, aff = _crop(dipy_files)
    noisy = ref + np.random.default_rng(0).normal(0, 0.04 * float(ref.max()), ref.shape).astype(np.float32)
    bad, mask = _with_bad(noisy)
    return {"root": root, "ref": ref, "mask": mask, "affine": aff,
            "clean": _save(noisy, aff, root / "clean.nii.gz"), "bad": _save(bad, aff, root / "bad.nii.gz")}


@pytest.fixture(scope="module")
def enhancers():
    from medldm.models import load_model
    from medldm.pipelines.enhance import Enhancer
    from medldm.shipped import resolve_model

    return {n: Enhancer(load_model(resolve_model(n))) for n in ("mr-denoise-2d", "mr-sr2x-2d")}


# ------------------------------------------------------------------------------------------- NaN / inf
def test_nonfinite_voxels_are_counted_on_load(scans):
    img = load_scan(scans["bad"])
    assert img.meta["nonfinite_voxels"] == len(BAD)
    assert any(f"{len(BAD)} of {img.numel()} voxels are NaN or infinite" in w for w in img.meta["warnings"])
    assert load_scan(scans["clean"]).meta["nonfinite_voxels"] == 0


def test_enhance_denoise_keeps_nan_where_it_was_and_nowhere_else(scans, enhancers):
    from medldm.pipelines.enhance import EnhanceOptions

    enh = enhancers["mr-denoise-2d"]
    opts = EnhanceOptions(steps=4, seed=0)
    clean = enh.enhance(load_scan(scans["clean"]), opts)
    res = enh.enhance(load_scan(scans["bad"]), opts)
    out, mask = res.image.numpy(), scans["mask"]
    np.testing.assert_array_equal(np.isnan(out), mask)  # NaN exactly there (inf input -> NaN), never spread
    assert not np.isinf(out).any()
    assert res.info["nonfinite_voxels"] == len(BAD) and "4 NaN/infinite input voxel(s)" in res.info["warning"]
    ok = ~mask
    r = float(scans["ref"].max())
    before = _psnr(clean.image.numpy(), scans["ref"], ok, r)
    after = _psnr(out, scans["ref"], ok, r)
    # measured on this crop: 32.425 vs 32.422 dB (noisy input 27.95): the fill only touches the bad voxels' neighbourhoods
    assert after > before - 0.1, (before, after)
    assert res.info["noise_level"] == pytest.approx(clean.info["noise_level"], rel=0.05)


def test_enhance_denoise_magnitude_scan_with_nan_on_the_default_path(scans, tmp_path):
    """Issue 20.10: a magnitude (Rician, never negative) scan with a few NaN/inf voxels through the default path
    (blind noise estimate, which reads the background's Rayleigh mode on magnitude data): exit 0, NaN exactly where
    the input was not finite (before: 'unexpected error AxisError: axis 2 is out of bounds')."""
    rng = np.random.default_rng(1)
    ref = scans["ref"]
    s = 0.05 * float(ref.max())
    mag = np.abs(ref + s * rng.standard_normal(ref.shape) + 1j * s * rng.standard_normal(ref.shape)).astype(np.float32)
    bad, mask = _with_bad(mag)
    src = _save(bad, scans["affine"], tmp_path / "magnitude_bad.nii.gz")
    out = tmp_path / "out.nii.gz"
    assert main(["enhance", "-m", "mr-denoise-2d", "-i", str(src), "-o", str(out), "--steps", "2", "--quiet"]) == 0
    arr = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(np.isnan(arr), mask)
    assert not np.isinf(arr).any()


def test_enhance_sr_maps_nan_mask_nearest_onto_the_finer_grid(scans, enhancers):
    from medldm.io.geometry import resize_mask_nearest
    from medldm.pipelines.enhance import EnhanceOptions

    res = enhancers["mr-sr2x-2d"].enhance(load_scan(scans["bad"]), EnhanceOptions(steps=2))
    out = res.image.numpy()
    assert out.shape == (128, 128, 2)
    want = resize_mask_nearest(scans["mask"], out.shape)
    assert want.sum() == 4 * len(BAD)  # each bad voxel covers 2 x 2 output voxels
    np.testing.assert_array_equal(np.isnan(out), want)


def test_enhance_cli_reports_nonfinite_count_and_writes_nan(scans, tmp_path):
    out = tmp_path / "out.nii.gz"
    rc = main(["enhance", "-m", "mr-denoise-2d", "-i", str(scans["bad"]), "-o", str(out), "--steps", "2",
               "--quiet"])
    assert rc == 0
    arr = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(np.isnan(arr), scans["mask"])
    report = next(tmp_path.glob("*enhance-report.json"))
    case = json.loads(report.read_text())["cases"][0]
    assert case["extra"]["params"]["nonfinite_voxels"] == len(BAD)
    assert "NaN/infinite" in case["extra"]["warning"]


@pytest.mark.parametrize("method", ["gaussian", "nlm"])
def test_baseline_denoise_nan_stays_put(scans, method):
    from medldm.eval.baselines import denoise_scan

    clean, _ = denoise_scan(load_scan(scans["clean"]), method)
    out, info = denoise_scan(load_scan(scans["bad"]), method)
    out, mask = out.numpy(), scans["mask"]
    np.testing.assert_array_equal(np.isnan(out), mask)
    assert info["nonfinite_voxels"] == len(BAD)
    r = float(scans["ref"].max())
    before, after = _psnr(clean.numpy(), scans["ref"], ~mask, r), _psnr(out, scans["ref"], ~mask, r)
    assert after > before - 0.1, (before, after)  # measured: nlm 31.690 vs 31.685 dB, gaussian equal


@pytest.mark.parametrize("method,axis", [("bicubic", "inplane"), ("bspline", "inplane"), ("linear", "through")])
def test_baseline_sr_nan_mask_nearest(scans, method, axis):
    from medldm.eval.baselines import upsample_scan
    from medldm.io.geometry import resize_mask_nearest

    out = upsample_scan(load_scan(scans["bad"]), 2, method, axis)
    arr = out.numpy()
    np.testing.assert_array_equal(np.isnan(arr), resize_mask_nearest(scans["mask"], arr.shape))
    assert out.meta["nonfinite_voxels"] == len(BAD) and any("NaN in the output" in w for w in out.meta["warnings"])


def test_float64_beyond_float32_is_a_case_error(dipy_files, tmp_path):
    ref, aff = _crop(dipy_files)
    a = ref.astype(np.float64)
    a[5, 5, 0] = 1e39
    p = _save(a, aff, tmp_path / "big.nii.gz")
    with pytest.raises(CaseError, match=r"big.nii.gz: 1 voxel\(s\) beyond float32's range .*1e\+39.* — rescale"):
        load_scan(p)


def test_all_nan_volume_refused_by_enhance_and_baseline(dipy_files, tmp_path, enhancers):
    from medldm.eval.baselines import denoise_scan, upsample_scan

    ref, aff = _crop(dipy_files)
    img = load_scan(_save(np.full_like(ref, np.nan), aff, tmp_path / "allnan.nii.gz"))
    assert any("every voxel is NaN" in w for w in img.meta["warnings"])  # `info` shows it
    for run in (lambda: enhancers["mr-denoise-2d"].enhance(img), lambda: denoise_scan(img, "nlm"),
                lambda: upsample_scan(img, 2, "linear")):
        with pytest.raises(CaseError, match="allnan.nii.gz: every voxel is NaN or infinite"):
            run()


# --------------------------------------------------------------------------------- constant, 1 pixel wide
@pytest.mark.parametrize("value", [0.0, 7.0])
def test_constant_volume_is_returned_unchanged(dipy_files, tmp_path, enhancers, value):
    from medldm.eval.baselines import denoise_scan, upsample_scan
    from medldm.pipelines.enhance import EnhanceOptions

    ref, aff = _crop(dipy_files)
    img = load_scan(_save(np.full_like(ref, value), aff, tmp_path / "const.nii.gz"))
    res = enhancers["mr-denoise-2d"].enhance(img, EnhanceOptions(steps=2))
    np.testing.assert_array_equal(res.image.numpy(), np.full(ref.shape, value, np.float32))
    assert res.info["constant"] and "constant scan" in res.info["warning"]
    sr = enhancers["mr-sr2x-2d"].enhance(img, EnhanceOptions(steps=2)).image.numpy()
    assert sr.shape == (128, 128, 2) and np.all(sr == value)
    assert np.all(denoise_scan(img, "nlm")[0].numpy() == value)
    assert np.allclose(upsample_scan(img, 2, "bicubic").numpy(), value)


@pytest.mark.parametrize("shape_slice", [(slice(0, 1), slice(None), slice(0, 1)), (slice(None), slice(0, 1), slice(None)),
                                         (slice(0, 1), slice(0, 1), slice(0, 1))])
def test_one_pixel_wide_image_is_handled(dipy_files, tmp_path, enhancers, shape_slice):
    from medldm.eval.baselines import denoise_scan, upsample_scan
    from medldm.pipelines.enhance import EnhanceOptions

    ref, aff = _crop(dipy_files)
    a = ref[shape_slice]
    img = load_scan(_save(a, aff, tmp_path / "thin.nii.gz"))
    out = enhancers["mr-denoise-2d"].enhance(img, EnhanceOptions(steps=2)).image.numpy()
    assert out.shape == a.shape and np.isfinite(out).all()
    sr = enhancers["mr-sr2x-2d"].enhance(img, EnhanceOptions(steps=2)).image.numpy()
    assert sr.shape == (2 * a.shape[0], 2 * a.shape[1], a.shape[2]) and np.isfinite(sr).all()
    for method in ("gaussian", "nlm"):
        assert np.isfinite(denoise_scan(img, method)[0].numpy()).all()
    assert np.isfinite(upsample_scan(img, 2, "bicubic").numpy()).all()


# ------------------------------------------------------------------------------------------ geometry
def _header_edit(src_arr, affine, path, edit):
    """Save with nibabel, then change header fields in the raw bytes (nibabel would fix them on save)."""
    import io

    nib.save(nib.Nifti1Image(src_arr, affine), str(path))
    raw = gzip.decompress(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    edit(hdr)
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[len(hdr.binaryblock):]))
    return path


def test_zero_pixdim_is_warned_not_silent(dipy_files, tmp_path, capfd):
    ref, aff = _crop(dipy_files)

    def no_sform_zero_pixdim(h):
        h.set_sform(None, code=0)
        h.set_qform(aff, code=1)
        h["pixdim"][1:4] = 0

    img = load_scan(_header_edit(ref, aff, tmp_path / "zp.nii.gz", no_sform_zero_pixdim))
    assert img.meta["spacing"] == pytest.approx((1.0, 1.0, 1.0))
    assert any("zero or invalid voxel size" in w and "1 mm assumed along X, Y, Z" in w for w in img.meta["warnings"])
    assert "setting 0 dims to 1" not in capfd.readouterr().err  # nibabel's own log line does not leak
    # a valid sform defines the geometry: pixdim 0 does not matter there
    img = load_scan(_header_edit(ref, aff, tmp_path / "zps.nii.gz", lambda h: h["pixdim"].__setitem__(slice(1, 4), 0)))
    np.testing.assert_allclose(img.affine.numpy(), aff, atol=1e-4)


def test_nan_and_singular_affines_are_refused(dipy_files, tmp_path):
    ref, aff = _crop(dipy_files)

    def nan_sform(h):
        h["srow_x"][0] = np.nan
        h["qform_code"] = 0

    def singular(h):
        for r in ("srow_x", "srow_y", "srow_z"):
            h[r][0] = 0
        h["qform_code"] = 0

    with pytest.raises(CaseError, match=r"nan.nii.gz: the voxel geometry is unknown \(sform: the affine holds NaN"):
        load_scan(_header_edit(ref, aff, tmp_path / "nan.nii.gz", nan_sform))
    with pytest.raises(CaseError, match=r"sing.nii.gz: .*singular: voxel axis X has zero length.* — fix the header"):
        load_scan(_header_edit(ref, aff, tmp_path / "sing.nii.gz", singular))


def test_singular_sform_falls_back_to_a_valid_qform(dipy_files, tmp_path):
    ref, aff = _crop(dipy_files)

    def singular_with_qform(h):
        for r in ("srow_x", "srow_y", "srow_z"):
            h[r][0] = 0
        h.set_qform(aff, code=1)

    img = load_scan(_header_edit(ref, aff, tmp_path / "sq.nii.gz", singular_with_qform))
    assert any("the qform is used instead" in w for w in img.meta["warnings"])
    assert abs(np.linalg.det(img.affine.numpy()[:3, :3])) > 0


def test_enhance_cli_nan_affine_is_a_one_line_failure(dipy_files, tmp_path, capsys):
    ref, aff = _crop(dipy_files)
    p = _header_edit(ref, aff, tmp_path / "nanaff.nii.gz", lambda h: h["srow_y"].__setitem__(1, np.nan))
    rc = main(["baseline", "--task", "denoise", "--method", "gaussian", "-i", str(p), "-o", str(tmp_path / "o.nii.gz"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "voxel geometry is unknown" in err and "unexpected error" not in err
    assert not (tmp_path / "o.nii.gz").exists()


# ----------------------------------------------------------------------------------- size: bombs, zero
def _bomb(dipy_files, path, gz: bool, shape=(4096, 4096, 256)):
    """The real S0_10slices file with only its header's dimensions changed (the file stays small)."""
    src = nib.load(dipy_files / "S0_10slices.nii.gz")
    hdr = src.header.copy()
    body = gzip.open(dipy_files / "S0_10slices.nii.gz").read()
    hdr.set_data_shape(shape)
    raw = hdr.binaryblock + body[len(hdr.binaryblock):]
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


@pytest.fixture
def no_voxel_reads(monkeypatch):
    """Fail if any voxel data is read (nibabel's array proxy)."""
    from nibabel.arrayproxy import ArrayProxy

    def boom(*a, **k):
        raise AssertionError("voxel data was read")

    monkeypatch.setattr(ArrayProxy, "__array__", boom)
    monkeypatch.setattr(ArrayProxy, "__getitem__", boom)
    monkeypatch.setattr(ArrayProxy, "get_unscaled", boom)


@pytest.mark.parametrize("gz", [True, False])
def test_header_claiming_a_huge_image_is_refused_before_reading(dipy_files, tmp_path, no_voxel_reads, gz):
    p = _bomb(dipy_files, tmp_path / ("bomb.nii.gz" if gz else "bomb.nii"), gz)
    assert p.stat().st_size < 400_000
    t0 = time.perf_counter()
    with pytest.raises(CaseError) as e:
        load_scan(p)
    assert time.perf_counter() - t0 < 2.0
    line = e.value.line()
    assert "\n" not in line and line.startswith(str(p))
    assert "the header claims 4096x4096x256 voxels of uint16 (8.6 GB)" in line
    assert ("gzip file can expand to at most" if gz else "the file holds only") in line
    assert "copy it again from the source" in line


def test_info_on_a_header_bomb_fails_fast_in_one_line(dipy_files, tmp_path, capsys):
    import resource

    p = _bomb(dipy_files, tmp_path / "bomb.nii.gz", True)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rc = main(["info", str(p)])
    assert time.perf_counter() - t0 < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 200_000  # KiB: no 16 GB allocation
    err = capsys.readouterr().err
    assert rc != 0 and "the header claims 4096x4096x256" in err and "unexpected error" not in err


def test_voxel_limit_is_configurable(dipy_files, monkeypatch, no_voxel_reads):
    monkeypatch.setenv("MEDLDM_MAX_VOXELS", "100000")
    with pytest.raises(CaseError, match=r"163840 voxels to read .* exceed the limit of 100000 .* MEDLDM_MAX_VOXELS"):
        load_scan(dipy_files / "S0_10slices.nii.gz")
    monkeypatch.setenv("MEDLDM_MAX_VOXELS", "lots")
    with pytest.raises(CaseError, match="MEDLDM_MAX_VOXELS: 'lots' is not a positive voxel count"):
        load_scan(dipy_files / "S0_10slices.nii.gz")


def test_real_scans_pass_the_size_checks(dipy_files, mni152):
    for p in (dipy_files / "S0_10slices.nii.gz", dipy_files / "aniso_vox.nii.gz", mni152):
        assert load_scan(p).numel() > 0


def test_zero_size_nifti_fails_at_load_and_convert_writes_nothing(dipy_files, tmp_path, capsys):
    p = _bomb(dipy_files, tmp_path / "zero.nii.gz", True, shape=(128, 0, 10))
    with pytest.raises(CaseError, match=r"dimension of size 0 \(shape \(128, 0, 10\)\)"):
        load_scan(p)
    out = tmp_path / "out"
    rc = main(["convert", str(p), str(out), "--to", "dicom", "--quiet"])
    assert rc == 1 and "dimension of size 0" in capsys.readouterr().err
    assert not list(out.rglob("*.dcm")) if out.exists() else True


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_says_which_cases_and_slices_are_left_out(mni152, tmp_path):
    im = nib.load(str(mni152))
    vol = np.asarray(im.dataobj, dtype=np.float32)
    rng = np.random.default_rng(0)
    for d in ("ref", "pred"):
        (tmp_path / d).mkdir()
    for cid, z in (("a", 80), ("b", 95), ("c", 110)):
        ref = vol[60:140, 70:150, z:z + 4]
        pred = ref + rng.normal(0, 8, ref.shape).astype(np.float32)
        if cid == "b":
            pred[40, 40, 1] = np.nan
            pred[41, 40, 1] = np.inf
        _save(ref, im.affine, tmp_path / "ref" / f"{cid}.nii.gz")
        _save(pred, im.affine, tmp_path / "pred" / f"{cid}.nii.gz")
    out = tmp_path / "rep"
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--data-range", "255",
               "-o", str(out), "--quiet"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    psnr = s["methods"]["pred"]["psnr"]
    assert psnr["volume"]["n"] == 2 and psnr["volume"]["n_missing"] == 1
    assert psnr["slice_mean"]["n"] == 3  # case b keeps its 3 clean slices
    ex = s["excluded"]["pred"]["psnr"]
    assert ex["cases"] == 1 and ex["of_cases"] == 3 and ex["slices"] == 1 and ex["of_slices"] == 12
    assert "2 NaN/inf voxel(s) in the prediction" in ex["reasons"]["b"]
    assert any(line.startswith("pred psnr: 1 of 3 case(s) left out of the 3D means") for line in s["exclusions"])
    vals = [float(r["psnr"]) for r in csv.DictReader(open(out / "metrics.csv"))
            if r["level"] == "volume" and r["psnr"] != "nan"]
    assert psnr["volume"]["mean"] == pytest.approx(np.mean(vals))  # the mean of the two finite cases
    html = (out / "report.html").read_text()
    assert "Left out of the means" in html and "1 left out (NaN" in html
    assert "2 NaN/inf voxel(s) in the prediction" in html


def test_evaluate_without_nan_says_nothing_is_left_out(mni152, tmp_path):
    im = nib.load(str(mni152))
    ref = np.asarray(im.dataobj, dtype=np.float32)[60:140, 70:150, 80:84]
    for d in ("ref", "pred"):
        (tmp_path / d).mkdir()
    _save(ref, im.affine, tmp_path / "ref" / "a.nii.gz")
    _save(ref + 3.0, im.affine, tmp_path / "pred" / "a.nii.gz")
    out = tmp_path / "rep"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--data-range", "255",
                 "-o", str(out), "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["excluded"]["pred"]["psnr"]["cases"] == 0
    # MS-SSIM cannot be computed on 80 x 80 x 4: left out, and the reason is given
    assert s["excluded"]["pred"]["ms_ssim"]["cases"] == 1
    assert "ms_ssim" in s["excluded"]["pred"]["ms_ssim"]["reasons"]["a"]
    assert torch.isfinite(torch.tensor(s["methods"]["pred"]["psnr"]["volume"]["mean"]))
