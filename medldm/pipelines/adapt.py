"""``medldm enhance --adapt SECONDS``: fine-tune a model's pixel-space refiner on the scan being enhanced.

The training scans cannot cover what users bring; the scan itself is the one large, perfectly matched dataset
every user has. Before enhancing, the refiner (a copy: the model folder is never changed and the adapted weights
never leave the run) is fine-tuned for a bounded time on pairs made from the scan alone:

* **denoise** — Recorrupted-to-Recorrupted (Pang et al., CVPR 2021): with the scan's estimated noise sigma
  (the level the U-Net is given) and a seeded Gaussian ``z``, the network sees ``y + alpha sigma z`` (its
  diffusion output, its neighbouring slices for 2.5D refiners, its noise level) and is trained towards
  ``y - sigma z / alpha`` with a squared error. For Gaussian noise the two noises are uncorrelated, so the
  minimiser is the clean image: no clean data needed. Magnitude (Rician) scans are not Gaussian near zero; there
  the voxels whose recorrupted value is within 3 sigma of the scan's zero are left out of the loss (the Gaussian
  approximation holds above that SNR; below it the pretrained behaviour is kept).
* **sr** — pairs from the scan down-sampled further (SMORE-style): the scan at its own resolution is the target,
  its down-and-up-sampled copy made by the training pairs' own function (``medldm.data.condition.make_pair``)
  the input.

The diffusion output of the pair's input is drawn once (one extra sampling pass over the scan), then the refiner
trains on random patches of it, seeded, until ``seconds`` (or ``steps``) are spent. What it did is returned for
the run report (``info["adapt"]``). thinslice models are not adapted (their refiner is the 2D one of the reformatted
planes; not built).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from medldm.data.condition import make_pair, neighbour_slices
from medldm.data.intensity import magnitude_scan
from medldm.models.refiner import apply_refiner

#: R2R's recorruption strength (Pang et al. use 0.5: the network sees the noise sigma sqrt(1 + alpha^2))
ALPHA = 0.5
#: side of the square training patches (at most; smaller images use what they have, a multiple of 16)
PATCH = 64
BATCH = 8
LR = 1e-5
#: the refiner's parameters that adaptation trains (name prefixes; "" = all)
TRAINED: tuple[str, ...] = ("",)
#: the refiner (MONAI BasicUNet, 4 poolings) needs sides that are multiples of this
MIN_SIDE = 16


def adapt_refiner(sampler, x: torch.Tensor, axis: int, level: float | None, opts, params: dict,
                  seconds: float, steps: int | None = None) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """A copy of ``sampler.refiner`` fine-tuned on scan ``x`` (X, Y, Z, model units, slices along ``axis``).

    ``level``: the U-Net's noise level for this scan (denoise), ``params`` its normalization, ``opts`` the
    resolved ``EnhanceOptions`` (seed, steps, sampler). Stops after ``seconds`` or ``steps`` optimizer steps,
    whichever comes first. Returns (refiner or None when the scan cannot be adapted to, info for the report)."""
    info: dict[str, Any] = {"seconds_budget": float(seconds), "task": sampler.task}
    if sampler.refiner is None or sampler.task not in ("denoise", "sr") or sampler.dims != 2:
        return None, {**info, "skipped": "only 2D sr / denoise models with a refiner are adapted"}
    vol = torch.movedim(x, axis, 0).float()  # (n, H, W)
    side = [min(PATCH, s) // MIN_SIDE * MIN_SIDE for s in vol.shape[1:]]
    if min(side) < MIN_SIDE:
        return None, {**info, "skipped": f"slices of {list(vol.shape[1:])} are smaller than {MIN_SIDE} pixels"}
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(opts.seed) + 4242)
    pair = _denoise_pair if sampler.task == "denoise" else _sr_pair
    inp, target, mask, lev_in, note = pair(sampler, vol, level, params, gen)
    prior = dataclasses.replace(opts, refine=False, samples=1)
    decoded = torch.movedim(sampler.sample_condition(torch.movedim(inp, 0, axis), axis, lev_in, prior)[0], axis, 0)
    info["pair_seconds"] = round(time.perf_counter() - t0, 2)
    net = copy.deepcopy(sampler.refiner).float().train().requires_grad_(False)
    trained = [p for name, p in net.named_parameters() if name.startswith(TRAINED)]
    for p in trained:
        p.requires_grad_(True)
    optim = torch.optim.Adam(trained, lr=LR)
    rng = np.random.default_rng([int(opts.seed), 4243])
    k = sampler.refiner_context
    noise_in = lev_in if sampler.refiner_noise_map else None
    losses, done = [], 0
    deadline = t0 + float(seconds)  # seconds <= 0 with a step budget: no time limit
    while (steps is None or done < steps) and (
            (steps is not None and seconds <= 0) or time.perf_counter() < deadline):
        idx = torch.as_tensor(rng.integers(0, vol.shape[0], size=BATCH))
        corners = [(int(rng.integers(0, vol.shape[1] - side[0] + 1)), int(rng.integers(0, vol.shape[2] - side[1] + 1)))
                   for _ in range(BATCH)]
        stack = torch.cat([decoded[idx][:, None], inp[idx][:, None], neighbour_slices(inp, idx, k),
                           target[idx][:, None], mask[idx][:, None]], dim=1)
        stack = torch.stack([_flip(s[:, a:a + side[0], b:b + side[1]], rng) for s, (a, b) in zip(stack, corners, strict=True)])
        stack = stack.to(sampler.device)
        d, y, ctx, t, w = stack[:, :1], stack[:, 1:2], stack[:, 2:2 + 2 * k], stack[:, -2:-1], stack[:, -1:]
        with torch.enable_grad():  # enhancing runs under no_grad
            out = apply_refiner(net, d, y, sampler.refiner_base, noise_in, ctx).float()
            loss = ((out - t) ** 2 * w).sum() / w.sum().clamp_min(1.0)
            optim.zero_grad(set_to_none=True)
            loss.backward()
        optim.step()
        losses.append(float(loss))
        done += 1
    info.update({"steps": done, "seconds": round(time.perf_counter() - t0, 2), "method": note,
                 "loss_first": _mean(losses[:10]), "loss_last": _mean(losses[-10:]), "seed": int(opts.seed),
                 "lr": LR, "batch": BATCH, "patch": side})
    return net.eval().requires_grad_(False), info


def _denoise_pair(sampler, vol: torch.Tensor, level: float | None, params: dict, gen: torch.Generator):
    """R2R: (input y + alpha sigma z, target y - sigma z / alpha, loss mask, the input's noise level, method)."""
    if level is None:
        raise ValueError("adaptation of a denoiser needs its noise level (a model with unet.noise_level_cond)")
    sigma = float(level) * 2.0 * float(sampler.level_max)  # model units (range width 2)
    z = torch.randn(vol.shape, generator=gen)
    inp, target = vol + ALPHA * sigma * z, vol - sigma * z / ALPHA
    lev_in = min(float(level) * math.sqrt(1.0 + ALPHA**2), 1.0)
    mask = torch.ones_like(vol)
    method = f"R2R (alpha {ALPHA}, sigma {sigma / 2:.4f} of the range)"
    if magnitude_scan(params):
        zero = -float(params["lo"]) / max(float(params["hi"]) - float(params["lo"]), 1e-12) * 2.0 - 1.0
        mask = (inp - zero > 3.0 * sigma * math.sqrt(1.0 + ALPHA**2)).float()
        method += "; magnitude scan: voxels within 3 sigma of zero left out of the loss"
    return inp, target, mask, lev_in, method


def _sr_pair(sampler, vol: torch.Tensor, level: float | None, params: dict, gen: torch.Generator):
    """The scan as the target, its further down-sampled copy (the training pairs' degradation) as the input."""
    lo = float(sampler.degrade.noise_aug_range[0])
    low, _ = make_pair(vol[:, None], "sr", sampler.degrade, gen, lo)
    return low[:, 0], vol, torch.ones_like(vol), level, f"self-pairs: the scan down-sampled x{sampler.degrade.scale}"


def _flip(patch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One of the 8 flips / transposes of a (C, h, w) patch (all channels alike; square patches only transpose)."""
    if rng.random() < 0.5:
        patch = patch.flip(-1)
    if rng.random() < 0.5:
        patch = patch.flip(-2)
    if patch.shape[-1] == patch.shape[-2] and rng.random() < 0.5:
        patch = patch.transpose(-1, -2)
    return patch.contiguous()


def _mean(v: list[float]) -> float | None:
    return round(float(np.mean(v)), 6) if v else None
