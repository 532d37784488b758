"""The shipped models' quality goals (issue 12), measured side by side with the classical baselines on crops of
held-out real scans (the demo's: dipy's S0_10slices brain b0 and pydicom-data's abdomen MR, never trained on).

Each goal is an ``xfail(strict=True)`` test until it is met: a model that starts meeting it makes the test XPASS,
which fails the suite, so the marker (and docs/models.md) must then be updated. The full-size figures are in
docs/models.md; these crops keep the CPU time to seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import held_out_crop, psnr01

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def denoise_scores(dipy_files):
    """PSNR (data_range 1) of noisy / NLM / BM3D / mr-denoise-2d on an 80x80x2 crop, Gaussian sigma 5 % of the
    range; every method estimates the noise level itself (blind)."""
    from medldm.data.degrade import gaussian_noise
    from medldm.eval.baselines import denoise
    from medldm.shipped import enhance

    ref = held_out_crop(dipy_files / "S0_10slices.nii.gz", 80, 2)
    noisy = gaussian_noise(ref, 0.05, 0)
    arr = np.asarray(noisy)
    return {"noisy": psnr01(noisy, ref), "nlm": psnr01(denoise(arr, "nlm")[0], ref),
            "bm3d": psnr01(denoise(arr, "bm3d")[0], ref), "model": psnr01(enhance("mr-denoise-2d", noisy, seed=0), ref)}


@pytest.fixture(scope="module")
def rician_scores(dipy_files):
    """PSNR (data_range 1) on the same crop with Rician noise (magnitude MR), sigma 5 %: NLM, the unbiased NLM for
    magnitude data (Manjon et al. 2008: sqrt(max(NLM(y^2) - 2 s^2, 0))), BM3D and mr-denoise-2d, all blind."""
    from medldm.data.degrade import rician_noise
    from medldm.data.noise import estimate_noise_sigma
    from medldm.eval.baselines import denoise
    from medldm.shipped import enhance

    ref = held_out_crop(dipy_files / "S0_10slices.nii.gz", 80, 2).clamp(min=0)  # a magnitude image
    noisy = rician_noise(ref, 0.05, 0)
    y = np.asarray(noisy, dtype=np.float64)
    unbiased = np.sqrt(np.maximum(denoise(y**2, "nlm")[0] - 2 * estimate_noise_sigma(y) ** 2, 0.0))
    return {"noisy": psnr01(noisy, ref), "nlm": psnr01(denoise(y, "nlm")[0], ref), "nlm_unbiased": psnr01(unbiased, ref),
            "bm3d": psnr01(denoise(y, "bm3d")[0], ref), "model": psnr01(enhance("mr-denoise-2d", noisy, seed=0), ref)}


@pytest.fixture(scope="module")
def sr_scores(pydicom_data):
    """PSNR (data_range 1) of the cubic B-spline (scipy order 3, the stronger of medldm's cubic baselines) and
    mr-sr2x-2d at x2 on a 128x128 crop (anti-aliased down-sampling)."""
    from medldm.data.degrade import downsample
    from medldm.eval.baselines import upsample_scan
    from medldm.shipped import enhance

    ref = held_out_crop(pydicom_data / "MR-SIEMENS-DICOM-WithOverlays.dcm", 128, 1)
    low = downsample(ref, 2, method="gaussian")
    return {"cubic": psnr01(upsample_scan(low, 2, "bspline"), ref), "model": psnr01(enhance("mr-sr2x-2d", low, seed=0), ref)}


def test_denoiser_beats_the_noisy_input(denoise_scores):
    s = denoise_scores
    assert s["model"] > s["noisy"] + 4.0, s


@pytest.mark.xfail(strict=True, reason="issue 12 goal not met: mr-denoise-2d >= BM3D; on this crop "
                                       "model 30.33 vs BM3D 30.80 dB (NLM 29.65, noisy 26.08)")
def test_goal_denoiser_at_least_bm3d(denoise_scores):
    s = denoise_scores
    assert s["model"] >= s["bm3d"], s


@pytest.mark.xfail(strict=True, reason="issue 12 goal not met: mr-denoise-2d >= NLM + 1 dB; on this "
                                       "crop model 30.33 vs NLM 29.65 dB (+0.68)")
def test_goal_denoiser_nlm_plus_1db(denoise_scores):
    s = denoise_scores
    assert s["model"] >= s["nlm"] + 1.0, s


def test_goals_on_rician_noise(rician_scores):
    """Issue 12's denoising goals (>= BM3D, >= NLM + 1 dB) on magnitude-MR (Rician) noise, met on this crop, and
    above the unbiased NLM for magnitude data too: the blind denoiser, trained on Gaussian and Rician noise,
    29.95 dB vs BM3D 27.52, NLM 27.17, unbiased NLM 28.50 (noisy 25.42). The classical methods assume zero-mean
    noise and keep the Rician bias."""
    s = rician_scores
    assert s["model"] >= max(s["bm3d"], s["nlm_unbiased"]) and s["model"] >= s["nlm"] + 1.0, s


@pytest.mark.xfail(strict=True, reason="issue 12 goal not met: mr-sr2x-2d >= cubic spline + 2 dB; on "
                                       "this crop model 36.24 vs cubic B-spline 36.58 dB (below it; the abdomen, smoother than any training scan)")
def test_goal_sr_cubic_plus_2db(sr_scores):
    s = sr_scores
    assert s["model"] >= s["cubic"] + 2.0, s
