"""Normalization to the model range and its exact inverse, on real CT and MR scans."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut

from medldm.data.intensity import CT_WINDOWS, denormalize, fit_normalization, normalize, normalize_image
from medldm.io import load_scan


def _hu(path) -> np.ndarray:
    """Stored HU independent of medldm's reader: pydicom + modality LUT, as (X=column, Y=row)."""
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds).T


@pytest.mark.parametrize("name", ["CT_small", "693_UNCI"])
def test_ct_round_trip_exact(name, pydicom_files, pydicom_data):
    path = (pydicom_files if name == "CT_small" else pydicom_data) / f"{name}.dcm"
    img = load_scan(path)
    ref = _hu(path)
    assert np.array_equal(img[..., 0].numpy(), ref)  # the reader gives pydicom's HU
    params = fit_normalization(img)
    assert params["modality"] == "CT" and params["method"] == "window" and params["original_dtype"] == "int16"
    assert (params["lo"], params["hi"]) == CT_WINDOWS["full"]
    params = json.loads(json.dumps(params))  # travels as JSON (meta, model folders)
    y = normalize(img, params)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    back = denormalize(y, params)
    assert back.dtype == torch.int16
    assert np.array_equal(back[..., 0].numpy(), ref)
    # numpy path, float64 in
    yn = normalize(ref, params)
    assert yn.dtype == np.float32
    bn = denormalize(yn, params)
    assert bn.dtype == np.int16 and np.array_equal(bn, ref)


def test_ct_window_maps_to_model_range(pydicom_data):
    ref = _hu(pydicom_data / "693_UNCI.dcm")
    assert ref.min() < -1024  # outside-FOV padding below the full window: exercises clipping
    p = fit_normalization(ref, "CT", original_dtype="int16")
    assert np.allclose(normalize(np.array([-1024.0, 3071.0]), p), [-1.0, 1.0])
    b = fit_normalization(ref, "CT", window="brain", original_dtype="int16")
    assert np.allclose(normalize(np.array([0.0, 40.0, 80.0]), b), [-1.0, 0.0, 1.0])
    # unclipped: exact even far outside the window
    assert np.array_equal(denormalize(normalize(ref, b), b), ref)
    # clipped: exact inside the window, saturated outside
    c = fit_normalization(ref, "CT", window="brain", clip=True, original_dtype="int16")
    y = normalize(ref, c)
    assert y.min() >= -1.0 and y.max() <= 1.0
    back = denormalize(y, c)
    inside = (ref >= 0) & (ref <= 80)
    assert inside.sum() > 1000
    assert np.array_equal(back[inside], ref[inside])
    assert np.array_equal(back[~inside], np.clip(ref[~inside], 0, 80))
    custom = fit_normalization(ref, "CT", window=(-160, 240))
    assert custom["window"] == "custom" and (custom["lo"], custom["hi"]) == (-160.0, 240.0)
    with pytest.raises(ValueError, match="unknown CT window"):
        fit_normalization(ref, "CT", window="liver-ish")


def test_mr_percentile_round_trip_exact(dipy_files, mni152):
    for path, dtype in ((dipy_files / "S0_10slices.nii.gz", "uint16"), (mni152, "uint8")):
        img = load_scan(path)
        params = fit_normalization(img, "MR")
        assert params["method"] == "percentile" and params["original_dtype"] == dtype
        x = img.numpy()
        x64 = x.astype(np.float64)  # fit_normalization's statistics are float64 (numpy 2.3 interpolates float32 in
        assert params["lo"] == pytest.approx(np.percentile(x64, 0.5))  # float32: 1766.625 vs 1766.61 here)
        assert params["hi"] == pytest.approx(np.percentile(x64, 99.5))
        y = normalize(img, params)
        frac_above = float((y > 1.0).float().mean())
        assert 0.002 < frac_above < 0.0055  # ~0.5 % of voxels lie above p99.5 (ties at hi, float32 rounding)
        back = denormalize(y, params)
        assert back.dtype == getattr(torch, dtype)
        assert np.array_equal(back.numpy(), np.asarray(x, dtype=dtype))


def test_mr_foreground_percentiles(mni152):
    x = load_scan(mni152).numpy()
    whole = fit_normalization(x, "MR")
    fg = fit_normalization(x, "MR", foreground=True, original_dtype="uint8")  # bare array: no meta
    assert whole["lo"] == 0.0  # 78 % of the template is zero background
    assert fg["lo"] == pytest.approx(np.percentile(x[x > 0], 0.5)) and fg["lo"] > 0
    assert np.array_equal(denormalize(normalize(x, fg), fg), x.astype(np.uint8))


def test_batched_torch_float_and_dtype_saturation(dipy_files):
    img = load_scan(dipy_files / "S0_10slices.nii.gz")
    params = fit_normalization(img, original_dtype="float32")
    batch = torch.stack([img.as_tensor(), img.as_tensor() * 0.5])  # (B, X, Y, Z)
    y = normalize(batch, params)
    assert y.shape == batch.shape
    back = denormalize(y, params)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, batch, rtol=1e-6, atol=1e-3)
    # model outputs beyond the range of an integer dtype are clipped, not wrapped around
    p16 = fit_normalization(img)  # uint16 on disk
    out = denormalize(torch.tensor([-50.0, 0.0, 500.0]), p16)
    assert out.tolist() == [0, round(p16["lo"] + (p16["hi"] - p16["lo"]) / 2), 65535]
    assert denormalize(np.array([-50.0, 500.0]), p16).tolist() == [0, 65535]


def test_normalize_image_records_params(pydicom_files):
    img = load_scan(pydicom_files / "CT_small.dcm")
    y = normalize_image(img, window="soft-tissue")
    assert y.meta["normalization"]["window"] == "soft-tissue"
    assert "normalization" not in img.meta  # the input is untouched
    assert torch.equal(y.affine, img.affine)
    back = denormalize(y, y.meta["normalization"])
    assert torch.equal(back, img.as_tensor().to(torch.int16))
