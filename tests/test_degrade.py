"""Degradations hit their nominal level on real scans; seeds reproduce; geometry is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medldm.data import lowdose as ld
from medldm.data import radon as rd
from medldm.data.degrade import (
    apply_degradation,
    area_weights,
    downsample,
    gaussian_noise,
    intensity_range,
    lowdose_ct,
    rician_noise,
    thick_slices,
)
from medldm.io import load_scan
from medldm.io.geometry import spacing_from_affine, world_corners


@pytest.fixture(scope="module")
def ct_small(pydicom_files):
    return load_scan(pydicom_files / "CT_small.dcm")  # 128² head CT, int16 HU, 0.66 mm


@pytest.fixture(scope="module")
def mr_s0(dipy_files):
    return load_scan(dipy_files / "S0_10slices.nii.gz")  # 128²x10 MR, uint16


@pytest.fixture(scope="module")
def mni_slab(mni152):
    img = load_scan(mni152)
    return img[:, :, 80:104]  # 24 axial slices of the MNI152 T1 (uint8, 1 mm)


def _corners_equal(a, b) -> bool:
    return np.allclose(world_corners(a.affine.numpy(), a.shape), world_corners(b.affine.numpy(), b.shape), atol=1e-6)


# ---------------------------------------------------------------- noise
def test_gaussian_sigma_and_seeds(mr_s0):
    level = 0.05
    out = gaussian_noise(mr_s0, level, seed=7)
    assert type(out) is type(mr_s0) and torch.equal(out.affine, mr_s0.affine)
    x = mr_s0.numpy().astype(np.float64)
    r = np.percentile(x, 99.5) - np.percentile(x, 0.5)
    assert intensity_range(x) == pytest.approx(r)
    measured = float(np.std(out.numpy() - x))
    assert measured == pytest.approx(level * r, rel=0.05)
    assert torch.equal(gaussian_noise(mr_s0, level, seed=7), out)
    assert not torch.equal(gaussian_noise(mr_s0, level, seed=8), out)
    # numpy in -> numpy out, absolute sigma
    a = gaussian_noise(x[:, :, 0], 10.0, seed=1, relative=False)
    assert isinstance(a, np.ndarray) and a.shape == (128, 128)
    assert np.std(a - x[:, :, 0]) == pytest.approx(10.0, rel=0.05)


def test_rician_background_rayleigh_and_bright_gaussian(mni_slab):
    level = 0.04
    out = rician_noise(mni_slab, level, seed=3)
    x = mni_slab.numpy().astype(np.float64)
    y = out.numpy().astype(np.float64)
    s = level * intensity_range(x)
    assert s > 1.0
    bg = x == 0
    assert bg.sum() > 100_000
    # zero signal: magnitude is Rayleigh(s), E[y^2] = 2 s^2, mean = s sqrt(pi/2)
    assert np.sqrt(np.mean(y[bg] ** 2) / 2) == pytest.approx(s, rel=0.05)
    assert np.mean(y[bg]) == pytest.approx(s * np.sqrt(np.pi / 2), rel=0.05)
    # bright tissue (SNR > 10): Rician ~ Gaussian with std s
    bright = x > 10 * s
    assert bright.sum() > 10_000
    assert np.std(y[bright] - x[bright]) == pytest.approx(s, rel=0.05)
    assert y.min() >= 0
    assert torch.equal(rician_noise(mni_slab, level, seed=3), out)
    assert not torch.equal(rician_noise(mni_slab, level, seed=4), out)
    with pytest.raises(ValueError, match="non-negative"):
        rician_noise(np.array([[-100.0, 5.0], [3.0, 4.0]]), 0.1, seed=0)


# ---------------------------------------------------------------- low-dose CT
def test_projector_inverts_and_matches_skimage(ct_small):
    from skimage.transform import iradon, radon

    mu = ld._to_mu(ct_small.as_tensor()[..., 0].double(), ld.MU_WATER)[None]
    n = mu.shape[-1]
    nv = rd.default_views(n)
    sino = rd.radon(mu, nv)
    assert torch.allclose(sino.sum(-1), mu.sum().expand(1, nv), rtol=1e-3)  # every view sees all the mass
    rec = rd.fbp(sino, n)[0].numpy()
    m = mu[0].numpy()
    theta = np.arange(nv) * 180.0 / nv
    sk = iradon(radon(m, theta, circle=False), theta, output_size=n, circle=False)
    err_ours = np.abs(rec - m).mean() / m.mean()
    err_sk = np.abs(sk - m).mean() / m.mean()
    assert err_ours < 0.03 and err_ours < 1.5 * err_sk
    assert np.abs(rec - sk).mean() / m.mean() < 0.02


def test_coarse_projection_variance(ct_small):
    hu = ct_small.as_tensor()[None, :127, :127, 0].double()  # odd size exercises the padding
    nv = rd.default_views(127)
    v1 = ld._sino_var(hu, 0.66, 0.25, 1e5, nv, ld.MU_WATER, 0.0, 1)
    v2 = ld._sino_var(hu, 0.66, 0.25, 1e5, nv, ld.MU_WATER, 0.0, 2)
    assert float((v1 - v2).abs().mean() / v1.mean()) < 0.02


def test_lowdose_extra_noise_matches_direct_poisson(ct_small):
    """The added noise has the variance of (low-dose Poisson) - (full-dose Poisson) scans of the same object."""
    hu = ct_small.as_tensor()[..., 0].double()[None]
    px, d, i0 = 0.661468, 0.25, 1e5
    n = hu.shape[-1]
    nv = rd.default_views(n)
    p = rd.radon(ld._to_mu(hu, ld.MU_WATER), nv) * px
    lam = (i0 * torch.exp(-p)).numpy()
    rng = np.random.default_rng(0)

    def recon_error(counts, incident):  # (R, V, D) counts -> (R, X, Y) HU error of the FBP reconstruction
        ph = -torch.log(torch.from_numpy(np.maximum(counts, 1)).double() / incident)
        return (rd.fbp(ph - p, n) / px * 1000 / ld.MU_WATER).numpy()

    body = ((hu[0] > -200) & (hu[0] < 200)).numpy()
    reps = 3
    lam3 = np.repeat(lam, reps, axis=0)
    full = recon_error(rng.poisson(lam3), i0)[:, body]
    low = recon_error(rng.poisson(d * lam3), d * i0)[:, body]
    direct_extra = np.sqrt(low.var() - full.var())
    sim = ld.lowdose_noise(hu.expand(reps, -1, -1), px, d, np.random.default_rng(1), i0=i0).numpy()[:, body]
    pred = ld.lowdose_noise_std(hu, px, d, i0=i0)[0].numpy()[body]
    assert sim.std() == pytest.approx(direct_extra, rel=0.05)
    assert np.sqrt(np.mean(pred**2)) == pytest.approx(direct_extra, rel=0.05)


def test_lowdose_dose_scaling(ct_small):
    body = ((ct_small[..., 0] > -200) & (ct_small[..., 0] < 200)).numpy()
    x = ct_small.numpy()[..., 0]
    # predicted std at dose 0.5 = sqrt(1/0.5 - 1) x full-dose noise = the full-dose noise itself
    full = np.sqrt(np.mean(ld.lowdose_noise_std(ct_small.as_tensor()[None, ..., 0], 0.661468, 0.5)[0].numpy()[body] ** 2))
    assert 5 < full < 50  # HU: the documented default I0 gives a plausible thin-slice noise level
    measured = {}
    for i, d in enumerate((0.5, 0.25, 0.1)):
        out = apply_degradation(ct_small, "lowdose", d, seed=100 + i)
        assert out.shape == ct_small.shape and torch.equal(out.affine, ct_small.affine)
        assert out.meta["degradation"]["kind"] == "lowdose" and out.meta["degradation"]["level"] == d
        noise = out.numpy()[..., 0] - x
        measured[d] = noise[body].std()
        assert abs(noise[body].mean()) < 0.1 * measured[d]  # zero-mean: HU preserved on average
        assert measured[d] == pytest.approx(full * np.sqrt(1 / d - 1), rel=0.05)
    for d in (0.25, 0.1):  # measured std follows sqrt(1/d - 1)
        assert measured[d] / measured[0.5] == pytest.approx(np.sqrt(1 / d - 1), rel=0.05)


def test_lowdose_keeps_outside_fov_padding(pydicom_data):
    img = downsample(load_scan(pydicom_data / "693_UNCI.dcm"), 4)  # 128², 1.9 mm: fast
    out = lowdose_ct(img, 0.25, seed=0)
    pad = img.numpy() < -1500
    assert pad.sum() > 500
    assert np.array_equal(out.numpy()[pad], img.numpy()[pad])
    assert (out.numpy() != img.numpy())[~pad].mean() > 0.99


def test_lowdose_calibrated_to_input_noise(ct_small):
    body = ((ct_small[..., 0] > -200) & (ct_small[..., 0] < 200)).numpy()
    out = apply_degradation(ct_small, "lowdose", 0.25, seed=3, full_dose_noise=8.0)
    i0 = out.meta["degradation"]["i0"]
    assert i0 > 1e5  # 8 HU is quieter than the default I0's ~20 HU
    measured = (out.numpy() - ct_small.numpy())[..., 0][body].std()
    assert measured == pytest.approx(8.0 * np.sqrt(3.0), rel=0.05)


def test_lowdose_3d_seeds_and_modality(ct_small, mr_s0):
    from monai.data import MetaTensor

    meta = {k: v for k, v in ct_small.meta.items() if k != "affine"}
    vol = MetaTensor(ct_small.as_tensor().repeat(1, 1, 2), affine=ct_small.affine, meta=meta)
    a = lowdose_ct(vol, 0.25, seed=5)
    b = lowdose_ct(vol, 0.25, seed=5)
    c = lowdose_ct(vol, 0.25, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    n0, n1 = (a[..., k] - vol[..., k] for k in range(2))
    assert not torch.allclose(n0, n1)  # each slice gets its own noise
    assert torch.equal(lowdose_ct(vol, 1.0, seed=5).as_tensor(), vol.as_tensor())
    with pytest.raises(ValueError, match="CT in Hounsfield"):
        apply_degradation(mr_s0, "lowdose", 0.25, seed=0)
    with pytest.raises(ValueError, match="spacing"):
        lowdose_ct(ct_small.numpy()[..., 0], 0.25, seed=0)
    arr = lowdose_ct(ct_small.numpy()[..., 0], 0.25, seed=0, spacing=(0.661468, 0.661468))
    assert isinstance(arr, np.ndarray) and arr.shape == (128, 128)


# ---------------------------------------------------------------- resolution
def test_downsample_area_geometry_and_values(pydicom_data):
    img = load_scan(pydicom_data / "693_UNCI.dcm")  # 512² head CT, 0.479 mm
    x = img.numpy()[..., 0].astype(np.float64)
    for f in (2, 4):
        out = downsample(img, f)
        assert out.shape == (512 // f, 512 // f, 1)
        sp0, sp1 = spacing_from_affine(img.affine.numpy()), spacing_from_affine(out.affine.numpy())
        assert np.allclose(sp1[:2], np.array(sp0[:2]) * f) and sp1[2] == pytest.approx(sp0[2])
        assert out.meta["spacing"] == pytest.approx(sp1)
        assert _corners_equal(out, img)
        block = x.reshape(512 // f, f, 512 // f, f).mean((1, 3))
        assert np.allclose(out.numpy()[..., 0], block, atol=1e-3)
    # a size the factor does not divide: same field of view, spacing n/new_n
    odd = img[:, :255]
    o = downsample(odd, 2)
    assert o.shape == (256, 128, 1) and _corners_equal(o, odd)
    back = downsample(img, 2, restore="linear")
    assert back.shape == img.shape and torch.equal(back.affine, img.affine)
    assert np.abs(back.numpy() - img.numpy()).mean() < np.abs(np.diff(x, axis=0)).mean()


@pytest.mark.parametrize("factor", [2, 4])
def test_downsample_known_frequency_response(pydicom_data, factor):
    """Area down-sampling is a box filter + decimation: a cosine of frequency nu (cycles/pixel) added to a
    real image comes out as H(nu) cos(2 pi nu c + phase) at the new pixel centres c (old index units),
    H = sin(pi nu k) / (k sin(pi nu)): 0 at the old Nyquist, ~1 well below the new one."""
    base = load_scan(pydicom_data / "693_UNCI.dcm").numpy()[..., 0].astype(np.float64)
    i = np.arange(512)[:, None]
    ref = downsample(base, factor)
    centres = np.arange(512 // factor)[:, None] * factor + (factor - 1) / 2
    for nu in (0.5, 0.4, 0.3, 0.1, 0.05, 0.01):
        pat = 100.0 * np.cos(2 * np.pi * nu * i + 0.3) * np.ones((1, 512))
        diff = downsample(base + pat, factor) - ref  # linear: the pattern's own response
        h = np.sin(np.pi * nu * factor) / (factor * np.sin(np.pi * nu))
        expected = 100.0 * h * np.cos(2 * np.pi * nu * centres + 0.3) * np.ones((1, 512 // factor))
        assert np.allclose(diff, expected, atol=1e-2), (nu, h)
    assert abs(np.sin(np.pi * 0.5 * factor)) < 1e-12  # i.e. the old Nyquist is removed exactly


def test_downsample_gaussian_is_skimage(ct_small):
    from skimage.transform import resize

    out = downsample(ct_small, 2, method="gaussian")
    x = ct_small.numpy().astype(np.float64)
    ref = resize(x, (64, 64, 1), order=1, mode="reflect", anti_aliasing=True, preserve_range=True)
    assert np.allclose(out.numpy(), ref, atol=1e-3)
    assert _corners_equal(out, ct_small)


def test_area_weights_rows():
    w = area_weights(10, 3)
    assert np.allclose(w.sum(1), 1.0) and np.allclose(w.sum(0), 0.3)


def test_thick_slices(mni_slab, mr_s0):
    x = mni_slab.numpy().astype(np.float64)  # 24 slices
    for k in (2, 3, 4):
        out = thick_slices(mni_slab, k)
        assert out.shape == (197, 233, 24 // k)
        assert np.allclose(out.numpy(), x.reshape(197, 233, 24 // k, k).mean(-1), atol=1e-4)
        sp = spacing_from_affine(out.affine.numpy())
        assert sp == pytest.approx((1.0, 1.0, float(k)))
        assert _corners_equal(out, mni_slab)
    # another axis
    ax0 = thick_slices(mni_slab[:196], 4, axis=0)
    assert ax0.shape == (49, 233, 24) and spacing_from_affine(ax0.affine.numpy())[0] == pytest.approx(4.0)
    assert _corners_equal(ax0, mni_slab[:196])
    # 10 slices, k=3: 3 slabs over the same extent
    t = thick_slices(mr_s0, 3)
    assert t.shape == (128, 128, 3) and _corners_equal(t, mr_s0)
    r = thick_slices(mni_slab, 2, restore="linear")
    assert r.shape == mni_slab.shape and torch.equal(r.affine, mni_slab.affine)
    with pytest.raises(ValueError, match="3D"):
        thick_slices(x[..., 0], 2)
    with pytest.raises(ValueError, match="integer"):
        apply_degradation(mni_slab, "thick", 2.5)


def test_apply_degradation_records(mr_s0):
    out = apply_degradation(mr_s0, "gaussian", 0.02, seed=11)
    rec = out.meta["degradation"]
    assert rec["kind"] == "gaussian" and rec["seed"] == 11 and rec["sigma"] == pytest.approx(0.02 * rec["intensity_range"])
    assert "degradation" not in mr_s0.meta
    with pytest.raises(ValueError, match="unknown degradation"):
        apply_degradation(mr_s0, "blur", 1.0)
    with pytest.raises(ValueError, match="dose fraction"):
        apply_degradation(mr_s0, "lowdose", 1.5)
