"""Networks: KL-VAE and latent denoiser built from config, EMA, model folders.

Public API (imported lazily, so ``import medldm.models`` stays light)::

    VAEConfig, UNetConfig, from_dict, to_dict               # medldm.models.config
    build_vae(cfg: VAEConfig) -> monai AutoencoderKL
    build_denoiser(cfg: UNetConfig, spatial_dims, latent_channels) -> LatentDenoiser
    EMA(model, decay=0.999); unwrap(model)
    save_model_folder(path, *, config, modules, extra); load_model(path) -> ModelBundle; model_hash(path)
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
    "model_hash": "folder",
    "save_model_folder": "folder",
    "build_vae": "vae",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"medldm.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medldm.models' has no attribute {name!r}")
