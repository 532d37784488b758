"""The shipped models' outputs are bit-identical across refactors of the scan wrapper and the shared condition
(issue 21 items 2-3): reference outputs of ``mr-denoise-2d``, ``mr-sr2x-2d`` and ``mr-thinslice-4x`` on small real
crops in scanner units (CPU, 2 steps, fixed seed), recorded from the code before the refactor, under
tests/data/wrapper_ref/. Regenerate (only for a change that is MEANT to alter outputs, and say so in the commit)
with ``MEDLDM_WRITE_REFS=1 python -m pytest -n 0 tests/test_wrapper_identical.py``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medldm.pipelines.enhance import EnhanceOptions

REFS = Path(__file__).parent / "data" / "wrapper_ref"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _crop(path: Path, size: int, slices: int):
    from medldm.demo import _center_crop
    from medldm.io.reader import load_scan

    return _center_crop(load_scan(path), size, slices)


def _noisy(img, rel: float, n_nan: int = 0):
    """``img`` + seeded Gaussian noise of ``rel`` x its maximum (so outputs reach below 0 and the clamp acts),
    with ``n_nan`` NaN voxels and one +inf, in scanner units (float32)."""
    from monai.data import MetaTensor

    arr = np.asarray(img, dtype=np.float32)
    rng = np.random.default_rng(0)
    arr = arr + rel * float(arr.max()) * rng.standard_normal(arr.shape).astype(np.float32)
    flat = arr.reshape(-1)
    if n_nan:
        flat[rng.choice(flat.size, n_nan, replace=False)] = np.nan
        flat[flat.size // 2] = np.inf
    meta = {**dict(img.meta), "original_dtype": "float32"}
    return MetaTensor(torch.from_numpy(arr), affine=img.affine, meta=meta)


def _run(model: str, img, check_spacing: bool = True, **opts):
    from medldm.models.folder import load_model
    from medldm.pipelines.enhance import Enhancer
    from medldm.pipelines.thinslice import ThinSliceEnhancer
    from medldm.shipped import resolve_model

    bundle = load_model(resolve_model(model))
    if bundle.extra.get("task") == "thinslice":
        return ThinSliceEnhancer(bundle).enhance(img, EnhanceOptions(**opts), check_spacing=check_spacing)
    return Enhancer(bundle).enhance(img, EnhanceOptions(**opts))


def _check(name: str, res):
    got = {"image": np.asarray(res.image), "affine": np.asarray(res.image.affine)}
    if res.std is not None:
        got["std"] = np.asarray(res.std)
    file = REFS / f"{name}.npz"
    if os.environ.get("MEDLDM_WRITE_REFS"):
        np.savez_compressed(file, **got)
    ref = np.load(file)
    assert sorted(ref.files) == sorted(got), f"{name}: outputs {sorted(got)} vs reference {sorted(ref.files)}"
    for k in ref.files:
        assert ref[k].shape == got[k].shape, f"{name}/{k}: shape {got[k].shape} vs {ref[k].shape}"
        assert np.array_equal(ref[k], got[k], equal_nan=True), (
            f"{name}/{k}: max |diff| {np.nanmax(np.abs(ref[k] - got[k]))}")
    return got


def test_denoise_2d_identical(dipy_files):
    """dipy's S0_10slices brain b0, 48 x 48 x 2, Gaussian noise 5 % of the max, 3 NaN and one +inf voxel; K = 2."""
    img = _noisy(_crop(dipy_files / "S0_10slices.nii.gz", 48, 2), 0.05, n_nan=3)
    got = _check("mr-denoise-2d", _run("mr-denoise-2d", img, steps=2, samples=2, seed=3))
    assert np.isnan(got["image"]).sum() == 4  # NaN exactly where the input was not finite


def test_sr_2d_identical(pydicom_data):
    """pydicom-data's MR-SIEMENS-DICOM-WithOverlays, 32 x 32 x 1, noise 3 % -> 64 x 64 x 1."""
    img = _noisy(_crop(pydicom_data / "MR-SIEMENS-DICOM-WithOverlays.dcm", 32, 1), 0.03)
    got = _check("mr-sr2x-2d", _run("mr-sr2x-2d", img, steps=2, seed=1))
    assert got["image"].shape == (64, 64, 1)


def test_thinslice_identical(dipy_files):
    """dipy's S0_10slices, 24 x 24 x 4 (spacing not checked) with one NaN -> 24 x 24 x 16, both reformats."""
    img = _noisy(_crop(dipy_files / "S0_10slices.nii.gz", 24, 4), 0.02, n_nan=1)
    got = _check("mr-thinslice-4x", _run("mr-thinslice-4x", img, check_spacing=False, steps=2, seed=2))
    assert got["image"].shape == (24, 24, 16)
