"""Issue 20 item 13: a training config is checked for sizes and values before anything is built or written
(exit 2, one line), with the same ranges and parameter budget as a model folder (medldm.models.budget)."""

from __future__ import annotations

import pytest

from medldm.cli import main

CONFIG = "configs/denoise_2d_tiny.yaml"


@pytest.mark.parametrize("channels, said", [("[-32,64]", "vae.channels[0] = -32: must be an integer in 1..4096"),
                                            ("[16000,16000]", "vae.channels[0] = 16000: must be an integer")])
def test_out_of_range_channels_are_a_usage_error(tmp_path, capsys, channels, said):
    out = tmp_path / "run"
    assert main(["train", CONFIG, "-o", str(out), "--set", f"vae.channels={channels}"]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("dry", [False, True])
def test_parameter_budget_of_model_folders_applies_to_training(tmp_path, capsys, monkeypatch, dry):
    """4 levels of 4096 channels are in range, but 3.3 billion parameters: refused before building (no memory
    used, no folder written); the budget is the model folders' $MEDLDM_MAX_PARAMS."""
    out = tmp_path / "run"
    args = ["train", CONFIG, "-o", str(out), "--set", "vae.channels=[4096,4096,4096,4096]",
            "--set", "vae.attention_levels=[false,false,false,false]", *(["--dry-run"] if dry else [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "3,323,096,823 parameters" in err and "more than the 500,000,000 allowed" in err
    assert not out.exists()
    monkeypatch.setenv("MEDLDM_MAX_PARAMS", "1000")  # the same variable as for model folders
    assert main(["train", CONFIG, "-o", str(out), "--dry-run", "--tiny"]) == 2
    assert "more than the 1,000 allowed" in capsys.readouterr().err


def test_check_sizes_counts_what_training_builds():
    from medldm.models import build_denoiser, build_vae
    from medldm.train.schema import load_config
    from medldm.train.sizes import check_sizes

    cfg = load_config(CONFIG)
    counts = check_sizes(cfg)
    vae = build_vae(cfg.vae)
    den = build_denoiser(cfg.unet, cfg.spatial_dims, cfg.vae.latent_channels)
    assert counts["vae"] == sum(p.numel() for p in vae.state_dict().values())
    assert counts["denoiser"] == sum(p.numel() for p in den.state_dict().values())
