"""Thick -> thin slices (task ``thinslice``, shipped ``mr-thinslice-4x``): the training pair maker, the geometry
of the thin grid, the inference pipeline on a tiny trained model, and the held-out quality goal (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medldm.config import ConfigError
from medldm.data.condition import make_pair, thick_matrix, thin_matrix, thinslice_degrade
from medldm.data.degrade import thick_slices
from medldm.eval.baselines import upsample
from medldm.io.errors import CaseError
from medldm.pipelines.thinslice import (
    ThinSliceEnhancer,
    interpolate_z,
    reformat_axes,
    thin_affine,
    thin_shape,
)
from medldm.train.schema import load_config

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "thinslice_2d_tiny.yaml"
GOAL_DB = 1.5  # issue 12: thick -> thin must beat cubic along z by this much on held-out scans


# ------------------------------------------------------------------------------------------- pair maker
def test_box_profile_is_the_mean_of_scale_thin_slices():
    w = thick_matrix(12, 4, "box").numpy()
    assert w.shape == (3, 12)
    x = np.arange(12.0) ** 2
    np.testing.assert_allclose(w @ x, [x[4 * k:4 * k + 4].mean() for k in range(3)])


def test_gaussian_profile_fwhm_and_centre():
    w = thick_matrix(32, 4, "gaussian").numpy()
    row = w[3]  # away from the borders
    assert row.sum() == pytest.approx(1.0)
    centre = float((row * np.arange(32)).sum())
    assert centre == pytest.approx(4 * 3 + 1.5, abs=1e-6)  # same centre as the box: thin index 4k + 1.5
    sd = np.sqrt(float((row * (np.arange(32) - centre) ** 2).sum()))
    assert 2 * np.sqrt(2 * np.log(2)) * sd == pytest.approx(4.0, rel=0.02)  # FWHM = 4 thin slices


def test_pair_is_medldm_degrade_thick_then_the_bicubic_baseline_along_either_axis():
    """The training degradation along an in-plane axis is exactly what the evaluation protocol does along Z:
    ``medldm degrade --kind thick`` (box) then ``medldm baseline --method bicubic --axis through``."""
    rng = np.random.default_rng(0)
    img = rng.random((2, 1, 16, 16))
    for axis in (0, 1):
        got = thinslice_degrade(torch.from_numpy(img), 4, "box", torch.full((2,), axis)).numpy()
        for n in range(2):
            sl = img[n, 0] if axis == 1 else img[n, 0].T  # the degraded axis last, as Z
            vol = sl[:, None, :]
            ref = upsample(thick_slices(vol, 4), 4, "bicubic", "through")[:, 0, :]
            np.testing.assert_allclose(got[n, 0] if axis == 1 else got[n, 0].T, ref, atol=1e-6)


def test_training_pair_equals_the_inference_condition_of_the_thick_scan():
    """One condition (issue 21.2): the thinslice training pair along either in-plane axis is what inference
    (``scan_condition``, the function the ThinSliceEnhancer runs) makes of the thick slices along Z."""
    from medldm.data.condition import scan_condition

    rng = np.random.default_rng(1)
    img = rng.random((2, 1, 16, 16)).astype(np.float32)
    for axis in (0, 1):
        got = thinslice_degrade(torch.from_numpy(img), 4, "box", torch.full((2,), axis)).numpy()
        for n in range(2):
            sl = img[n, 0] if axis == 1 else img[n, 0].T  # the degraded axis last, as Z
            cond, shape = scan_condition(thick_slices(sl[:, None, :], 4), "thinslice", {"scale": 4})
            assert shape == (16, 1, 16)
            np.testing.assert_allclose(got[n, 0] if axis == 1 else got[n, 0].T, cond.numpy()[:, 0, :], atol=1e-6)


def test_make_pair_thinslice_shapes_levels_and_axes():
    cfg = load_config(TINY)
    clean = torch.rand(6, 1, 32, 32) * 2 - 1
    low, level = make_pair(clean, "thinslice", cfg.degrade, torch.Generator().manual_seed(0))
    assert low.shape == clean.shape and torch.all(level == 0)
    val, _ = make_pair(clean, "thinslice", cfg.degrade, torch.Generator().manual_seed(0), 0.0)
    for n in range(6):  # validation alternates the degraded axis: 0, 1, 0, ...
        ref = thinslice_degrade(clean[n:n + 1], 4, "box", torch.tensor([n % 2]))
        torch.testing.assert_close(val[n:n + 1], ref)
    m = thin_matrix(4, 4).numpy()
    np.testing.assert_allclose(m.sum(axis=1), 1.0)  # interpolation keeps constants


@pytest.mark.parametrize(("override", "needle"), [
    ("degrade.kind=downsample", "task 'thinslice': needs degrade.kind 'thick'"),
    ("degrade.scale=1", "task 'thinslice': needs degrade.kind 'thick', degrade.scale >= 2"),
    ("data.patch_size=[30,30]", "needs multiples of degrade.scale (4)"),
    ("degrade.profile=triangle", "degrade.profile"),
])
def test_thinslice_config_invariants(override, needle):
    with pytest.raises((ConfigError, ValueError), match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, [override])


# --------------------------------------------------------------------------------------------- geometry
def _oblique_affine(stretch=(0.9, 1.1, 1.0)) -> np.ndarray:
    a = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(stretch)
    a[:3, 3] = [-40.0, 12.5, 7.0]
    return a


def test_thin_grid_puts_voxel_j_where_thin_slice_j_was():
    """Thin volume (affine A) -> ``medldm degrade --kind thick --level 4`` -> thin grid: the affine is A again,
    and thick slice k (the mean of thin slices 4k..4k+3) sits at thin index 4k + 1.5 (explicit formula)."""
    from monai.data import MetaTensor

    a = _oblique_affine()
    vol = MetaTensor(torch.rand(5, 6, 24), affine=torch.as_tensor(a))
    thick = thick_slices(vol, 4)
    at = np.asarray(thick.affine, dtype=np.float64)
    assert tuple(thick.shape) == (5, 6, 6)
    for k in range(6):
        centre = a @ np.array([2.0, 3.0, 4 * k + 1.5, 1.0])
        np.testing.assert_allclose(at @ np.array([2.0, 3.0, k, 1.0]), centre, atol=1e-9)
    assert thin_shape(thick.shape, 4) == (5, 6, 24)
    np.testing.assert_allclose(thin_affine(at, tuple(thick.shape), 4), a, atol=1e-9)
    # interpolation along Z = the bicubic baseline, shape (X, Y, 4Z)
    arr = thick.numpy()
    np.testing.assert_allclose(interpolate_z(arr, 4), upsample(arr, 4, "bicubic", "through"), atol=1e-6)


def test_reformat_axes_skip_one_voxel_wide_reformats():
    assert reformat_axes((64, 64, 10)) == [0, 1]
    assert reformat_axes((300, 1, 80)) == [1]  # a 2D slice stored as (X, 1, Z): only its (X, Z) plane
    assert reformat_axes((1, 300, 80)) == [0]
    assert reformat_axes((128, 10, 80), (2.0, 53.0, 2.0)) == [1]  # axis 1 (2 mm) only: axis 0's slices are 53 mm x 2 mm
    assert reformat_axes((64, 64, 10), (1.0, 1.2, 4.0)) == [0, 1]


# ------------------------------------------------------------------------------- tiny model, pipeline
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny config trained end to end (VAE, LDM, refiner: a few steps each)."""
    from medldm.train.runner import train

    out = tmp_path_factory.mktemp("thinslice") / "run"
    summary = train(load_config(TINY), out)
    assert {"vae", "ldm", "refine"} <= set(summary)
    return out / "model"


def _thick_volume(shape=(20, 24, 6), spacing=(1.0, 1.0, 4.0), dtype=torch.float32):
    from monai.data import MetaTensor

    a = _oblique_affine((1.0, 1.0, 1.0)) @ np.diag([*spacing, 1.0])
    x = torch.linspace(0, 1, shape[0])[:, None, None] * 300 + torch.rand(shape) * 20
    return MetaTensor(x.to(dtype), affine=torch.as_tensor(a), meta={"filename_or_obj": "thick.nii.gz"})


def test_tiny_training_writes_a_thinslice_model_folder(tiny_model):
    extra = json.loads((tiny_model / "extra.json").read_text())
    assert extra["task"] == "thinslice"
    assert extra["degrade"]["kind"] == "thick" and extra["degrade"]["scale"] == 4
    assert extra["degrade"]["profile"] == "box"
    assert (tiny_model / "refiner.safetensors").is_file()


def test_pipeline_output_grid_affine_and_units(tiny_model):
    from medldm.models import load_model
    from medldm.pipelines.enhance import EnhanceOptions

    enh = ThinSliceEnhancer(load_model(tiny_model))
    img = _thick_volume()
    res = enh.enhance(img, EnhanceOptions(batch_size=32))
    assert tuple(res.image.shape) == (20, 24, 24)
    np.testing.assert_allclose(np.asarray(res.image.affine, dtype=np.float64),
                               thin_affine(np.asarray(img.affine, dtype=np.float64), (20, 24, 6), 4), atol=1e-9)
    sp = res.image.meta["spacing"]
    assert sp == pytest.approx((1.0, 1.0, 1.0))  # Z: 4 mm -> 1 mm
    assert res.info["task"] == "thinslice" and res.info["axes"] == [0, 1] and res.info["refined"]
    assert torch.isfinite(res.image).all()
    assert float(res.image.min()) > -200 and float(res.image.max()) < 600  # scanner units, not model units


def test_pipeline_nonfinite_constant_and_spacing(tiny_model):
    from medldm.models import load_model
    from medldm.pipelines.enhance import EnhanceOptions

    enh = ThinSliceEnhancer(load_model(tiny_model))
    img = _thick_volume()
    img[3, 4, 2] = float("nan")
    res = enh.enhance(img, EnhanceOptions(batch_size=32))
    nan = torch.isnan(res.image)
    assert int(nan.sum()) == 4 and bool(nan[3, 4, 8:12].all())  # the thin slices of that thick voxel
    assert "NaN" in res.info["warning"]
    const = _thick_volume(dtype=torch.int16)
    const[:] = 7
    res = enh.enhance(const)
    assert res.info["constant"] and tuple(res.image.shape) == (20, 24, 24) and bool((res.image == 7).all())
    with pytest.raises(CaseError) as e:
        enh.enhance(_thick_volume(spacing=(1.0, 1.0, 1.0)))
    assert "\n" not in str(e.value) and "1 x the in-plane pixel" in str(e.value).replace("1.00", "1")


# ------------------------------------------------------------------------------------ held-out goal
def _heldout():
    card = ROOT / "medldm" / "assets" / "models" / "mr-thinslice-4x" / "card.json"
    if not card.is_file():
        pytest.skip("mr-thinslice-4x is not installed")
    return json.loads(card.read_text())["heldout"]


def _goal_met() -> bool:
    try:
        h = _heldout()
    except BaseException:  # noqa: BLE001 — skip/absent: not decided here
        return False
    return h["methods"]["mr-thinslice-4x"]["psnr"] >= h["methods"]["bicubic"]["psnr"] + GOAL_DB


@pytest.mark.xfail(not _goal_met(), strict=True,
                   reason="issue 12 goal: mr-thinslice-4x >= cubic along z + 1.5 dB on held-out scans; measured +0.82 dB "
                          "(31.34 vs bicubic 30.52 dB, 4 held-out scans, data_range 1): not met")
def test_goal_thinslice_beats_cubic_by_1_5_db():
    h = _heldout()
    assert h["methods"]["mr-thinslice-4x"]["psnr"] >= h["methods"]["bicubic"]["psnr"] + GOAL_DB


def test_dicom_series_thick_to_thin_derived_series(tiny_model, tmp_path):
    """A thick DICOM series in, a derived DICOM series of 4x the slices out: read back, the affine is the thin
    grid's (thin slice 0 lies 1.5 thin slices before the centre of thick slice 0)."""
    from monai.data import MetaTensor

    from medldm.io.reader import load_scan
    from medldm.io.writer import save_scan
    from medldm.models import load_model

    a = np.diag([0.8, 0.8, 3.2, 1.0])
    a[:3, 3] = [-10.0, 5.0, 20.0]
    x = (torch.rand(24, 20, 5, generator=torch.Generator().manual_seed(0)) * 500).round()
    save_scan(MetaTensor(x, affine=torch.as_tensor(a), meta={"original_dtype": "int16"}), tmp_path / "thick")
    thick = load_scan(tmp_path / "thick")
    res = ThinSliceEnhancer(load_model(tiny_model)).enhance(thick)
    save_scan(res.image, tmp_path / "thin", reference=tmp_path / "thick")
    thin = load_scan(tmp_path / "thin")
    assert tuple(thin.shape) == (24, 20, 20)
    np.testing.assert_allclose(np.asarray(thin.affine, dtype=np.float64),
                               thin_affine(np.asarray(thick.affine, dtype=np.float64), (24, 20, 5), 4), atol=1e-4)
    assert float(np.asarray(thin.affine)[2, 3]) == pytest.approx(20.0 - 1.5 * 0.8, abs=1e-4)


@pytest.fixture
def one_thread():
    """One torch thread: with two on a loaded 2-core machine this test took 65 s instead of 1.5 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_shipped_model_beats_cubic_on_a_held_out_volume(one_thread):
    """mr-thinslice-4x on dipy's test_piesno (used by no shipped model), X made Z, both reformats fused: better
    than the cubic baseline along Z (measured 28.58 vs 28.37 dB on this crop, data_range 1)."""
    from monai.data import MetaTensor

    from medldm.data.datasets import resolve_path
    from medldm.data.intensity import fit_normalization, normalize
    from medldm.eval.baselines import upsample_scan
    from medldm.models import load_model
    from medldm.shipped import installed_models, resolve_model

    if "mr-thinslice-4x" not in installed_models():
        pytest.skip("mr-thinslice-4x is not installed")
    try:
        path = resolve_path("pkg://dipy/data/files/test_piesno.nii.gz")
    except Exception:  # noqa: BLE001
        pytest.skip("dipy is not installed")
    from medldm.io.reader import load_scan

    arr = np.asarray(load_scan(path).numpy(), np.float32).transpose(1, 2, 0)[:, :, 24:72]
    vol = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), affine=torch.eye(4, dtype=torch.float64))
    ref = normalize(vol, fit_normalization(vol, "MR", out_range=(0.0, 1.0)))
    thick = thick_slices(ref, 4)
    res = ThinSliceEnhancer(load_model(resolve_model("mr-thinslice-4x"))).enhance(thick)
    assert res.info["axes"] == [0, 1]

    def psnr(a) -> float:
        return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(ref, np.float64)) ** 2)))

    cubic = psnr(upsample_scan(thick, 4, "bicubic", "through"))
    assert psnr(res.image) > cubic + 0.1, (cubic, psnr(res.image))


def test_cli_enhance_dispatches_thinslice_models(tiny_model, tmp_path, one_thread):
    """`medldm enhance -m <thinslice model> -i thick/ -o thin/` on a folder with a NIfTI and a DICOM series: 4x the
    slices, the thin grid's affine, finite values; a scan with the wrong slice ratio fails with one line."""
    from monai.data import MetaTensor

    from medldm.cli import main
    from medldm.io.reader import load_scan
    from medldm.io.writer import save_scan

    a = np.diag([0.8, 0.8, 3.2, 1.0])
    a[:3, 3] = [-10.0, 5.0, 20.0]
    x = (torch.rand(24, 20, 5, generator=torch.Generator().manual_seed(1)) * 500).round()
    src = tmp_path / "thick"
    save_scan(MetaTensor(x, affine=torch.as_tensor(a), meta={"original_dtype": "int16"}), src / "ser")
    save_scan(MetaTensor(x, affine=torch.as_tensor(a), meta={"original_dtype": "int16"}), src / "vol.nii.gz")
    b = a.copy()
    b[2, 2] = 2.0  # 2.5x the pixel: not this model's ratio
    save_scan(MetaTensor(x, affine=torch.as_tensor(b), meta={"original_dtype": "int16"}), src / "odd.nii.gz")
    assert main(["enhance", "-m", str(tiny_model), "-i", str(src), "-o", str(tmp_path / "thin"), "--device", "cpu",
                 "--quiet"]) == 1
    for name in ("ser", "vol.nii.gz"):
        out = load_scan(tmp_path / "thin" / name)
        assert tuple(out.shape) == (24, 20, 20) and np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(np.asarray(out.affine, dtype=np.float64), thin_affine(a, (24, 20, 5), 4), atol=1e-4)
    assert not (tmp_path / "thin" / "odd.nii.gz").exists()
    report = json.loads((tmp_path / "thin" / "medldm-enhance-report.json").read_text())
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 1}
