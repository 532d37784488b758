"""2.5D refiner (``refine.context``): the refiner of a 2D model also sees the degraded neighbouring slices.

One function makes the neighbours for training items and inference (``medldm.data.condition.neighbour_slices``);
``stage: refine`` trains it on a model folder's frozen VAE and U-Net, starting from that folder's 2D refiner with
the new input channels at zero (so training starts from exactly the 2D model's output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medldm.data.condition import neighbour_slices
from medldm.models import load_model
from medldm.models.refiner import RefinerSpec, apply_refiner, build_from_spec, widen_first_layer

CONFIGS = Path(__file__).parents[1] / "configs"
FAST = ["vae_train.steps=20", "ldm_train.steps=20", "vae_train.ckpt_every=20", "ldm_train.ckpt_every=20"]


def test_neighbour_slices_order_and_edges():
    vol = torch.arange(5.0)[:, None, None].expand(5, 2, 2)
    got = neighbour_slices(vol, torch.tensor([0, 2, 4]), 2)[:, :, 0, 0]
    # z-1, z+1, z-2, z+2 with the edge slice repeated past either end
    assert got.tolist() == [[0, 1, 0, 2], [1, 3, 0, 4], [3, 4, 2, 4]]
    assert neighbour_slices(vol, torch.tensor([1]), 0).shape == (1, 0, 2, 2)


def test_widened_refiner_starts_as_the_2d_refiner():
    torch.manual_seed(0)
    flat = RefinerSpec(2, (8, 8, 8, 8, 16, 8), "none", "degraded", ("decoded", "degraded", "noise_level"))
    wide = RefinerSpec(2, (8, 8, 8, 8, 16, 8), "none", "degraded", ("decoded", "degraded", "noise_level"), context=2)
    a, b = build_from_spec(flat).eval(), build_from_spec(wide).eval()
    b.load_state_dict(widen_first_layer(a.state_dict(), b.state_dict()))
    d, y, ctx = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(apply_refiner(a, d, y, "degraded", 0.3), apply_refiner(b, d, y, "degraded", 0.3, ctx))
    assert wide.to_extra()["context"] == 2 and "context" not in flat.to_extra()
    with pytest.raises(ValueError, match="context"):
        RefinerSpec(3, (8, 8, 8, 8, 16, 8), "none", "degraded", context=1)


@pytest.mark.slow
def test_stage_refine_trains_a_context_refiner_and_enhance_uses_it(tmp_path, dipy_files):
    from conftest import held_out_crop

    from medldm.config import ConfigError
    from medldm.pipelines.enhance import EnhanceOptions, Enhancer
    from medldm.train import train
    from medldm.train.logging import read_log
    from medldm.train.schema import load_config

    refine = ["refine.enabled=true", "refine.steps=6", "refine.ckpt_every=6", "refine.log_every=3",
              "refine.noise_map=true"]
    train(load_config(CONFIGS / "denoise_2d_tiny.yaml", [*FAST, *refine]), tmp_path / "base")
    base = load_model(tmp_path / "base" / "model")
    ctx = [*refine, "stage=refine", f"ldm_path={tmp_path / 'base' / 'model'}", "refine.context=1",
           "refine.steps=4", "refine.ckpt_every=4", "refine.val_every=4"]
    train(load_config(CONFIGS / "denoise_2d_tiny.yaml", [*FAST, *ctx]), tmp_path / "ctx")
    bundle = load_model(tmp_path / "ctx" / "model")
    assert bundle.refiner_spec.context == 1
    assert next(bundle.refiner.parameters()).shape[1] == 5  # [decoded, degraded, level, z-1, z+1]
    # the frozen VAE and U-Net are the base folder's
    for k, v in base.denoiser.state_dict().items():
        assert torch.equal(v, bundle.denoiser.state_dict()[k])
    assert len(read_log(tmp_path / "ctx" / "refine" / "train_log.csv")) > 0
    img = held_out_crop(dipy_files / "S0_10slices.nii.gz", 32, 2)
    enh = Enhancer(bundle)
    out = enh.enhance(img, EnhanceOptions(steps=2, noise_level=0.2)).image
    assert out.shape == img.shape and bool(torch.isfinite(out).all())
    # the neighbours matter: changing one slice changes the refined output of the slices beside it
    img2 = img.clone()
    img2[..., 1] = img2[..., 1] + 50.0
    out2 = enh.enhance(img2, EnhanceOptions(steps=2, noise_level=0.2,
                                            normalization=enh.enhance(img, EnhanceOptions(steps=2, noise_level=0.2)
                                                                      ).info["normalization"])).image
    assert float((out2[..., 0] - out[..., 0]).abs().max()) > 0
    # context_dropout 1: every item sees its own (degraded) slice as its neighbours, as a single-slice scan does
    from medldm.train.data import build_data
    from medldm.train.engine import make_runtime
    from medldm.train.refine_stage import RefineStage

    cfg = load_config(CONFIGS / "denoise_2d_tiny.yaml", [*FAST, *ctx, "refine.context_dropout=1.0"])
    stage = RefineStage(cfg, build_data(cfg, tmp_path / "d", quiet=True), make_runtime(cfg.engine),
                        tmp_path / "base" / "model", tmp_path / "d")
    b = stage.cpu_batch(0, 0)
    assert b["context"].shape[1] == 2 and torch.equal(b["context"], b["degraded"].expand_as(b["context"]))
    with pytest.raises(ConfigError, match="ldm_path"):
        load_config(CONFIGS / "denoise_2d_tiny.yaml", ["stage=refine", "refine.enabled=true"])
