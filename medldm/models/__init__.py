"""Networks: KL-VAE, latent denoiser and stage-3 refiner built from config, EMA, model folders.

Public API (imported lazily, so ``import medldm.models`` stays light)::

    VAEConfig, UNetConfig, from_dict, to_dict               # medldm.models.config
    build_vae(cfg: VAEConfig) -> monai AutoencoderKL
    build_denoiser(cfg: UNetConfig, spatial_dims, latent_channels) -> LatentDenoiser
    build_refiner(spatial_dims, features, norm); apply_refiner(net, decoded, degraded, base); RefinerSpec
    space_to_depth(x, f); depth_to_space(x, f)              # the U-Net's image condition (medldm.models.conditioning)
    EMA(model, decay=0.999); unwrap(model)
    save_model_folder(path, *, config, modules, extra); load_model(path) -> ModelBundle (vae, denoiser, refiner)
    load_refiner(path); model_hash(path)
"""

from __future__ import annotations

import importlib

_WHERE = {
    "VAEConfig": "config",
    "UNetConfig": "config",
    "from_dict": "config",
    "to_dict": "config",
    "LatentDenoiser": "denoiser",
    "build_denoiser": "denoiser",
    "EMA": "ema",
    "unwrap": "ema",
    "ModelBundle": "folder",
    "load_model": "folder",
    "load_refiner": "folder",
    "model_hash": "folder",
    "save_model_folder": "folder",
    "build_vae": "vae",
    "RefinerSpec": "refiner",
    "apply_refiner": "refiner",
    "build_refiner": "refiner",
    "space_to_depth": "conditioning",
    "depth_to_space": "conditioning",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"medldm.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medldm.models' has no attribute {name!r}")
