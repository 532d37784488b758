"""The shipped models' quality goals (issues 12 and 22), measured side by side with the classical baselines on crops of
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
def volume_scores(dipy_files):
    """Issue 22's protocol on a 3D crop (64x64x10: every slice) of the held-out brain, scaled to its maximum: PSNR
    over the volume (data_range 1) of noisy / BM4D / ANTs DenoiseImage / mr-denoise-2d / mr-denoise-25d ("model":
    the shipped denoiser with 3D context, which the goals are about) for Gaussian 5 %, Rician
    5 % and Rician 10 % (sigma relative to the maximum). Every method blind (estimates the level itself); on Rician
    noise BM4D is followed by the exact Rician bias correction and ANTs uses its Rician model."""
    from medldm.data.degrade import gaussian_noise, rician_noise
    from medldm.eval.baselines import denoise
    from medldm.shipped import enhance

    ref = held_out_crop(dipy_files / "S0_10slices.nii.gz", 64, 10).clamp(min=0)
    ref = ref / ref.max()
    scores = {}
    for i, (kind, level) in enumerate((("gaussian", 0.05), ("rician", 0.05), ("rician", 0.10))):
        noisy = (gaussian_noise if kind == "gaussian" else rician_noise)(ref, level, 10 + i, relative=False)
        y = np.asarray(noisy, dtype=np.float64)
        scores[(kind, level)] = {"noisy": psnr_volume(y, ref), "bm4d": psnr_volume(denoise(y, "bm4d", noise=kind)[0], ref),
                                 "ants": psnr_volume(denoise(y, "ants", noise=kind)[0], ref),
                                 "model2d": psnr_volume(enhance("mr-denoise-2d", noisy, seed=0), ref),
                                 "model": psnr_volume(enhance("mr-denoise-25d", noisy, seed=0), ref)}
    return scores


def psnr_volume(pred, ref) -> float:
    """PSNR over the whole volume, data range 1 (issue 22's convention)."""
    mse = float(np.mean((np.asarray(pred, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return 10 * np.log10(1.0 / mse)


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


def test_3d_baselines_beat_the_noisy_input(volume_scores):
    """BM4D well above the input on Gaussian noise, ANTs above it everywhere. (Blind BM4D + bias correction on
    Rician 5 % is BELOW the input on this small crop, 25.07 vs 26.05 dB: its sigma estimate reads high here.)"""
    s = volume_scores[("gaussian", 0.05)]
    assert s["bm4d"] > s["noisy"] + 3.0, s
    for case, s in volume_scores.items():
        assert s["ants"] > s["noisy"] + 1.0, (case, s)


def test_3d_context_is_not_below_the_2d_model(volume_scores):
    """mr-denoise-25d (the 2D model's refiner with the neighbouring slices) against mr-denoise-2d on the held-out
    crop: 31.35 / 27.20 / 23.25 vs 31.21 / 27.12 / 22.99 dB when measured (all blind)."""
    for case, s in volume_scores.items():
        assert s["model"] >= s["model2d"], (case, s)


@pytest.mark.xfail(strict=True, reason="issue 22 goal not met: mr-denoise-25d >= BM4D at Gaussian 5 %; on this "
                                       "crop model 31.35 vs BM4D 32.19 dB (mr-denoise-2d 31.21, ANTs 28.12, noisy "
                                       "26.03; all blind)")
def test_goal_denoiser_at_least_bm4d_gaussian(volume_scores):
    s = volume_scores[("gaussian", 0.05)]
    assert s["model"] >= s["bm4d"], s


@pytest.mark.xfail(strict=True, reason="issue 22 goal not met: mr-denoise-25d >= best(BM4D + Rician bias "
                                       "correction, ANTs Rician) + 0.5 dB at Rician 5 %; on this crop model 27.20 "
                                       "(mr-denoise-2d 27.12) vs ANTs 28.82, "
                                       "BM4D 25.07 dB (noisy 26.05; all blind: BM4D's sigma estimate reads high on "
                                       "this small crop and it over-corrects)")
def test_goal_denoiser_rician_5(volume_scores):
    s = volume_scores[("rician", 0.05)]
    assert s["model"] >= max(s["bm4d"], s["ants"]) + 0.5, s


@pytest.mark.xfail(strict=True, reason="issue 22 goal not met: mr-denoise-25d >= best(BM4D + Rician bias "
                                       "correction, ANTs Rician) + 0.5 dB at Rician 10 %; on this crop model 23.25 "
                                       "(mr-denoise-2d 22.99) vs ANTs 23.22, BM4D 22.17 dB (noisy 19.69; all blind)")
def test_goal_denoiser_rician_10(volume_scores):
    s = volume_scores[("rician", 0.10)]
    assert s["model"] >= max(s["bm4d"], s["ants"]) + 0.5, s


@pytest.mark.xfail(strict=True, reason="issue 12 goal not met: mr-sr2x-2d >= cubic spline + 2 dB; on "
                                       "this crop model 36.24 vs cubic B-spline 36.58 dB (below it; the abdomen, smoother than any training scan)")
def test_goal_sr_cubic_plus_2db(sr_scores):
    s = sr_scores
    assert s["model"] >= s["cubic"] + 2.0, s
