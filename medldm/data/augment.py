"""On-the-fly augmentation of clean training crops with MONAI transforms, seeded per step.

Geometric: flips along each spatial axis, small rotations (border padding). Intensity (applied in [0, 1] units,
NOT clamped: foreground-percentile normalization puts an MR background below 0, and the latent cache and the
refiner see un-clamped scans too): a smooth multiplicative bias field (MR coil shading) and a gamma contrast
change (MONAI's, relative to the crop's min and max).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import Compose, RandAdjustContrast, RandBiasField, RandFlip, RandRotate


class Augmenter:
    """``aug(x, rng)``: x (B, 1, *S) in the model range -> augmented copy; identity when disabled."""

    def __init__(self, cfg, spatial_dims: int):
        self.enabled = bool(cfg.enabled)
        rad = math.radians(cfg.rotate_degrees)
        rot = {"range_x": rad} if spatial_dims == 2 else {"range_x": rad, "range_y": rad, "range_z": rad}
        self.geometric = Compose(
            [RandFlip(prob=cfg.flip_prob, spatial_axis=a) for a in range(spatial_dims)]
            + [RandRotate(prob=cfg.rotate_prob, keep_size=True, padding_mode="border", **rot)]
        )
        self.intensity = Compose([
            RandBiasField(prob=cfg.bias_field_prob, coeff_range=(0.0, 0.2)),
            RandAdjustContrast(prob=cfg.contrast_prob, gamma=tuple(cfg.gamma)),
        ])

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if not self.enabled:
            return x
        out = []
        seeds = rng.integers(0, 2**31 - 1, size=(x.shape[0], 2))
        for xi, (s1, s2) in zip(x, seeds, strict=True):
            self.geometric.set_random_state(seed=int(s1))
            self.intensity.set_random_state(seed=int(s2))
            y = _plain(self.geometric(xi))
            y01 = (y + 1.0) / 2.0  # not clamped: foreground-percentile normalization puts background below 0
            y01 = _plain(self.intensity(y01))
            out.append(y01 * 2.0 - 1.0)
        return torch.stack(out).to(x.dtype).contiguous()


def _plain(x) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.float()
