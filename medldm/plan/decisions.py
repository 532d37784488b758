"""``medldm plan``: a dataset fingerprint (:mod:`medldm.plan.fingerprint`) -> a training config with a reason per
decision (nnU-Net's experiment planning, for latent diffusion).

Each decision is one ``decide_*`` function returning its value and a one-line reason that goes into PLAN.yaml as
a comment (:mod:`medldm.plan.write`); :func:`make_plan` calls them in order:

* :func:`decide_device`: the training device, its memory and the time budget;
* :func:`decide_modality`: the most common modality (mixed data gets a note);
* :func:`decide_dims`: 2D or 3D and the slice axis (thick slices, too few slices or a CPU -> 2D slices along the
  thickest axis; task ``thinslice`` is always 2D: thick -> thin along one in-plane axis of thin slices);
* :func:`decide_networks`: VAE factor and widths, U-Net widths, refiner (sized by the memory and the device);
* :func:`decide_patch_batch`: patch and batch size from a memory model (:mod:`medldm.plan.memory`) for the
  memory, calibrated by a measured step at a small size on this machine;
* :func:`decide_degrade` and :func:`decide_augment`: the training pairs and augmentations;
* :func:`decide_steps`: steps per stage from the time budget and the measured step times;
* :func:`decide_split`: the validation split BY SUBJECT (:mod:`medldm.plan.split`);
* :func:`decide_normalization`: CT -> the narrowest named HU window holding the data's 1-99 % HU range; MR ->
  percentiles. Target spacing is native (medldm trains on native-resolution crops; the spread is reported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medldm.data.intensity import CT_WINDOWS
from medldm.plan.memory import GiB, measure_step, memory_model
from medldm.plan.split import split_by_subject

TASKS = ("denoise", "sr", "thinslice", "synthesis")
ENHANCE_TASKS = ("denoise", "sr", "thinslice")
#: task thinslice: thin slices per thick slice (1 mm -> 4 mm, a typical clinical thickness)
THINSLICE_SCALE = 4


@dataclass
class Plan:
    config: dict[str, Any]
    reasons: dict[str, str]  # dotted key (or section) -> reason
    notes: list[str] = field(default_factory=list)
    measurement: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)


@dataclass
class Target:
    device: str  # "cpu" | "cuda"
    gpu_memory: float  # GiB planned for
    hours: float
    big: bool  # a GPU with >= 16 GiB: the larger networks
    cuda_here: bool


def decide_device(device: str, gpu_memory: float | None, hours: float | None) -> tuple[Target, str]:
    cuda_here = torch.cuda.is_available()
    target = device if device in ("cpu", "cuda") else ("cuda" if cuda_here else "cpu")
    if gpu_memory is not None:
        why = f"--gpu-memory {gpu_memory:g} GiB"
    elif target == "cuda" and cuda_here:
        gpu_memory = torch.cuda.get_device_properties(0).total_memory / GiB
        why = f"--gpu-memory not given: this GPU's {gpu_memory:.0f} GiB"
    else:
        gpu_memory = 24.0 if target == "cuda" else 8.0
        why = f"--gpu-memory not given: {gpu_memory:.0f} GiB assumed for {target}"
    if hours is None:
        hours = 24.0 if target == "cuda" else 4.0
    return Target(target, gpu_memory, hours, target == "cuda" and gpu_memory >= 16, cuda_here), why


def decide_modality(scans: list[dict]) -> tuple[str, str | None]:
    """The most common modality, and a note when the data mixes modalities."""
    mods: dict[str, int] = {}
    for s in scans:
        mods[s["modality"]] = mods.get(s["modality"], 0) + 1
    modality = max(mods, key=mods.get)
    note = (f"mixed modalities {mods}: planned for the most common, {modality}; consider one model per modality"
            if len(mods) > 1 else None)
    return modality, note


def _mm(v) -> str:
    return " x ".join(f"{x:.2g}" for x in v)


def decide_dims(task: str, scans: list[dict], tg: Target) -> tuple[tuple[int, int], str, str | None]:
    """(spatial_dims, slice_axis), the reason, and a note (or None)."""
    vol = [s for s in scans if min(s["shape"]) >= 16]
    spac = np.median(np.array([s["spacing"] for s in (vol or scans)]), axis=0)
    aniso = float(np.median([s["anisotropy"] for s in vol])) if vol else 1.0
    thick_axis = int(np.argmax(spac)) if float(spac.max() / max(spac.min(), 1e-6)) > 1.01 else 2
    note = None
    if task == "thinslice":
        nd, why = 2, ("task thinslice: a 2D model learns thick -> thin along one in-plane axis of thin slices "
                      "(SMORE-style self-similarity, as the shipped mr-thinslice-4x); at inference it runs on the "
                      "two reformats across the thick slices")
        if aniso > 3:
            note = (f"thinslice: your scans are already thick (anisotropy {aniso:.1f}); the model learns from thin "
                    "in-plane detail, so train it on thin-slice (near-isotropic) scans")
    elif len(vol) < max(1, len(scans) // 2):
        nd, why = 2, (f"only {len(vol)} of {len(scans)} scans have >= 16 voxels along every axis: too few volumes for "
                      "3D patches, 2D slices")
    elif aniso > 3.0:
        nd, why = 2, (f"thick slices: median spacing {_mm(spac)} mm, anisotropy {aniso:.1f} > 3 — 3D patches would mix "
                      "two resolutions; 2D slices in the high-resolution plane (nnU-Net's rule)")
    elif tg.device == "cpu":
        nd, why = 2, ("near-isotropic volumes, but training on a CPU: a 3D latent diffusion model of useful size needs "
                      "a GPU; 2D slices")
    elif tg.gpu_memory < 12:
        nd, why = 2, f"near-isotropic volumes, but {tg.gpu_memory:g} GiB is too little for 3D patches; 2D slices"
    else:
        nd, why = 3, (f"near-isotropic volumes (median spacing {_mm(spac)} mm, anisotropy {aniso:.1f} <= 3) on a "
                      f"{tg.gpu_memory:g} GiB GPU: a 3D model sees anatomy in every direction")
    return (nd, thick_axis if nd == 2 else 2), why, note


def decide_networks(nd: int, tg: Target, smallest_in_plane: int) -> tuple[dict, dict, list[int], str]:
    """VAE, U-Net and refiner widths, and why."""
    if tg.big:
        vae = {"channels": [64, 128, 128] if nd == 2 else [32, 64, 64], "latent_channels": 4,
               "num_res_blocks": 2 if nd == 2 else 1, "norm_num_groups": 32 if nd == 2 else 16}
        unet = {"channels": [128, 256, 256] if nd == 2 else [64, 128, 256], "attention_levels": [False, True, True],
                "num_res_blocks": 2, "num_head_channels": 32, "norm_num_groups": 32}
        why = f"a {tg.gpu_memory:g} GiB GPU"
    else:
        vae = {"channels": [32, 64, 64] if nd == 3 or smallest_in_plane >= 64 else [32, 64], "latent_channels": 4,
               "num_res_blocks": 1, "norm_num_groups": 16}
        unet = {"channels": [32, 64, 64], "attention_levels": [False, False, True], "num_res_blocks": 1,
                "num_head_channels": 32, "norm_num_groups": 16}
        why = "a CPU" if tg.device == "cpu" else f"a {tg.gpu_memory:g} GiB GPU"
    vae["attention_levels"] = [False] * len(vae["channels"])
    return vae, unet, [32, 32, 64, 128, 256, 32], why


def patch_candidates(nd: int, tg: Target, in_plane: list[int], task: str) -> tuple[list[int], list[int]]:
    """The patch sizes considered (by device) and those that fit the data (largest first)."""
    cap = (256 if nd == 2 else 128) if tg.big else (128 if tg.device == "cuda" else 64)
    if nd == 3 and not tg.big:
        cap = 64
    cands = [c for c in (256, 192, 128, 96, 64, 48, 32) if c <= cap]
    if task == "thinslice":  # thick slices of THINSLICE_SCALE thin ones tile the patch
        cands = [c for c in cands if c % THINSLICE_SCALE == 0]
    return cands, [c for c in cands if c <= max(32, min(in_plane))] or [32]


def decide_patch_batch(mapping, fitting: list[int], nd: int, tg: Target, calib: float) -> tuple[int, int, float]:
    """The largest fitting patch that leaves a batch of >= 4 (2D) / 1 (3D) in 85 % of the memory; the batch capped
    at 32 / 8. ``mapping(patch, batch)`` builds the config map the memory model reads."""
    min_batch, max_batch = (4, 32) if nd == 2 else (1, 8)
    budget = 0.85 * tg.gpu_memory * GiB
    patch, batch = fitting[-1], 1
    for p in fitting:
        fixed = memory_model(mapping(p, 0), 0, calib)
        b = int((budget - fixed) // max(memory_model(mapping(p, 1), 1, calib) - fixed, 1))
        if b >= min_batch:
            patch, batch = p, min(b, max_batch)
            break
        patch, batch = p, max(1, b)
    return patch, batch, memory_model(mapping(patch, batch), batch, calib)


def decide_degrade(task: str, ct: bool, nd: int, noise: float) -> tuple[dict[str, Any], str | None]:
    if task == "denoise":
        lo, hi = round(max(0.005, 0.5 * noise), 4), round(min(0.3, max(0.1, 4 * noise)), 4)
        return {"kind": "gaussian" if ct else "rician", "level_range": [lo, hi]}, (
            f"denoise: {'Gaussian noise (CT noise is near Gaussian)' if ct else 'Rician noise (MR magnitude)'}; the "
            f"scans' own noise is ~{100 * noise:.1f} % of their 0.5-99.5 % range (skimage estimate_sigma), so "
            f"training levels span {100 * lo:.1f}-{100 * hi:.1f} %")
    if task == "sr":
        return {"kind": "downsample", "scale": 2, "blur_range": [0.0, 0.5], **({"upsample": "cubic"} if nd == 2 else {})}, (
            "sr: x2 in-plane down-sampling with a random pre-blur (robust to the scanner's kernel)"
            + ("; the low-res input on the grid by bicubic interpolation (a better start for the refiner than "
               "bilinear: mr-sr2x-2d's held-out figures, docs/models.md)" if nd == 2 else ""))
    if task == "thinslice":
        return {"kind": "thick", "scale": THINSLICE_SCALE, "profile": "box", "noise_aug_range": [0.0, 0.0]}, (
            f"thinslice: thick slices of {THINSLICE_SCALE} thin ones (box profile: their mean; e.g. 1 mm -> 4 mm, a "
            "typical clinical thickness) along one in-plane axis drawn per sample")
    return {}, None


def decide_augment(ct: bool) -> tuple[dict[str, Any], str]:
    return {"enabled": True, "bias_field_prob": 0.0 if ct else 0.3}, (
        "flips, small rotations, gamma; no bias field for CT (HU are calibrated)" if ct else
        "flips, small rotations, gamma and a smooth bias field (MR intensity inhomogeneity)")


def _round_steps(n: float) -> int:
    n = int(max(200, min(500_000, n)))
    return n // 100 * 100 if n >= 1000 else n // 10 * 10


def decide_steps(refine: bool, tg: Target, meas: dict, patch: int, batch: int, nd: int) -> tuple[dict[str, int], str]:
    """Steps per stage: 85 % of the time budget split between the stages by the measured step times."""
    shares = {"vae": 0.35, "ldm": 0.45, "refine": 0.20} if refine else {"vae": 0.45, "ldm": 0.55}
    steps = {"vae": 2000, "ldm": 5000, "refine": 3000}
    if not meas:
        return steps, "steps: defaults (no measured step)"
    scale = (patch**nd * batch) / (meas["patch"] ** nd * meas["batch"])
    slow = 1.0 if meas["device"] == tg.device else 40.0  # planned for CUDA, measured on this CPU
    est = {s: f["step_s"] * scale / slow for s, f in meas["stages"].items()}
    if "refine" in est:  # measured with fewer sampling steps than planned: the U-Net part grows with them
        est["refine"] *= 1.0 + (8 - meas["stages"]["refine"]["sampling_steps"]) / 4
    for s in shares:
        steps[s] = _round_steps(0.85 * tg.hours * 3600 * shares[s] / max(est.get(s, 1.0), 1e-4))
    meas["step_s_estimate"] = est
    return steps, (
        f"steps from the {tg.hours:g} h budget: 85 % for optimiser steps, split "
        f"{', '.join(f'{k} {int(v * 100)} %' for k, v in shares.items())}; step times "
        f"{', '.join(f'{k} {v:.3g} s' for k, v in est.items())} from a step measured on {meas['device']} at batch "
        f"{meas['batch']}, patch {meas['patch']} and scaled by voxels"
        + ("; assumed 40x faster on a GPU (no GPU here: run `medldm train PLAN.yaml -o RUN --dry-run` on the GPU "
           "machine to measure)" if slow > 1 else ""))


def decide_split(fp: dict, scans: list[dict], val_fp: dict | None, seed: int) -> tuple[dict[str, Any], str]:
    if val_fp is not None:
        sp = split_by_subject(scans, 0.0, seed)
        vsp = split_by_subject([s for s in val_fp["scans"] if not s["constant"]], 0.0, seed)
        return {"train": sp["train"], "val": vsp["train"], "dropped": sp["dropped"], "n_groups": sp["n_groups"],
                "train_subjects": sp["train_subjects"], "val_subjects": vsp["train_subjects"]}, \
            "validation scans given with --val"
    split = split_by_subject(scans, 0.2, seed)
    froms = ", ".join(f"{k} ({v})" for k, v in fp["summary"]["subject_from"].items())
    if split["val"]:
        n = len(split["val_subjects"]) + len(split["train_subjects"])
        return split, (f"validation BY SUBJECT: {len(split['val_subjects'])} of {n} subjects held out (~20 %, seeded), "
                       f"subjects from {froms}; duplicates and folders stay on one side")
    return split, (f"one subject group only (subjects from {froms}): no held-out subject, validation on training items "
                   "(optimistic) — add another subject's scans to data.val")


def ct_window(p_low: float, p_high: float) -> tuple[str, str]:
    """The narrowest named CT window holding [p_low, p_high] HU (clamped to the 12-bit range), with a reason."""
    lo, hi = max(p_low, -1024.0), min(p_high, 3071.0)
    fits = [(w_hi - w_lo, name) for name, (w_lo, w_hi) in CT_WINDOWS.items() if w_lo <= lo and hi <= w_hi]
    name = min(fits)[1] if fits else "full"
    w = CT_WINDOWS[name]
    return name, (f"CT: the HU distribution's 1-99 % range is [{p_low:.0f}, {p_high:.0f}] HU; the narrowest named "
                  f"window holding it is '{name}' [{w[0]:.0f}, {w[1]:.0f}] HU")


def decide_normalization(fp: dict, modality: str) -> tuple[dict[str, Any], str]:
    """The ``data`` keys of the intensity normalization (modality, CT window), and why."""
    if modality == "CT":
        win, why = ct_window(fp["summary"]["p_low"], fp["summary"]["p_high"])
        return {"modality": "CT", "ct_window": win}, why
    return {"modality": "MR"}, (
        f"{modality}: percentile normalization (0.5-99.5 % of the foreground of each scan) — intensities have no "
        "absolute unit" + (f" ({modality} is treated like MR)" if modality != "MR" else ""))


def _stage(n: int) -> dict:
    every = max(10, n // 10)
    return {"steps": n, "warmup_steps": min(500, max(10, n // 20)), "lr_schedule": "cosine",
            "log_every": max(1, min(50, n // 50)), "val_every": every, "image_every": every, "ckpt_every": every}


def make_plan(fp: dict, task: str, *, gpu_memory: float | None = None, hours: float | None = None,
              device: str = "auto", measure: bool = True, val_fp: dict | None = None, seed: int = 0) -> Plan:
    """A training config (mapping) for fingerprint ``fp`` and ``task`` (see the module doc). ``val_fp``: the
    fingerprint of explicit validation folders (then no split is made); ``measure``: run the small measured
    step (else the memory model is used uncalibrated and step times are not estimated)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    scans = [s for s in fp["scans"] if not s["constant"]]
    if not scans:
        raise ValueError("no readable, non-constant scan: nothing to train on (see `medldm plan --check`)")
    R: dict[str, str] = {}
    notes: list[str] = []
    tg, R["memory"] = decide_device(device, gpu_memory, hours)
    modality, note = decide_modality(scans)
    notes += [note] if note else []
    ct = modality == "CT"
    (nd, slice_axis), R["spatial_dims"], note = decide_dims(task, scans, tg)
    notes += [note] if note else []
    if nd == 2:
        spac = np.median(np.array([s["spacing"] for s in scans]), axis=0)
        R["data.slice_axis"] = (f"slices taken along axis {slice_axis}, the axis with the largest median spacing "
                                f"({spac[slice_axis]:.2g} mm): each slice is a high-resolution plane")
    sp_min, sp_max = fp["summary"]["min_spacing"], fp["summary"]["max_spacing"]
    R["data"] = (f"target spacing: native (medldm trains on native-resolution random crops, no resampling); "
                 f"spacings range {' x '.join(f'{a:.2g}-{b:.2g}' for a, b in zip(sp_min, sp_max, strict=True))} mm")

    in_plane = [s for i, s in enumerate(fp["summary"]["median_shape"]) if nd == 3 or i != slice_axis]
    cands, fitting = patch_candidates(nd, tg, in_plane, task)
    vae, unet, feats, why = decide_networks(nd, tg, fitting[0])
    factor = 2 ** (len(vae["channels"]) - 1)
    R["vae"] = (f"VAE factor {factor} ({len(vae['channels'])} levels) and widths {vae['channels']} sized for {why}; "
                f"{vae['latent_channels']} latent channels")
    R["unet"] = f"U-Net widths {unet['channels']} sized for {why}; attention on the coarser latent levels only"
    refine = task in ENHANCE_TASKS

    def mapping(p: int, batch: int) -> dict:
        return {"spatial_dims": nd, "data": {"patch_size": [p] * nd}, "vae": vae, "unet": unet,
                "refine": {"enabled": refine, "features": feats}, "batch": batch}

    calib, meas = 1.0, {}
    if measure:  # a measured step at a small size on this machine: calibrates memory, gives step times
        meas = measure_step(task, nd, vae, unet, feats, refine, tg.device, tg.cuda_here)
        pred = memory_model(mapping(meas["patch"], meas["batch"]), meas["batch"]) - 0.5 * GiB
        got = max((f.get("peak_bytes") or 0) for f in meas["stages"].values())
        if got > 0 and pred > 0:
            calib = float(min(4.0, max(0.25, got / pred)))
        meas["calibration"] = calib
    patch, batch, mem_need = decide_patch_batch(mapping, fitting, nd, tg, calib)
    min_batch, max_batch = (4, 32) if nd == 2 else (1, 8)
    R["data.patch_size"] = (f"{'x'.join([str(patch)] * nd)} crops: the largest of {cands} that is "
                            f"<= the median {'in-plane ' if nd == 2 else ''}size {in_plane} and leaves a batch of "
                            f">= {min_batch} in {tg.gpu_memory:g} GiB (a multiple of the VAE factor {factor})")
    R["data.batch_size"] = (f"memory model: {mem_need / GiB:.1f} GiB of {tg.gpu_memory:g} GiB at batch {batch} "
                            f"(weights + AdamW + activations{f', calibrated x{calib:.2f} by a measured step' if measure else ''}"
                            f"; 15 % headroom), capped at {max_batch}")

    noise = fp["summary"].get("median_noise_relative") or 0.0
    deg, why = decide_degrade(task, ct, nd, noise)
    if why:
        R["degrade"] = why
    aug, R["augment"] = decide_augment(ct)
    steps, R["vae_train"] = decide_steps(refine, tg, meas, patch, batch, nd)
    split, R["data.val"] = decide_split(fp, scans, val_fp, seed)
    if split.get("dropped"):
        notes.append("left out (duplicates): " + "; ".join(split["dropped"]))
    norm, R["data.modality"] = decide_normalization(fp, modality)
    data: dict[str, Any] = {"train": split["train"], "val": split["val"], "val_fraction": 0.0, **norm,
                            "slice_axis": slice_axis, "patch_size": [patch] * nd, "batch_size": int(batch),
                            "min_foreground": 0.05 if nd == 2 else 0.0}
    R["data.val_fraction"] = "0: the split is the explicit data.val list above (by subject), never by scan"

    cfg = {
        "stage": "both", "task": task, "spatial_dims": nd, "seed": seed, "data": data, "augment": aug,
        **({"degrade": deg} if deg else {}),
        "vae": vae, "unet": {**unet, "noise_level_cond": task in ("denoise", "sr")},
        "diffusion": {"schedule": "flow", "prediction": "flow", "sampler": "euler_flow",
                      "sampling_steps": 20 if task == "synthesis" else 8},
        "vae_train": {**_stage(steps["vae"]), "lr": 1e-4 if tg.big else 5e-4},
        "ldm_train": {**_stage(steps["ldm"]), "lr": 1e-4 if tg.big else 5e-4, "ema_decay": 0.999},
        **({"refine": {**_stage(steps["refine"]), "enabled": True, "features": feats}} if refine else {}),
        "engine": {"device": tg.device, "precision": "auto",
                   **({"num_threads": os.cpu_count() or 1} if tg.device == "cpu" else {})},
    }
    if task == "synthesis":
        cfg["unet"].pop("noise_level_cond")
    R["task"] = f"--task {task}"
    R["diffusion"] = ("rectified flow + Euler sampler: few sampling steps suffice"
                      + ("; 8 steps for the enhancement tasks (the refiner makes up the rest)" if refine else ""))
    if measure:
        for s in ("vae", "ldm", "refine") if refine else ("vae", "ldm"):
            key = "refine" if s == "refine" else f"{s}_train"
            R[key] = (R[key] + "; " if s == "vae" else "") + (
                f"{steps[s]} steps x ~{meas['step_s_estimate'][s]:.3g} s = {steps[s] * meas['step_s_estimate'][s] / 3600:.1f} h")
    R["engine"] = f"--device {tg.device}" + ("" if device in ("cpu", "cuda") else " (auto: what this machine has)")
    if refine:
        R["refine"] = "pixel-space refiner for denoise / sr / thinslice: gets past the VAE's reconstruction ceiling" + (
            "; " + R["refine"] if "refine" in R else "")
    return Plan(cfg, R, notes, meas, split)
