"""medldm.data.noise: the one noise estimator (denoiser input, baselines, plan fingerprint) on a real scan."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medldm.data.noise import estimate_noise_sigma


@pytest.fixture(scope="module")
def brain(dipy_files) -> np.ndarray:
    vol = np.asarray(nib.load(dipy_files / "S0_10slices.nii.gz").dataobj, dtype=np.float64)[..., 0]
    return vol / np.percentile(vol, 99.5)


def _excess(est: float, base: float) -> float:
    return float(np.sqrt(max(est**2 - base**2, 0.0)))


def test_gaussian_and_rician_levels(brain):
    """Added Gaussian noise of 5 % is found within 15 %; Rician noise (the magnitude of complex Gaussian noise)
    reads low on this 73 %-background brain, 0.65-0.85 x sigma (the Rayleigh background; documented in
    medldm.data.noise); any slice axis order gives the same estimate."""
    rng = np.random.default_rng(0)
    base = estimate_noise_sigma(brain)
    gauss = brain + 0.05 * rng.standard_normal(brain.shape)
    rician = np.hypot(brain + 0.05 * rng.standard_normal(brain.shape), 0.05 * rng.standard_normal(brain.shape))
    assert _excess(estimate_noise_sigma(gauss), base) == pytest.approx(0.05, rel=0.15)
    assert 0.65 * 0.05 < _excess(estimate_noise_sigma(rician), base) < 0.85 * 0.05
    moved = np.moveaxis(gauss, 2, 0)
    assert estimate_noise_sigma(moved, axis=0) == pytest.approx(estimate_noise_sigma(gauss), rel=1e-12)


def test_constant_and_excluded_slices_are_left_out(brain):
    """Blank padding slices (estimate 0) do not pull the median down; slices touching ``exclude`` are left out
    unless all do; ``span`` and ``max_slices`` choose the slices; tiny images give 0."""
    rng = np.random.default_rng(1)
    noisy = brain + 0.05 * rng.standard_normal(brain.shape)
    ref = estimate_noise_sigma(noisy)
    padded = np.concatenate([np.zeros(noisy.shape[:2] + (12,)), noisy], axis=2)  # more blank slices than real ones
    assert estimate_noise_sigma(padded) == pytest.approx(ref, rel=1e-12)
    spiky = noisy.copy()
    spiky[:, :, :6] += 0.5 * rng.standard_normal(spiky[:, :, :6].shape)  # 6 of 10 slices much noisier
    assert estimate_noise_sigma(spiky) > 2 * ref
    exclude = np.zeros(spiky.shape, bool)
    exclude[0, 0, :6] = True
    assert estimate_noise_sigma(spiky, exclude=exclude) == pytest.approx(
        estimate_noise_sigma(noisy[:, :, 6:]), rel=1e-12)
    assert estimate_noise_sigma(spiky, span=(0.6, 1.0)) == pytest.approx(estimate_noise_sigma(noisy[:, :, 6:]), rel=1e-12)
    assert estimate_noise_sigma(spiky, max_slices=2) != estimate_noise_sigma(spiky, max_slices=3)
    assert estimate_noise_sigma(noisy[:3, :3], min_side=4) == 0.0
    assert estimate_noise_sigma(np.ones((16, 16, 3))) == 0.0


def test_rayleigh_background_sigma_reads_rician_noise(brain):
    """Magnitude images: the background's Rayleigh mode reads the Rician sigma (within 20 % here, where the
    wavelet estimate reads 0.65-0.85 x); not magnitude data (negative values) or a zero-filled background: 0."""
    from medldm.data.noise import rayleigh_background_sigma

    rng = np.random.default_rng(2)
    mag = np.clip(brain, 0, None)
    for s in (0.02, 0.05, 0.1):
        rician = np.hypot(mag + s * rng.standard_normal(mag.shape), s * rng.standard_normal(mag.shape))
        assert rayleigh_background_sigma(rician) == pytest.approx(s, rel=0.2)
        assert estimate_noise_sigma(rician) < 0.9 * rayleigh_background_sigma(rician)
    assert rayleigh_background_sigma(brain + 0.05 * rng.standard_normal(brain.shape)) == 0.0  # Gaussian: negatives
    zero_bg = np.where(mag > 0.2, mag, 0.0)
    assert rayleigh_background_sigma(zero_bg) == 0.0
