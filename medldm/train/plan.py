"""``medldm plan``: a dataset fingerprint (:mod:`medldm.data.fingerprint`) -> a training config with a reason per
decision (nnU-Net's experiment planning, for latent diffusion).

:func:`make_plan` decides, each with a one-line reason that goes into PLAN.yaml as a comment:

* 2D or 3D and the slice axis (thick slices, too few slices or a CPU -> 2D slices along the thickest axis);
* target spacing: native (medldm trains on native-resolution crops; the spread of spacings is reported);
* normalization: CT -> the narrowest named HU window holding the data's 1-99 % HU range; MR -> percentiles;
* VAE factor and widths, U-Net widths, refiner (sized by the memory and the device);
* patch size and batch size from a memory model for ``gpu_memory``, calibrated by a measured forward/backward
  at a small size on this machine (:func:`medldm.train.dry_run.measure_stages`);
* steps per stage from ``hours`` and the measured step times;
* the validation split BY SUBJECT (DICOM PatientID / StudyInstanceUID, else the folder), written as explicit
  ``data.train`` / ``data.val`` lists (duplicates kept on one side, extra copies left out).

:func:`plan_yaml` writes the config as YAML text with the reasons as comments; :func:`write_plan` checks it by
loading it back with :func:`medldm.train.schema.load_config`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("denoise", "sr", "thinslice", "synthesis")
GiB = 2**30


@dataclass
class Plan:
    config: dict[str, Any]
    reasons: dict[str, str]  # dotted key (or section) -> reason
    notes: list[str] = field(default_factory=list)
    measurement: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ split by subject
def split_by_subject(scans: list[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Group scans that must stay on one side (same subject, same pixel hash, or listed through one folder),
    hold out ~``val_fraction`` of the groups (seeded hash order) and return the ``data.train`` / ``data.val``
    entries: NIfTI files, and for DICOM series the folder holding their files."""
    parent = list(range(len(scans)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    unit = [s["paths"][0] if s["kind"] == "nifti" else s["folder"] for s in scans]
    first: dict[tuple[str, str], int] = {}
    for i, s in enumerate(scans):
        for key in (("subject", s["subject"]), ("hash", s["pixel_hash"]), ("unit", unit[i])):
            if key in first:
                union(i, first[key])
            else:
                first[key] = i
    folders = sorted({u for i, u in enumerate(unit) if scans[i]["kind"] != "nifti"})
    for i, u in enumerate(unit):  # a listed folder pulls in everything below it
        for f in folders:
            if u != f and (u + "/").startswith(f.rstrip("/") + "/"):
                union(i, first[("unit", f)])
    groups: dict[int, list[int]] = {}
    for i in range(len(scans)):
        groups.setdefault(find(i), []).append(i)
    # copies: keep the first of each pixel hash; a NIfTI file that only duplicates another scan is left out
    seen: dict[str, str] = {}
    dropped = []
    for s in sorted(scans, key=lambda s: s["id"]):
        if s["pixel_hash"] in seen and s["kind"] == "nifti":
            dropped.append(f"{s['id']} (same pixels as {seen[s['pixel_hash']]})")
        seen.setdefault(s["pixel_hash"], s["id"])
    drop_ids = {d.split(" ")[0] for d in dropped}
    drop_ids |= {s["id"] for s in scans if s["constant"] and s["kind"] == "nifti"}
    keys = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{min(scans[i]['id'] for i in groups[g])}"
                                                       .encode()).hexdigest())
    n_val = 0 if len(keys) < 2 or val_fraction <= 0 else min(len(keys) - 1, max(1, round(val_fraction * len(keys))))
    val_groups = set(keys[:n_val])

    def entries(gs: set[int]) -> list[str]:
        units = sorted({unit[i] for g in gs for i in groups[g] if scans[i]["id"] not in drop_ids})
        fold = [u for u in units if u in folders]
        return [u for u in units if not any(u != f and (u + "/").startswith(f.rstrip("/") + "/") for f in fold)]

    train_g, val_g = set(keys) - val_groups, val_groups
    subj = {g: sorted({scans[i]["subject"] for i in groups[g]}) for g in keys}
    return {"train": entries(train_g), "val": entries(val_g), "n_groups": len(keys),
            "train_subjects": sorted(x for g in train_g for x in subj[g]),
            "val_subjects": sorted(x for g in val_g for x in subj[g]),
            "val_scans": sorted(scans[i]["id"] for g in val_g for i in groups[g]), "dropped": dropped}


# ------------------------------------------------------------------------------------------ helpers
def ct_window(p_low: float, p_high: float) -> tuple[str, str]:
    """The narrowest named CT window holding [p_low, p_high] HU (clamped to the 12-bit range), with a reason."""
    from medldm.data.intensity import CT_WINDOWS

    lo, hi = max(p_low, -1024.0), min(p_high, 3071.0)
    fits = [(w_hi - w_lo, name) for name, (w_lo, w_hi) in CT_WINDOWS.items() if w_lo <= lo and hi <= w_hi]
    name = min(fits)[1] if fits else "full"
    w = CT_WINDOWS[name]
    return name, (f"CT: the HU distribution's 1-99 % range is [{p_low:.0f}, {p_high:.0f}] HU; the narrowest named "
                  f"window holding it is '{name}' [{w[0]:.0f}, {w[1]:.0f}] HU")


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


def _round_steps(n: float) -> int:
    n = int(max(200, min(500_000, n)))
    return n // 100 * 100 if n >= 1000 else n // 10 * 10


# ------------------------------------------------------------------------------------------ the planner
def make_plan(fp: dict, task: str, *, gpu_memory: float | None = None, hours: float | None = None,
              device: str = "auto", measure: bool = True, val_fp: dict | None = None, seed: int = 0) -> Plan:
    """A training config (mapping) for fingerprint ``fp`` and ``task`` (see the module doc). ``val_fp``: the
    fingerprint of explicit validation folders (then no split is made); ``measure``: run the small measured
    step (else the memory model is used uncalibrated and step times are not estimated)."""
    import numpy as np

    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    scans = [s for s in fp["scans"] if not s["constant"]]
    if not scans:
        raise ValueError("no readable, non-constant scan: nothing to train on (see `medldm plan --check`)")
    R: dict[str, str] = {}
    notes: list[str] = []
    import torch

    cuda_here = torch.cuda.is_available()
    target = device if device in ("cpu", "cuda") else ("cuda" if cuda_here else "cpu")
    if gpu_memory is None:
        if target == "cuda" and cuda_here:
            gpu_memory = torch.cuda.get_device_properties(0).total_memory / GiB
            R["memory"] = f"--gpu-memory not given: this GPU's {gpu_memory:.0f} GiB"
        else:
            gpu_memory = 24.0 if target == "cuda" else 8.0
            R["memory"] = f"--gpu-memory not given: {gpu_memory:.0f} GiB assumed for {target}"
    else:
        R["memory"] = f"--gpu-memory {gpu_memory:g} GiB"
    if hours is None:
        hours = 24.0 if target == "cuda" else 4.0
    big = target == "cuda" and gpu_memory >= 16

    # --- modality and normalization
    mods = {}
    for s in scans:
        mods[s["modality"]] = mods.get(s["modality"], 0) + 1
    modality = max(mods, key=mods.get)
    if len(mods) > 1:
        notes.append(f"mixed modalities {mods}: planned for the most common, {modality}; consider one model per modality")
    ct = modality == "CT"

    # --- 2D / 3D and slice axis
    vol = [s for s in scans if min(s["shape"]) >= 16]
    spac = np.median(np.array([s["spacing"] for s in (vol or scans)]), axis=0)
    aniso = float(np.median([s["anisotropy"] for s in vol])) if vol else 1.0
    thick_axis = int(np.argmax(spac)) if float(spac.max() / max(spac.min(), 1e-6)) > 1.01 else 2
    if task == "thinslice":
        nd = 3
        R["spatial_dims"] = ("task thinslice learns thin slices from thick ones across the slice direction: a 3D "
                             "model (the schema's thick-slice degradation needs spatial_dims 3)")
        if aniso > 3:
            notes.append(f"thinslice: your scans are already thick (anisotropy {aniso:.1f}); the model learns from "
                         "thin slices, so train it on thin-slice (near-isotropic) scans")
    elif len(vol) < max(1, len(scans) // 2):
        nd = 2
        R["spatial_dims"] = (f"only {len(vol)} of {len(scans)} scans have >= 16 voxels along every axis: "
                             "too few volumes for 3D patches, 2D slices")
    elif aniso > 3.0:
        nd = 2
        R["spatial_dims"] = (f"thick slices: median spacing {' x '.join(f'{v:.2g}' for v in spac)} mm, anisotropy "
                             f"{aniso:.1f} > 3 — 3D patches would mix two resolutions; 2D slices in the high-"
                             "resolution plane (nnU-Net's rule)")
    elif target == "cpu":
        nd = 2
        R["spatial_dims"] = ("near-isotropic volumes, but training on a CPU: a 3D latent diffusion model of useful size "
                             "needs a GPU; 2D slices")
    elif gpu_memory < 12:
        nd = 2
        R["spatial_dims"] = f"near-isotropic volumes, but {gpu_memory:g} GiB is too little for 3D patches; 2D slices"
    else:
        nd = 3
        R["spatial_dims"] = (f"near-isotropic volumes (median spacing {' x '.join(f'{v:.2g}' for v in spac)} mm, "
                             f"anisotropy {aniso:.1f} <= 3) on a {gpu_memory:g} GiB GPU: a 3D model sees anatomy "
                             "in every direction")
    slice_axis = thick_axis if nd == 2 else 2
    if nd == 2:
        R["data.slice_axis"] = (f"slices taken along axis {slice_axis}, the axis with the largest median spacing "
                                f"({spac[slice_axis]:.2g} mm): each slice is a high-resolution plane")
    sp_min, sp_max = fp["summary"]["min_spacing"], fp["summary"]["max_spacing"]
    R["data"] = (f"target spacing: native (medldm trains on native-resolution random crops, no resampling); "
                 f"spacings range {' x '.join(f'{a:.2g}-{b:.2g}' for a, b in zip(sp_min, sp_max, strict=True))} mm")

    # --- widths (by device and memory), factor from the patch
    in_plane = [s for i, s in enumerate(fp["summary"]["median_shape"]) if nd == 3 or i != slice_axis]
    cap = (256 if nd == 2 else 128) if big else (128 if target == "cuda" else 64)
    if nd == 3 and not big:
        cap = 64
    cands = [c for c in (256, 192, 128, 96, 64, 48, 32) if c <= cap]
    fitting = [c for c in cands if c <= max(32, min(in_plane))] or [32]
    if big:
        vae = {"channels": [64, 128, 128] if nd == 2 else [32, 64, 64], "latent_channels": 4, "num_res_blocks": 2
               if nd == 2 else 1, "norm_num_groups": 32 if nd == 2 else 16}
        unet = {"channels": [128, 256, 256] if nd == 2 else [64, 128, 256], "attention_levels": [False, True, True],
                "num_res_blocks": 2, "num_head_channels": 32, "norm_num_groups": 32}
        feats = [32, 32, 64, 128, 256, 32]
        why = f"a {gpu_memory:g} GiB GPU"
    else:
        vae = {"channels": [32, 64, 64] if nd == 3 or fitting[0] >= 64 else [32, 64], "latent_channels": 4,
               "num_res_blocks": 1, "norm_num_groups": 16}
        unet = {"channels": [32, 64, 64], "attention_levels": [False, False, True], "num_res_blocks": 1,
                "num_head_channels": 32, "norm_num_groups": 16}
        feats = [32, 32, 64, 128, 256, 32]
        why = "a CPU" if target == "cpu" else f"a {gpu_memory:g} GiB GPU"
    vae["attention_levels"] = [False] * len(vae["channels"])
    factor = 2 ** (len(vae["channels"]) - 1)
    R["vae"] = (f"VAE factor {factor} ({len(vae['channels'])} levels) and widths {vae['channels']} sized for {why}; "
                f"{vae['latent_channels']} latent channels")
    R["unet"] = f"U-Net widths {unet['channels']} sized for {why}; attention on the coarser latent levels only"
    refine = task in ("denoise", "sr", "thinslice")
    min_batch = 4 if nd == 2 else 1
    max_batch = 32 if nd == 2 else 8

    def mapping(p: int, batch: int) -> dict:
        return {"spatial_dims": nd, "data": {"patch_size": [p] * nd}, "vae": vae, "unet": unet,
                "refine": {"enabled": refine, "features": feats}, "batch": batch}

    # --- measured step at a small size on this machine: calibrates memory, gives step times
    calib, meas = 1.0, {}
    if measure:
        meas = _measure(task, nd, vae, unet, feats, refine, target, cuda_here)
        small = mapping(meas["patch"], meas["batch"])
        pred = memory_model(small, meas["batch"]) - 0.5 * GiB
        got = max((f.get("peak_bytes") or 0) for f in meas["stages"].values())
        if got > 0 and pred > 0:
            calib = float(min(4.0, max(0.25, got / pred)))
        meas["calibration"] = calib
    budget = 0.85 * gpu_memory * GiB
    patch, batch = fitting[-1], 1
    for p in fitting:
        b = int((budget - memory_model(mapping(p, 0), 0, calib)) // max(memory_model(mapping(p, 1), 1, calib)
                                                                      - memory_model(mapping(p, 0), 0, calib), 1))
        if b >= min_batch:
            patch, batch = p, min(b, max_batch)
            break
        patch, batch = p, max(1, b)
    mem_need = memory_model(mapping(patch, batch), batch, calib)
    R["data.patch_size"] = (f"{'x'.join([str(patch)] * nd)} crops: the largest of {cands} that is "
                            f"<= the median {'in-plane ' if nd == 2 else ''}size {in_plane} and leaves a batch of "
                            f">= {min_batch} in {gpu_memory:g} GiB (a multiple of the VAE factor {factor})")
    R["data.batch_size"] = (f"memory model: {mem_need / GiB:.1f} GiB of {gpu_memory:g} GiB at batch {batch} "
                            f"(weights + AdamW + activations{f', calibrated x{calib:.2f} by a measured step' if measure else ''}"
                            f"; 15 % headroom), capped at {max_batch}")

    # --- degradation and augmentation
    noise = fp["summary"].get("median_noise_relative") or 0.0
    deg: dict[str, Any] = {}
    if task == "denoise":
        lo, hi = round(max(0.005, 0.5 * noise), 4), round(min(0.3, max(0.1, 4 * noise)), 4)
        deg = {"kind": "gaussian" if ct else "rician", "level_range": [lo, hi]}
        R["degrade"] = (f"denoise: {'Gaussian noise (CT noise is near Gaussian)' if ct else 'Rician noise (MR magnitude)'}"
                        f"; the scans' own noise is ~{100 * noise:.1f} % of their 0.5-99.5 % range "
                        f"(skimage estimate_sigma), so training levels span {100 * lo:.1f}-{100 * hi:.1f} %")
    elif task == "sr":
        deg = {"kind": "downsample", "scale": 2, "blur_range": [0.0, 0.5], **({"upsample": "cubic"} if nd == 2 else {})}
        R["degrade"] = ("sr: x2 in-plane down-sampling with a random pre-blur (robust to the scanner's kernel)"
                        + ("; the low-res input on the grid by bicubic interpolation (a better start for the refiner "
                           "than bilinear: mr-sr2x-2d's held-out figures, docs/models.md)" if nd == 2 else ""))
    elif task == "thinslice":
        deg = {"kind": "thick", "scale": 4}
        R["degrade"] = "thinslice: thick slices of 4 thin ones (e.g. 1 mm -> 4 mm, typical clinical thickness)"
    aug = {"enabled": True, "bias_field_prob": 0.0 if ct else 0.3}
    R["augment"] = ("flips, small rotations, gamma; no bias field for CT (HU are calibrated)" if ct else
                    "flips, small rotations, gamma and a smooth bias field (MR intensity inhomogeneity)")

    # --- steps from the time budget
    shares = {"vae": 0.35, "ldm": 0.45, "refine": 0.20} if refine else {"vae": 0.45, "ldm": 0.55}
    steps = {"vae": 2000, "ldm": 5000, "refine": 3000}
    if measure:
        scale = (patch**nd * batch) / (meas["patch"] ** nd * meas["batch"])
        slow = 1.0 if meas["device"] == target else 40.0  # planned for CUDA, measured on this CPU
        est = {s: f["step_s"] * scale / slow for s, f in meas["stages"].items()}
        if "refine" in est:  # measured with fewer sampling steps than planned: the U-Net part grows with them
            est["refine"] *= 1.0 + (8 - meas["stages"]["refine"]["sampling_steps"]) / 4
        for s in shares:
            steps[s] = _round_steps(0.85 * hours * 3600 * shares[s] / max(est.get(s, 1.0), 1e-4))
        meas["step_s_estimate"] = est
        R["vae_train"] = (f"steps from the {hours:g} h budget: 85 % for optimiser steps, split {', '.join(f'{k} {int(v * 100)} %' for k, v in shares.items())}; "
                      f"step times {', '.join(f'{k} {v:.3g} s' for k, v in est.items())} from a step measured on "
                      f"{meas['device']} at batch {meas['batch']}, patch {meas['patch']} and scaled by voxels"
                      + ("; assumed 40x faster on a GPU (no GPU here: run `medldm train PLAN.yaml -o RUN --dry-run` "
                         "on the GPU machine to measure)" if slow > 1 else ""))
    else:
        R["vae_train"] = "steps: defaults (no measured step)"

    # --- split by subject
    if val_fp is not None:
        sp = split_by_subject(scans, 0.0, seed)
        vsp = split_by_subject([s for s in val_fp["scans"] if not s["constant"]], 0.0, seed)
        split = {"train": sp["train"], "val": vsp["train"], "dropped": sp["dropped"], "n_groups": sp["n_groups"],
                 "train_subjects": sp["train_subjects"], "val_subjects": vsp["train_subjects"]}
        R["data.val"] = "validation scans given with --val"
    else:
        split = split_by_subject(scans, 0.2, seed)
        froms = ", ".join(f"{k} ({v})" for k, v in fp["summary"]["subject_from"].items())
        if split["val"]:
            R["data.val"] = (f"validation BY SUBJECT: {len(split['val_subjects'])} of "
                             f"{len(split['val_subjects']) + len(split['train_subjects'])} subjects held out "
                             f"(~20 %, seeded), subjects from {froms}; duplicates and folders stay on one side")
        else:
            R["data.val"] = (f"one subject group only (subjects from {froms}): no held-out subject, validation on "
                             "training items (optimistic) — add another subject's scans to data.val")
    if split.get("dropped"):
        notes.append("left out (duplicates): " + "; ".join(split["dropped"]))
    norm_reason = None
    data: dict[str, Any] = {"train": split["train"], "val": split["val"], "val_fraction": 0.0,
                            "modality": "CT" if ct else "MR", "slice_axis": slice_axis, "patch_size": [patch] * nd,
                            "batch_size": int(batch), "min_foreground": 0.05 if nd == 2 else 0.0}
    if ct:
        win, norm_reason = ct_window(fp["summary"]["p_low"], fp["summary"]["p_high"])
        data["ct_window"] = win
    else:
        norm_reason = (f"{modality}: percentile normalization (0.5-99.5 % of the foreground of each scan) — intensities "
                       "have no absolute unit" + (f" ({modality} is treated like MR)" if modality != "MR" else ""))
    R["data.modality"] = norm_reason
    R["data.val_fraction"] = "0: the split is the explicit data.val list above (by subject), never by scan"

    def stage_sec(n: int) -> dict:
        every = max(10, n // 10)
        return {"steps": n, "warmup_steps": min(500, max(10, n // 20)), "lr_schedule": "cosine",
                "log_every": max(1, min(50, n // 50)), "val_every": every, "image_every": every, "ckpt_every": every}

    cfg = {
        "stage": "both", "task": "sr" if task == "thinslice" else task, "spatial_dims": nd, "seed": seed,
        "data": data, "augment": aug,
        **({"degrade": deg} if deg else {}),
        "vae": vae, "unet": {**unet, "noise_level_cond": task != "synthesis"},
        "diffusion": {"schedule": "flow", "prediction": "flow", "sampler": "euler_flow",
                      "sampling_steps": 20 if task == "synthesis" else 8},
        "vae_train": {**stage_sec(steps["vae"]), "lr": 1e-4 if big else 5e-4},
        "ldm_train": {**stage_sec(steps["ldm"]), "lr": 1e-4 if big else 5e-4, "ema_decay": 0.999},
        **({"refine": {**stage_sec(steps["refine"]), "enabled": True, "features": feats}} if refine else {}),
        "engine": {"device": target, "precision": "auto",
                   **({"num_threads": os.cpu_count() or 1} if target == "cpu" else {})},
    }
    if task == "synthesis":
        cfg["unet"].pop("noise_level_cond")
    R["task"] = {"thinslice": "thinslice = task sr with thick-slice pairs (degrade.kind thick)"}.get(task, f"--task {task}")
    R["diffusion"] = ("rectified flow + Euler sampler: few sampling steps suffice"
                      + ("; 8 steps for the enhancement tasks (the refiner makes up the rest)" if refine else ""))
    if measure:
        for s in shares:
            key = "refine" if s == "refine" else f"{s}_train"
            R[key] = (R[key] + "; " if s == "vae" else "") + (
                f"{steps[s]} steps x ~{meas['step_s_estimate'][s]:.3g} s = {steps[s] * meas['step_s_estimate'][s] / 3600:.1f} h")
    R["engine"] = f"--device {target}" + ("" if device in ("cpu", "cuda") else " (auto: what this machine has)")
    if refine:
        R["refine"] = "pixel-space refiner for denoise / sr: gets past the VAE's reconstruction ceiling" + (
            "; " + R["refine"] if "refine" in R else "")
    return Plan(cfg, R, notes, meas, split)


def _measure(task: str, nd: int, vae: dict, unet: dict, feats: list[int], refine: bool, target: str,
             cuda_here: bool) -> dict[str, Any]:
    """One measured step per stage at a small size (random batch) on the training device if it is here, else CPU."""
    import torch

    from medldm.train.dry_run import measure_stages
    from medldm.train.engine import make_runtime
    from medldm.train.schema import load_config

    dev = "cuda" if target == "cuda" and cuda_here else "cpu"
    factor = 2 ** (len(vae["channels"]) - 1)
    patch = max(32, factor * 2 ** len(unet["channels"])) if nd == 3 else 64
    batch = 2
    m = {"stage": "both", "task": "sr" if task == "thinslice" else task, "spatial_dims": nd,
         "data": {"patch_size": [patch] * nd, "batch_size": batch},
         "vae": vae, "unet": {**unet, "noise_level_cond": task != "synthesis"},
         "diffusion": {"schedule": "flow", "prediction": "flow", "sampler": "euler_flow", "sampling_steps": 1 if nd == 3 else 2},
         "engine": {"device": dev, "progress": False, "tensorboard": False}}
    if task == "synthesis":
        m["unet"].pop("noise_level_cond")
    if task == "sr":
        m["degrade"] = {"kind": "downsample"}
    elif task == "thinslice":
        m["degrade"] = {"kind": "thick", "scale": 2}
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
        from medldm.train.distributed import cleanup

        cleanup(rt.dist)
    return {"device": dev, "patch": patch, "batch": batch, "stages": stages}


# ------------------------------------------------------------------------------------------ YAML with reasons
def _wrap(reason: str, indent: str) -> list[str]:
    return [f"{indent}# {ln}" for ln in textwrap.wrap(reason, 110 - len(indent))]


def _value(v: Any) -> str:
    return json.dumps(v)


def plan_yaml(plan: Plan, header: list[str]) -> str:
    """The config as YAML text: each decision's reason as a comment above its key."""
    out = [f"# {h}" for h in header]
    for n in plan.notes:
        out += _wrap("NOTE: " + n, "")
    for key, val in plan.config.items():
        if key in plan.reasons:
            out += _wrap(plan.reasons[key], "")
        if not isinstance(val, dict):
            out.append(f"{key}: {_value(val)}")
            continue
        out.append(f"{key}:")
        for k, v in val.items():
            r = plan.reasons.get(f"{key}.{k}")
            if r:
                out += _wrap(r, "  ")
            if isinstance(v, list) and v and all(isinstance(e, str) for e in v):
                out.append(f"  {k}:")
                out += [f"    - {_value(e)}" for e in v]
            else:
                out.append(f"  {k}: {_value(v)}")
    return "\n".join(out) + "\n"


def write_plan(plan: Plan, path: str | Path, header: list[str]) -> Path:
    """Write PLAN.yaml (validated by loading it back with ``load_config``) atomically; returns the path."""
    from medldm.io.atomic import atomic_file
    from medldm.train.schema import load_config

    text = plan_yaml(plan, header)
    import yaml

    load_config(yaml.safe_load(text))  # raises ConfigError naming the key if the plan is not a valid config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path
