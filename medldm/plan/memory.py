"""How much a training step needs: the memory model of ``medldm plan`` and the one measured step that
calibrates it (:func:`medldm.train.dry_run.measure_stages` on a random batch)."""

from __future__ import annotations

import math
from typing import Any

import torch

from medldm.train.distributed import cleanup
from medldm.train.dry_run import measure_stages
from medldm.train.engine import make_runtime
from medldm.train.schema import load_config

GiB = 2**30


def _activation_units(spatial_dims: int, patch: list[int], channels: list[int], blocks: int) -> float:
    """Channel-voxels kept for the backward pass by a U-shaped network (per sample), up to a constant."""
    vox = math.prod(patch)
    return float(sum(c * vox / 2 ** (spatial_dims * lvl) * (2 * blocks + 2) for lvl, c in enumerate(channels)))


def memory_model(cfg_map: dict, batch: int, calib: float = 1.0) -> float:
    """Bytes a training step of the largest stage needs at ``batch``: weights + gradients + AdamW moments
    (16 bytes a parameter, estimated from the widths) and activations (12 bytes a channel-voxel, scaled by the
    calibration factor measured on this machine), plus 0.5 GiB of workspace."""
    nd = cfg_map["spatial_dims"]
    patch = list(cfg_map["data"]["patch_size"])
    v, u = cfg_map["vae"], cfg_map["unet"]
    f = 2 ** (len(v["channels"]) - 1)
    lat = [p // f for p in patch]
    k3 = 3**nd
    p_vae = sum(c * c * k3 * (2 * v["num_res_blocks"] + 1) for c in v["channels"]) * 2
    p_unet = sum(c * c * k3 * (2 * u["num_res_blocks"] + 1) for c in u["channels"]) * 2
    act_vae = 2 * _activation_units(nd, patch, list(v["channels"]), v["num_res_blocks"])
    act_unet = 2 * _activation_units(nd, lat, list(u["channels"]), u["num_res_blocks"])
    ref = cfg_map.get("refine", {})
    act_ref = 2 * _activation_units(nd, patch, list(ref.get("features", (16,))[:5]), 1) if ref.get("enabled") else 0
    act = max(act_vae, act_unet, act_ref) * 12.0 * calib
    return 16.0 * max(p_vae, p_unet) + batch * act + 0.5 * GiB


def measure_step(task: str, nd: int, vae: dict, unet: dict, feats: list[int], refine: bool, target: str,
                 cuda_here: bool) -> dict[str, Any]:
    """One measured step per stage at a small size (random batch) on the training device if it is here, else CPU."""
    dev = "cuda" if target == "cuda" and cuda_here else "cpu"
    factor = 2 ** (len(vae["channels"]) - 1)
    patch = max(32, factor * 2 ** len(unet["channels"])) if nd == 3 else 64
    batch = 2
    m = {"stage": "both", "task": task, "spatial_dims": nd,
         "data": {"patch_size": [patch] * nd, "batch_size": batch},
         "vae": vae, "unet": {**unet, "noise_level_cond": task != "synthesis"},
         "diffusion": {"schedule": "flow", "prediction": "flow", "sampler": "euler_flow", "sampling_steps": 1 if nd == 3 else 2},
         "engine": {"device": dev, "progress": False, "tensorboard": False}}
    if task == "synthesis":
        m["unet"].pop("noise_level_cond")
    if task == "sr":
        m["degrade"] = {"kind": "downsample"}
    elif task == "thinslice":
        m["degrade"] = {"kind": "thick", "scale": 4}
    elif task == "denoise":
        m["degrade"] = {"kind": "rician"}
    if refine:
        m["refine"] = {"enabled": True, "features": feats}
    cfg = load_config(m)
    rt = make_runtime(cfg.engine)
    try:
        x = torch.rand((batch, 1, *[patch] * nd)) * 2 - 1
        stages = measure_stages(cfg, rt, x, warmup=1)
    finally:
        cleanup(rt.dist)
    return {"device": dev, "patch": patch, "batch": batch, "stages": stages}
