"""medldm.metrics against the reference implementations, on real scans.

References: skimage.metrics (SSIM with gaussian_weights=True, sigma=1.5, use_sample_covariance=False;
PSNR) and pytorch_msssim.ms_ssim (skipped with a reason when not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from medldm.metrics import WINDOWS, ms_ssim, psnr, resolve_range, ssim
from medldm.metrics import core as metrics_core

SK = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
PAD = 5  # (11 - 1) // 2


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def _degrade(img: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """A realistic test partner: slight blur plus Gaussian noise."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(img, 0.7) + rng.normal(0.0, noise, img.shape)


def _b(a: np.ndarray) -> np.ndarray:
    return a[None, None]


@pytest.fixture(scope="module")
def ct_small(pydicom_files) -> np.ndarray:
    return _hu(pydicom_files / "CT_small.dcm")  # 128x128 HU


@pytest.fixture(scope="module")
def head_ct(pydicom_data) -> np.ndarray:
    return _hu(pydicom_data / "693_UNCI.dcm")  # 512x512 head CT, HU


@pytest.fixture(scope="module")
def mr_slice(dipy_files) -> np.ndarray:
    return np.load(dipy_files / "t1_coronal_slice.npy").astype(np.float64)  # 256x256 in [0, 1]


@pytest.fixture(scope="module")
def mni(mni152) -> np.ndarray:
    return np.asarray(nib.load(mni152).dataobj).astype(np.float64)  # 197x233x189, 0..255


# ---------------------------------------------------------------- SSIM vs skimage


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ssim_matches_skimage_ct_full_range(ct_small, dtype):
    ref, pred = ct_small, _degrade(ct_small, 25.0, 0)
    r = float(ref.max() - ref.min())
    expected = sk_ssim(ref, pred, data_range=r, **SK)
    got = ssim(_b(pred.astype(dtype)), _b(ref.astype(dtype)), data_range=r)
    assert got.shape == (1,)
    assert got.dtype == (torch.float64 if dtype == np.float64 else torch.float32)
    assert abs(got.item() - expected) < (1e-10 if dtype == np.float64 else 1e-5)
    assert 0.3 < expected < 0.999  # a real, non-trivial comparison


def test_ssim_head_ct_window_equals_skimage_on_clipped_shifted(head_ct):
    ref, pred = head_ct, _degrade(head_ct, 8.0, 1)
    lo, hi = WINDOWS["ct-brain"]
    expected = sk_ssim(np.clip(ref, lo, hi) - lo, np.clip(pred, lo, hi) - lo, data_range=hi - lo, **SK)
    got = ssim(_b(pred).astype(np.float32), _b(ref).astype(np.float32), data_range="ct-brain")
    assert abs(got.item() - expected) < 1e-4
    assert got.item() == pytest.approx(ssim(_b(pred), _b(ref), data_range=(lo, hi)).item(), abs=1e-5)


def test_ssim_mr_slice_gaussian_and_uniform(mr_slice):
    ref, pred = mr_slice, _degrade(mr_slice, 0.03, 2)
    got = ssim(_b(pred), _b(ref), data_range=1.0, dtype=torch.float32).item()
    assert abs(got - sk_ssim(ref, pred, data_range=1.0, **SK)) < 1e-4
    box = ssim(_b(pred), _b(ref), data_range=1.0, gaussian=False, win_size=7).item()
    expected_box = sk_ssim(ref, pred, data_range=1.0, win_size=7, use_sample_covariance=False)
    assert abs(box - expected_box) < 1e-10


def test_ssim_3d_matches_skimage(mni):
    ref = mni[60:100, 80:124, 60:96]  # 40x44x36 crop of the MNI152 T1
    pred = _degrade(ref, 6.0, 3)
    expected = sk_ssim(ref, pred, data_range=255.0, **SK)
    got32 = ssim(_b(pred).astype(np.float32), _b(ref).astype(np.float32), data_range=255.0)
    got64 = ssim(_b(pred), _b(ref), data_range=255.0)
    assert abs(got32.item() - expected) < 1e-4
    assert abs(got64.item() - expected) < 1e-10
    asked = ssim(
        _b(pred).astype(np.float32), _b(ref).astype(np.float32), data_range=255.0, dtype=torch.float64
    )
    assert asked.dtype == torch.float64 and abs(asked.item() - expected) < 1e-6  # inputs rounded to float32


def test_return_map_is_skimage_map_cropped(ct_small):
    ref, pred = ct_small, _degrade(ct_small, 25.0, 4)
    r = 2000.0
    _, full = sk_ssim(ref, pred, data_range=r, full=True, **SK)
    score, smap = ssim(_b(pred), _b(ref), data_range=r, return_map=True)
    assert smap.shape == (1, 1, 118, 118)
    np.testing.assert_allclose(smap[0, 0].numpy(), full[PAD:-PAD, PAD:-PAD], atol=1e-10)
    assert score.item() == pytest.approx(float(smap.mean()), abs=1e-12)


def test_conv_and_shift_paths_and_slabs_agree(mni, monkeypatch):
    ref = mni[50:110, 70:120, 60:100]
    pred = _degrade(ref, 6.0, 5)
    x, y = torch.from_numpy(_b(pred)).float(), torch.from_numpy(_b(ref)).float()
    shift = ssim(x, y, data_range=255.0, method="shift")
    conv = ssim(x, y, data_range=255.0, method="conv")
    mask = torch.from_numpy(_b(ref > 60))
    x, y = x.double(), y.double()  # float64: the slab logic must be exact, not merely close
    monkeypatch.setattr(metrics_core, "SLAB", 4096)  # force slabs with halos along the first axis
    slabs, slab_map = ssim(x, y, data_range=255.0, mask=mask, return_map=True)
    monkeypatch.undo()
    whole, whole_map = ssim(x, y, data_range=255.0, mask=mask, return_map=True)
    assert abs(shift.item() - conv.item()) < 1e-5
    assert abs(slabs.item() - whole.item()) < 1e-10
    torch.testing.assert_close(slab_map, whole_map, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- PSNR


def test_psnr_matches_skimage_2d_3d(ct_small, mni):
    pred = _degrade(ct_small, 25.0, 6)
    assert psnr(_b(pred), _b(ct_small), data_range=4000.0).item() == pytest.approx(
        sk_psnr(ct_small, pred, data_range=4000.0), rel=1e-12
    )
    ref3 = mni[60:100, 80:120, 60:100].astype(np.float32)
    pred3 = _degrade(ref3, 6.0, 7).astype(np.float32)
    got = psnr(_b(pred3), _b(ref3), data_range=255.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(sk_psnr(ref3, pred3, data_range=255.0), rel=1e-6)
    assert torch.isinf(psnr(_b(ref3), _b(ref3), data_range=255.0)).all()


def test_psnr_window_clips_both_images(head_ct):
    pred = _degrade(head_ct, 8.0, 8)
    lo, hi = WINDOWS["ct-soft-tissue"]
    expected = sk_psnr(np.clip(head_ct, lo, hi), np.clip(pred, lo, hi), data_range=hi - lo)
    assert psnr(_b(pred), _b(head_ct), data_range="ct-soft-tissue").item() == pytest.approx(
        expected, rel=1e-12
    )
    assert psnr(_b(pred), _b(head_ct), data_range=(lo, hi), reduction="mean").item() == pytest.approx(
        expected
    )


# ---------------------------------------------------------------- masks


def test_masked_psnr_and_ssim_match_manual(head_ct):
    ref, pred = head_ct, _degrade(head_ct, 8.0, 9)
    mask = (ref > 0) & (ref < 80)  # brain parenchyma-ish
    lo, hi = -160.0, 240.0
    rc, pc = np.clip(ref, lo, hi) - lo, np.clip(pred, lo, hi) - lo
    mse = np.mean((rc[mask] - pc[mask]) ** 2)
    got = psnr(_b(pred), _b(ref), data_range=(lo, hi), mask=_b(mask)).item()
    assert got == pytest.approx(10 * np.log10((hi - lo) ** 2 / mse), rel=1e-12)
    _, full = sk_ssim(rc, pc, data_range=hi - lo, full=True, **SK)
    inner = (slice(PAD, -PAD), slice(PAD, -PAD))
    expected = full[inner][mask[inner]].mean()
    got_ssim = ssim(_b(pred), _b(ref), data_range=(lo, hi), mask=_b(mask)).item()
    assert got_ssim == pytest.approx(expected, abs=1e-10)
    assert abs(got_ssim - ssim(_b(pred), _b(ref), data_range=(lo, hi)).item()) > 1e-3  # the mask matters


def test_empty_mask_gives_nan(ct_small):
    m = np.zeros_like(ct_small, dtype=bool)
    m[:3] = True  # only border voxels, outside SSIM's valid region
    assert torch.isnan(ssim(_b(ct_small), _b(ct_small), data_range=4000.0, mask=_b(m))).all()


# ---------------------------------------------------------------- ranges and windows


def test_missing_or_bad_data_range_is_refused(ct_small):
    x = _b(ct_small)
    for fn in (psnr, ssim, ms_ssim):
        with pytest.raises(TypeError, match="data_range is required"):
            fn(x, x)
    with pytest.raises(ValueError, match="unknown window"):
        ssim(x, x, data_range="ct-heart")
    with pytest.raises(ValueError, match="lo < hi"):
        psnr(x, x, data_range=(240, -160))
    with pytest.raises(ValueError, match="positive"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="not both"):
        resolve_range(1.0, window="ct-lung")
    assert resolve_range(2.5) == (None, None, 2.5)
    assert resolve_range(np.float32(2.0)) == (None, None, 2.0)
    assert resolve_range(np.array([-160, 240])) == (-160.0, 240.0, 400.0)
    with pytest.raises(TypeError, match="not understood"):
        resolve_range((0, 1, 2))
    assert resolve_range(window="ct-soft-tissue") == (-160.0, 240.0, 400.0)


def test_window_ignores_values_outside_and_changes_the_score(head_ct):
    ref, pred = head_ct, _degrade(head_ct, 20.0, 10)
    lo, hi = WINDOWS["ct-soft-tissue"]
    pred_out = pred.copy()
    pred_out[pred_out < lo] = lo - 500.0  # differences outside the window are clipped away
    a = ssim(_b(pred), _b(ref), data_range="ct-soft-tissue").item()
    b = ssim(_b(pred_out), _b(ref), data_range="ct-soft-tissue").item()
    assert a == pytest.approx(b, abs=1e-12)
    full = ssim(_b(pred), _b(ref), data_range=float(ref.max() - ref.min())).item()
    assert full - a > 0.05  # the same noise looks much better over the full HU range


# ---------------------------------------------------------------- batching, channels, inputs


def test_batch_equals_per_item_and_channels_average(mr_slice, ct_small):
    refs = np.stack([mr_slice[:128, :128], mr_slice[128:, 128:], (ct_small + 1024) / 4000])
    preds = np.stack([_degrade(r, 0.03, 11 + i) for i, r in enumerate(refs)])
    batch = ssim(preds[:, None], refs[:, None], data_range=1.0)
    single = torch.cat(
        [ssim(p[None, None], r[None, None], data_range=1.0) for p, r in zip(preds, refs, strict=True)]
    )
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-12)
    pb = psnr(preds[:, None], refs[:, None], data_range=1.0)
    for i in range(3):
        assert pb[i].item() == pytest.approx(sk_psnr(refs[i], preds[i], data_range=1.0), rel=1e-12)
    multi = ssim(preds[None], refs[None], data_range=1.0)  # one item, 3 channels
    expected = sk_ssim(refs, preds, data_range=1.0, channel_axis=0, **SK)
    assert multi.shape == (1,) and multi.item() == pytest.approx(expected, abs=1e-10)


def test_accepts_metatensor_and_rejects_bad_shapes(ct_small):
    from monai.data import MetaTensor

    x = MetaTensor(torch.from_numpy(_b(ct_small)).float())
    assert type(ssim(x, x, data_range=4000.0)) is torch.Tensor
    g = torch.from_numpy(_b(ct_small)).float().requires_grad_()
    for fn in (ssim, psnr):
        assert not fn(g, x, data_range=4000.0).requires_grad  # metrics, not losses
    with pytest.raises(ValueError, match="add batch and channel"):
        ssim(ct_small, ct_small, data_range=4000.0)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_b(ct_small), _b(ct_small[:64]), data_range=4000.0)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(_b(ct_small[:8, :8]), _b(ct_small[:8, :8]), data_range=4000.0)


# ---------------------------------------------------------------- MS-SSIM vs pytorch_msssim


@pytest.fixture(scope="module")
def pt_msssim():
    if importlib.util.find_spec("pytorch_msssim") is None:
        pytest.skip("pytorch-msssim not installed (reference for MS-SSIM): pip install pytorch-msssim")
    from pytorch_msssim import ms_ssim as ref_ms_ssim

    return ref_ms_ssim


def test_ms_ssim_matches_reference_head_ct(head_ct, pt_msssim):
    lo, hi = WINDOWS["ct-soft-tissue"]
    ref = torch.from_numpy(_b(head_ct)).float()
    pred = torch.from_numpy(_b(_degrade(head_ct, 10.0, 12))).float()
    expected = pt_msssim(
        pred.clamp(lo, hi) - lo, ref.clamp(lo, hi) - lo, data_range=hi - lo, size_average=False
    )
    got = ms_ssim(pred, ref, data_range="ct-soft-tissue")
    assert abs(got.item() - expected.item()) < 1e-4
    assert got.item() > ssim(pred, ref, data_range="ct-soft-tissue").item()  # coarse scales see less noise


def test_ms_ssim_matches_reference_odd_sizes_and_3d(mni, pt_msssim):
    sl = mni[:, :, 90]  # 197x233: odd sizes exercise the padded 2x2 pooling
    pred2 = _degrade(sl, 8.0, 13)
    x2, y2 = torch.from_numpy(_b(pred2)).float(), torch.from_numpy(_b(sl)).float()
    assert abs(ms_ssim(x2, y2, data_range=255.0).item() - pt_msssim(x2, y2, data_range=255.0).item()) < 1e-4
    vol = mni[18:179, 36:197, 14:175]  # 161^3, the smallest 5-scale volume
    x3 = torch.from_numpy(_b(_degrade(vol, 8.0, 14))).float()
    y3 = torch.from_numpy(_b(vol)).float()
    assert abs(ms_ssim(x3, y3, data_range=255.0).item() - pt_msssim(x3, y3, data_range=255.0).item()) < 1e-4
    with pytest.raises(ValueError, match="fewer weights"):
        ms_ssim(x2[..., :150], y2[..., :150], data_range=255.0)
    three = ms_ssim(x2[..., :150], y2[..., :150], data_range=255.0, weights=(0.2, 0.3, 0.5))
    assert 0.0 < three.item() < 1.0


def test_masked_ms_ssim(head_ct):
    """Masked MS-SSIM: a full mask changes nothing; one scale is masked SSIM; damage inside the mask
    weighs more than the same damage outside it."""
    ref = torch.from_numpy(_b(head_ct)).float()
    pred = torch.from_numpy(_b(_degrade(head_ct, 10.0, 21))).float()
    full = torch.ones_like(ref, dtype=torch.bool)
    dr = "ct-soft-tissue"
    assert torch.allclose(ms_ssim(pred, ref, data_range=dr, mask=full), ms_ssim(pred, ref, data_range=dr))
    brain = torch.from_numpy(_b((head_ct > 0) & (head_ct < 80)))
    one = ms_ssim(pred, ref, data_range=dr, mask=brain, weights=(1.0,))
    assert torch.allclose(one, ssim(pred, ref, data_range=dr, mask=brain), atol=1e-6)
    top = torch.zeros_like(full)
    top[..., :256, :] = True
    damaged = pred.clone()
    damaged[..., :200, :] += 40.0 * torch.randn_like(damaged[..., :200, :])  # inside the mask only
    drop_in = ms_ssim(pred, ref, data_range=dr, mask=top) - ms_ssim(damaged, ref, data_range=dr, mask=top)
    drop_all = ms_ssim(pred, ref, data_range=dr) - ms_ssim(damaged, ref, data_range=dr)
    assert drop_in.item() > drop_all.item() > 0


def test_pieces_cover_every_output_plane_once():
    k = 11
    for b, spatial, chunk, slab in [
        (64, (256, 256), 1 << 17, 1 << 21),
        (2, (300, 512, 512), 1 << 17, 1 << 21),
    ]:
        seen = np.zeros((b, spatial[0] - k + 1), int)
        for r0, r1, a0, a1 in metrics_core._pieces(b, spatial, k, chunk, slab):
            seen[r0:r1, a0:a1] += 1
            assert a1 - a0 >= min(4 * (k - 1), spatial[0] - k + 1 - a0)  # halo costs <= 25 %
        assert (seen == 1).all()


def test_thread_pool_and_single_thread_agree(mni):
    refs = np.stack([mni[:, :, z][:160, :160] for z in (60, 80, 100, 120)])[:, None] / 255.0
    preds = np.stack([_degrade(r, 0.03, 20 + i) for i, r in enumerate(refs)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ssim(preds, refs, data_range=1.0)
        torch.set_num_threads(2)  # chunks go to 2 single-threaded workers
        two = ssim(preds, refs, data_range=1.0)
        assert torch.get_num_threads() == 2  # the workers' setting does not leak out
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-12)


def test_cuda_convolutions_are_kept_out_of_tf32():
    from medldm.metrics.filters import exact_fp32_conv

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with exact_fp32_conv(torch.device("cuda")):  # only sets flags: runs without a GPU
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: GPU path checked on GPU hosts only"
)
def test_cuda_matches_cpu(head_ct, mni):
    ref = torch.from_numpy(_b(head_ct)).float()
    pred = torch.from_numpy(_b(_degrade(head_ct, 10.0, 30))).float()
    for fn in (psnr, ssim, ms_ssim):
        cpu = fn(pred, ref, data_range="ct-soft-tissue")
        gpu = fn(pred.cuda(), ref.cuda(), data_range="ct-soft-tissue")
        assert gpu.device.type == "cuda"
        assert abs(gpu.item() - cpu.item()) < 1e-4 * max(1.0, abs(cpu.item()))
    vol = torch.from_numpy(_b(mni[40:120, 60:140, 50:130])).float()
    noisy = vol + 5 * torch.randn_like(vol)
    a = ssim(noisy, vol, data_range=255.0)
    b = ssim(noisy.cuda(), vol.cuda(), data_range=255.0)
    assert abs(a.item() - b.item()) < 1e-5
