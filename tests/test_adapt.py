"""``medldm enhance --adapt``: a copy of the refiner fine-tuned on the scan itself (medldm.pipelines.adapt).

The adapted weights stay in the run (the model's refiner is unchanged after it), the run is repeatable with a step
budget, the report says what was done, and scans it cannot adapt to are enhanced as without it."""

from __future__ import annotations

import pytest
import torch

from medldm.pipelines.enhance import EnhanceOptions
from medldm.shipped import open_model


@pytest.fixture(scope="module")
def denoiser():
    return open_model("mr-denoise-2d").runner


@pytest.fixture(scope="module")
def noisy(dipy_files):
    from conftest import held_out_crop

    img = held_out_crop(dipy_files / "S0_10slices.nii.gz", 64, 3)
    g = torch.Generator().manual_seed(0)
    out = img + 0.05 * torch.randn(img.shape, generator=g)
    out.meta["original_dtype"] = "float32"
    return out


def test_adapt_is_repeatable_reported_and_leaves_the_model_alone(denoiser, noisy):
    before = {k: v.clone() for k, v in denoiser.refiner.state_dict().items()}
    opts = EnhanceOptions(adapt_steps=3, noise_level=0.3)
    a = denoiser.enhance(noisy, opts)
    b = denoiser.enhance(noisy, opts)
    plain = denoiser.enhance(noisy, EnhanceOptions(noise_level=0.3))
    assert torch.equal(a.image, b.image)  # seeded: the same steps give the same output
    assert float((a.image - plain.image).abs().max()) > 0  # the adapted refiner is the one used
    info = a.info["adapt"]
    assert info["steps"] == 3 and info["task"] == "denoise" and "R2R" in info["method"]
    # Gaussian noise (negative values): every voxel is in the loss, although the denoiser's normalization moved
    # its lower percentile above zero (a magnitude scan is told by the percentile as fitted)
    assert a.info["normalization"]["lo"] >= 0 > a.info["normalization"]["lo_fit"]
    assert "magnitude" not in info["method"]
    assert info["loss_first"] is not None and info["seconds"] >= info["pair_seconds"] >= 0
    for k, v in denoiser.refiner.state_dict().items():  # the model's own refiner is untouched
        assert torch.equal(v, before[k]), k
    assert "adapt" not in plain.info


def test_adapt_skips_what_it_cannot_adapt_to(denoiser, noisy):
    tiny = noisy[:8, :8, :2]  # slices smaller than the refiner's 16 pixels
    res = denoiser.enhance(tiny, EnhanceOptions(adapt_steps=2, noise_level=0.3))
    assert "smaller than 16" in res.info["adapt"]["skipped"]
    ref = denoiser.enhance(tiny, EnhanceOptions(noise_level=0.3))
    assert torch.equal(res.image, ref.image)
    off = denoiser.enhance(noisy, EnhanceOptions(adapt_steps=2, noise_level=0.3, refine=False))
    assert "adapt" not in off.info  # --no-refine: nothing to adapt


def test_cli_refuses_bad_adapt_values(tmp_path, dipy_files):
    from medldm.cli import main

    for bad in (["--adapt", "-1"], ["--adapt-steps", "0"]):
        code = main(["enhance", "-m", "mr-denoise-2d", "-i", str(dipy_files / "S0_10slices.nii.gz"),
                     "-o", str(tmp_path / "o.nii.gz"), *bad])
        assert code == 2
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_run_with_adapt_does_not_reuse_a_result_made_without_it(tmp_path, dipy_files, capsys):
    """The resume record holds the adaptation settings: a plain result is never taken for an --adapt one (the case
    fails with its reason and the file is kept, as for any other changed option; --overwrite redoes it), while a
    plain re-run of a plain run is skipped as done."""
    from conftest import held_out_crop

    from medldm.cli import main
    from medldm.io.nifti import save_nifti

    src = save_nifti(held_out_crop(dipy_files / "S0_10slices.nii.gz", 32, 2), tmp_path / "in.nii.gz")
    out = tmp_path / "out.nii.gz"
    base = ["enhance", "-m", "mr-denoise-2d", "-i", str(src), "-o", str(out), "--quiet"]
    assert main(base) == 0
    first = out.read_bytes()
    assert main(base) == 0 and out.read_bytes() == first  # done: skipped
    assert main([*base, "--adapt-steps", "2"]) == 1 and out.read_bytes() == first  # not reused, not replaced
    assert "--overwrite" in capsys.readouterr().err
    assert main([*base, "--adapt-steps", "2", "--overwrite"]) == 0
    assert out.read_bytes() != first  # redone with the adapted refiner


def test_magnitude_scans_keep_low_signal_voxels_out_of_the_loss(denoiser, dipy_files):
    from conftest import held_out_crop

    from medldm.data.degrade import rician_noise

    img = held_out_crop(dipy_files / "S0_10slices.nii.gz", 64, 3).clamp(min=0)
    noisy = rician_noise(img, 0.05, 1, relative=False)
    noisy.meta["original_dtype"] = "float32"
    info = denoiser.enhance(noisy, EnhanceOptions(adapt_steps=2, noise_level=0.3)).info["adapt"]
    assert "magnitude scan" in info["method"]
