"""Shipped models: found by name, loaded without code execution, and they improve degraded held-out real scans.

The held-out scans are the demo's (dipy's S0_10slices brain b0, pydicom-data's abdomen MR), which no shipped
model was trained on (docs/models.md). Crops keep CPU time low.
"""

import json

import numpy as np
import pytest
import torch

import medldm
from medldm.cli import main
from medldm.io.errors import CaseError
from medldm.shipped import SHIPPED, installed_models, resolve_model


def _require(name: str):
    if name not in installed_models():
        pytest.fail(f"shipped model {name} missing from medldm/assets/models (train + export it: docs/models.md)")
    return resolve_model(name)


def _held_out(path, size: int, slices: int):
    """A centre crop (size x size x slices) of a real held-out scan, scaled to [0, 1] (0.5-99.5th percentiles)."""
    from medldm.data.intensity import fit_normalization, normalize
    from medldm.demo import _center_crop
    from medldm.io.reader import load_scan

    img = _center_crop(load_scan(path), size, slices)
    ref = normalize(img, fit_normalization(img, "MR", out_range=(0.0, 1.0)))
    ref.meta["original_dtype"] = "float32"
    return ref


def _psnr(a, b) -> float:
    from medldm.metrics import psnr

    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float32), torch.as_tensor(np.asarray(b), dtype=torch.float32)
    return float(psnr(a.permute(2, 0, 1)[:, None], b.permute(2, 0, 1)[:, None], data_range=1.0).mean())


def _enhance(name, img):
    from medldm.shipped import enhance

    return enhance(name, img, seed=0)


def test_resolve_model_names_and_folders(tmp_path):
    for name in SHIPPED:
        folder = _require(name)
        assert (folder / "config.yaml").is_file() and folder.name == name
        assert sum(f.stat().st_size for f in folder.iterdir()) < 8e6, "keep shipped folders small"
    assert resolve_model(tmp_path) == tmp_path  # a folder is used as given
    with pytest.raises(CaseError, match="medldm models"):
        resolve_model("mr-no-such-model")


@pytest.mark.parametrize("name", [n for n, m in SHIPPED.items() if m.task != "synthesis"])
def test_models_load_by_name(name):
    bundle = medldm.load_model(resolve_model(name))
    assert bundle.vae is not None and bundle.denoiser is not None
    assert bundle.extra["task"] == SHIPPED[name].task


def test_denoise_improves_held_out_scan(dipy_files):
    from medldm.data.degrade import gaussian_noise

    ref = _held_out(dipy_files / "S0_10slices.nii.gz", 64, 2)
    noisy = gaussian_noise(ref, 0.05, 0)
    out = _enhance("mr-denoise-2d", noisy)
    before, after = _psnr(noisy, ref), _psnr(out, ref)
    assert after > before + 2.0, (before, after)


def test_sr_improves_held_out_scan(pydicom_data):
    from medldm.data.degrade import downsample
    from medldm.eval.baselines import upsample_scan

    ref = _held_out(pydicom_data / "MR-SIEMENS-DICOM-WithOverlays.dcm", 128, 1)
    low = downsample(ref, 2, method="gaussian")
    out = _enhance("mr-sr2x-2d", low)
    linear = _psnr(upsample_scan(low, 2, "linear"), ref)
    after = _psnr(out, ref)
    assert after > linear + 0.5, (linear, after)


def test_enhance_by_name_keeps_geometry(dipy_files, pydicom_data):
    """Runs by name through the inference pipeline: denoise keeps the grid, SR doubles it (same extent)."""
    from medldm.data.degrade import downsample, gaussian_noise

    ref = _held_out(dipy_files / "S0_10slices.nii.gz", 32, 1)
    out = _enhance("mr-denoise-2d", gaussian_noise(ref, 0.05, 0))
    assert tuple(out.shape) == tuple(ref.shape) and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(ref.affine), atol=1e-6)
    ref = _held_out(pydicom_data / "MR-SIEMENS-DICOM-WithOverlays.dcm", 32, 1)
    out = _enhance("mr-sr2x-2d", downsample(ref, 2, method="gaussian"))
    assert tuple(out.shape) == tuple(ref.shape) and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(ref.affine), atol=1e-6)  # x2 grid, same extent


def test_synthesis_samples_by_name():
    from medldm.pipelines.synthesize import Synthesizer

    syn = Synthesizer(medldm.load_model(_require("mr-synth-2d")))
    a, _ = syn.generate(seed=0, steps=10)
    b, _ = syn.generate(seed=1, steps=10)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == (*syn.size, 1) and np.isfinite(a).all()
    assert a.std() > 0.05 * (a.max() - a.min())  # an image, not a constant
    assert np.abs(a - b).mean() > 0.01 * (a.max() - a.min())  # seeds give different samples


def test_models_command_lists_them(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name, m in SHIPPED.items():
        assert name in text and f"[{m.task}]" in text
    assert " MB " in text and "training data:" in text
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert set(cards) == set(SHIPPED) and all(c["installed"] for c in cards.values())


def test_enhance_warns_outside_the_training_domain(pydicom_files, dipy_files):
    """The MR denoiser flags a CT scan as outside its training domain, and an MR scan not."""
    import medldm
    from medldm.io.reader import load_scan
    from medldm.pipelines.enhance import EnhanceOptions, Enhancer
    from medldm.shipped import resolve_model

    enh = Enhancer(medldm.load_model(resolve_model("mr-denoise-2d")))
    opts = EnhanceOptions(steps=1)
    ct = load_scan(pydicom_files / "CT_small.dcm")
    assert "outside its training domain" in enh.enhance(ct[:64, :64], opts).info.get("warning", "")
    mr = load_scan(dipy_files / "aniso_vox.nii.gz")
    assert "outside its training domain" not in enh.enhance(mr[:, :, 10:12], opts).info.get("warning", "")
