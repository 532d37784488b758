"""Model folders: save -> load round trip (bit-exact outputs on a real scan), EMA preference, hashing, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import medldm
from medldm.io.errors import CaseError
from medldm.models import (
    EMA,
    UNetConfig,
    VAEConfig,
    build_denoiser,
    build_vae,
    load_model,
    model_hash,
    save_model_folder,
    to_dict,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VAE = VAEConfig(channels=(8, 16), attention_levels=(False, False), norm_num_groups=4, num_res_blocks=1)
UNET = UNetConfig(
    channels=(16, 32), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
    num_classes=2, cond_channels=4, noise_level_cond=True,
)



@pytest.fixture(scope="module")
def ct_slice(pydicom_files) -> torch.Tensor:
    """A real CT slice (pydicom CT_small.dcm, 128x128 HU), windowed to [-1, 1]: (1, 1, 128, 128)."""
    import pydicom

    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return torch.from_numpy(np.clip(hu, -1000, 1000) / 1000.0)[None, None]


def _modules():
    torch.manual_seed(0)
    vae, den = build_vae(VAE), build_denoiser(UNET, VAE.spatial_dims, VAE.latent_channels)
    with torch.no_grad():  # non-trivial weights everywhere (MONAI zero-initializes output layers)
        for p in list(vae.parameters()) + list(den.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    return vae, den


def _config():
    return {"task": "sr", "model": {"vae": to_dict(VAE), "unet": to_dict(UNET)}, "diffusion": {"prediction": "v"}}


def test_round_trip_reproduces_outputs_on_a_real_scan(tmp_path, ct_slice):
    vae, den = _modules()
    extra = {"scale_factor": np.float32(0.8), "class_names": ("brain", "chest"), "normalization": {"ct_window": "full"}}
    folder = save_model_folder(tmp_path / "m", config=_config(), modules={"vae": vae, "denoiser": den}, extra=extra)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "denoiser.safetensors", "extra.json", "vae.safetensors"]
    bundle = medldm.load_model(folder)  # the public entry point
    assert bundle.path == folder and bundle.scale_factor == pytest.approx(0.8)
    assert bundle.extra["class_names"] == ["brain", "chest"] and bundle.config["task"] == "sr"
    assert bundle.diffusion.prediction == "v" and bundle.diffusion.schedule == "ddpm"
    assert not bundle.vae.training and not any(p.requires_grad for p in bundle.denoiser.parameters())
    with torch.no_grad():
        z, _ = vae.encode(ct_slice)
        z2, _ = bundle.vae.encode(ct_slice)
        assert torch.equal(z, z2) and torch.equal(vae.decode(z), bundle.vae.decode(z2))
        args = (z, torch.tensor([300]), torch.nn.functional.pixel_unshuffle(ct_slice, 2))  # (1, 4, 64, 64)
        kw = {"class_labels": torch.tensor([1]), "noise_level": torch.tensor([0.2])}
        assert torch.equal(den.eval()(*args, **kw), bundle.denoiser(*args, **kw))


def test_ema_weights_are_preferred_and_hash_tracks_weights(tmp_path):
    vae, den = _modules()
    ema = EMA(den, decay=0.5)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(1.0)
    ema.update(den)
    den_ema = build_denoiser(UNET, 2, 4)
    ema.copy_to(den_ema)
    folder = save_model_folder(tmp_path / "m", config=_config(), modules={"vae": vae, "denoiser": den, "denoiser_ema": den_ema})
    h1 = model_hash(folder)
    got = load_model(folder)
    raw = load_model(folder, ema=False)
    key = "unet.conv_in.conv.weight"
    assert torch.equal(got.denoiser.state_dict()[key], den_ema.state_dict()[key])
    assert torch.equal(raw.denoiser.state_dict()[key], den.state_dict()[key])
    assert model_hash(folder) == h1 and len(h1) == 64
    # re-saving different weights changes the hash; the folder is replaced whole (no stale files)
    save_model_folder(folder, config=_config(), modules={"vae": vae, "denoiser": den})
    assert model_hash(folder) != h1 and not (folder / "denoiser_ema.safetensors").exists()


def test_vae_only_folder(tmp_path):
    vae, _ = _modules()
    folder = save_model_folder(tmp_path / "v", config={"vae": to_dict(VAE)}, modules={"vae": vae}, extra={})
    b = load_model(folder)
    assert b.vae is not None and b.denoiser is None and b.scale_factor == 1.0


def test_bad_folders_fail_with_one_line_reasons(tmp_path):
    with pytest.raises(CaseError, match="not a model folder"):
        load_model(tmp_path)
    vae, den = _modules()
    folder = save_model_folder(tmp_path / "m", config=_config(), modules={"vae": vae, "denoiser": den})
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["model"]["unet"]["channels"] = [16, 64]  # weights no longer match
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CaseError, match="does not match config.yaml") as err:
        load_model(folder)
    assert "\n" not in str(err.value)
    cfg["model"]["unet"]["chanels"] = cfg["model"]["unet"].pop("channels")
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CaseError, match=r"did you mean 'unet\.channels'"):
        load_model(folder)
    (folder / "denoiser.safetensors").write_bytes(b"\x80\x04pickle-not-allowed")
    (folder / "config.yaml").write_text(yaml.safe_dump(_config()))
    with pytest.raises(CaseError, match="not a readable safetensors"):
        load_model(folder)
    (folder / "extra.json").write_text("{broken")
    with pytest.raises(CaseError, match="unreadable"):
        load_model(folder)


def test_saved_files_are_plain_yaml_json_and_safetensors(tmp_path):
    vae, _ = _modules()
    folder = save_model_folder(tmp_path / "v", config={"vae": VAE}, modules={"vae": vae}, extra={"val_metrics": {"t": torch.tensor([1.5])}})
    assert yaml.safe_load((folder / "config.yaml").read_text())["vae"]["channels"] == [8, 16]
    assert json.loads((folder / "extra.json").read_text()) == {"val_metrics": {"t": [1.5]}}
    from safetensors import safe_open

    with safe_open(str(folder / "vae.safetensors"), framework="pt") as f:
        assert f.metadata()["producer"] == "medldm" and len(list(f.keys())) == len(vae.state_dict())
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers beside the folder


def test_refiner_is_part_of_the_model_bundle(tmp_path):
    """refiner.safetensors + extra.json["refiner"] load into ModelBundle.refiner (bit-exact round trip); the spec's
    norm/base are the folder's, a folder from before they were stored reads as instance/decoded, and the dotted
    ``apply`` path older folders stored is ignored and no longer written."""
    from medldm.models import RefinerSpec, apply_refiner, build_refiner

    vae, den = _modules()
    torch.manual_seed(3)
    ref = build_refiner(2, (4, 4, 4, 4, 8, 4), "none").eval()
    spec = RefinerSpec(spatial_dims=2, features=(4, 4, 4, 4, 8, 4), norm="none", base="degraded")
    assert "apply" not in spec.to_extra()
    folder = save_model_folder(tmp_path / "m", config=_config(), modules={"vae": vae, "denoiser": den, "refiner": ref},
                               extra={"refiner": {**spec.to_extra(), "apply": "medldm.train.refine_stage.apply_refiner"}})
    b = load_model(folder)
    assert b.refiner is not None and not b.refiner.training and b.refiner_base == "degraded"
    assert b.refiner_spec == spec
    d, y = torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(apply_refiner(b.refiner, d, y, b.refiner_base), apply_refiner(ref, d, y, "degraded"))
    legacy = save_model_folder(tmp_path / "old", config=_config(),
                               modules={"vae": vae, "denoiser": den, "refiner": build_refiner(2, spec.features, "instance")},
                               extra={"refiner": {"spatial_dims": 2, "features": list(spec.features)}})
    old = load_model(legacy)
    assert old.refiner is not None and old.refiner_spec.norm == "instance" and old.refiner_base == "decoded"
    assert load_model(folder, ema=False).refiner is not None
    no_spec = save_model_folder(tmp_path / "n", config=_config(), modules={"vae": vae, "denoiser": den, "refiner": ref})
    assert load_model(no_spec).refiner is None  # weights without extra.json["refiner"]: not a refiner folder
    with pytest.raises(ValueError, match="refiner base 'both'"):
        apply_refiner(ref, d, y, "both")
