"""One inference path: `medldm enhance`, `medldm.shipped.enhance` and `medldm demo` run the same pipeline with the
same defaults (``medldm.pipelines.enhance.EnhanceOptions``), so the CLI reproduces the demo's outputs bit for bit,
also on slices larger than the window the models run in (issue 11, section 3)."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

import medldm.demo as demo
from medldm.cli import main
from medldm.pipelines.enhance import EnhanceOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 2 threads on the shared 2-core machine: 3x slower


def _cli_matches_demo(tmp_path, monkeypatch, task: str, model: str, scan, shape) -> dict:
    """Run the demo's ``task`` (models only) on ``scan``, then ``medldm enhance -m model`` on the input the demo
    saved; assert identical outputs and return the CLI's run-report params and the two timings."""
    monkeypatch.setattr(demo, "DENOISE_BASELINES", ())  # the shipped model only: the baselines are not under test
    monkeypatch.setattr(demo, "OPTIONAL_DENOISE_BASELINES", ())
    monkeypatch.setattr(demo, "SR_BASELINES", ())
    out = tmp_path / "demo"
    refs = demo.prepare_references(out, quick=False, scans={"scan": scan})
    t0 = time.perf_counter()
    if task == "denoise":
        demo.run_denoise(out, refs, seed=0)
        src = out / "denoise" / "noisy" / "scan.nii.gz"
    else:
        demo.run_sr(out, refs, seed=0)
        src = out / "sr" / "input" / "scan.nii.gz"
    t_demo = time.perf_counter() - t0
    by_demo = out / task / model / "scan.nii.gz"
    assert nib.load(src).shape[:2] == shape  # a single slice is stored as a 2D NIfTI

    by_cli = tmp_path / "cli.nii.gz"
    t0 = time.perf_counter()
    # --device cpu: "auto" picks a GPU where there is one, the demo runs on the CPU
    assert main(["enhance", "-m", model, "-i", str(src), "-o", str(by_cli), "--device", "cpu", "--quiet"]) == 0
    t_cli = time.perf_counter() - t0
    a, b = nib.load(by_demo), nib.load(by_cli)
    assert a.get_data_dtype() == b.get_data_dtype() == np.float32
    a, b = np.asarray(a.dataobj), np.asarray(b.dataobj)
    assert a.shape == b.shape and np.isfinite(a).all()
    assert np.array_equal(a, b), f"CLI differs from the demo: max |diff| {np.abs(a - b).max()}"
    report = json.loads(by_cli.with_name("cli.nii.gz.medldm-enhance-report.json").read_text())
    return {**report["cases"][0]["extra"]["params"], "t_demo": t_demo, "t_cli": t_cli}


def test_cli_reproduces_the_demo_on_a_1024_slice(tmp_path, monkeypatch, pydicom_data):
    """pydicom-data's MR2_UNCI.dcm, a real 1024 x 1024 shoulder MR (the demo's mr-shoulder), uncropped: the
    denoiser runs in latent windows of twice its training size, in the demo and in the CLI alike."""
    params = _cli_matches_demo(tmp_path, monkeypatch, "denoise", "mr-denoise-2d", pydicom_data / "MR2_UNCI.dcm",
                               (1024, 1024))
    # the slice (latent 512 x 512) is bigger than the window, so the window policy is what is being compared
    assert params["window"] == [64, 64] and params["steps"] == 2  # the model's default steps keep this fast
    print(f"1024^2 denoise: demo {params['t_demo']:.1f} s, CLI {params['t_cli']:.1f} s")


def test_cli_reproduces_the_demo_sr(tmp_path, monkeypatch, pydicom_data):
    """The same for super-resolution: the demo's abdomen MR (484 x 484), x2 down-sampled, back onto 484 x 484."""
    params = _cli_matches_demo(tmp_path, monkeypatch, "sr", "mr-sr2x-2d",
                               pydicom_data / "MR-SIEMENS-DICOM-WithOverlays.dcm", (242, 242))
    assert params["window"] == [64, 64] and params["output_shape"] == [484, 484, 1]
    print(f"484^2 sr: demo {params['t_demo']:.1f} s, CLI {params['t_cli']:.1f} s")


def test_cli_defaults_are_the_pipeline_defaults():
    """A bare `medldm enhance` sets no option of its own: every field is EnhanceOptions' default (device aside)."""
    import argparse

    from medldm.cli.enhance import add_arguments, enhance_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert enhance_options(parser.parse_args(["-m", "M", "-i", "I", "-o", "O"]), "cpu") == EnhanceOptions(device="cpu")
    assert f"(default: the pipeline's, {EnhanceOptions().batch_size})" in parser.format_help().replace("\n", " ")


def test_default_window_follows_the_training_size():
    """The window is the model's (twice the training patch, in latent voxels), for 2D models as for 3D ones."""
    from medldm.models import load_model
    from medldm.pipelines.enhance import Enhancer
    from medldm.shipped import resolve_model

    enh = Enhancer(load_model(resolve_model("mr-denoise-2d")))
    patch = enh.bundle.extra["patch_size"]
    assert enh.window(EnhanceOptions()) == tuple(2 * p // enh.f for p in patch) == enh.default_window
    u = enh.unet_down  # a given window is rounded up to a multiple of the denoiser's down-sampling
    assert enh.window(EnhanceOptions(window=(30, 33))) == (-(-30 // u) * u, -(-33 // u) * u)


def test_shipped_enhance_is_the_pipeline(dipy_files):
    """`medldm.shipped.enhance` is a thin call: the same output as Enhancer.enhance with default options."""
    import torch

    from medldm.io.reader import load_scan
    from medldm.models import load_model
    from medldm.pipelines.enhance import Enhancer
    from medldm.shipped import enhance, resolve_model

    img = load_scan(dipy_files / "aniso_vox.nii.gz")[:, :, 10:11]
    a = enhance("mr-denoise-2d", img)
    b = Enhancer(load_model(resolve_model("mr-denoise-2d"))).enhance(img, EnhanceOptions()).image
    assert torch.equal(a.as_tensor(), b.as_tensor())
