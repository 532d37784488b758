"""The scan wrapper shared by every enhancer (:class:`~medldm.pipelines.enhance.Enhancer`,
:class:`~medldm.pipelines.thinslice.ThinSliceEnhancer`): what happens to a scan before and after a model runs.

``open_scan(img)`` -> :class:`Scan`: the voxels as float32, the non-finite mask (NaN/inf voxels are left out of
the statistics and replaced by their nearest finite neighbour for the model: :attr:`Scan.filled`), a one-line
``CaseError`` for an empty image or one without finite voxels, and :attr:`Scan.constant`.

``to_scanner(scan, mean, std, out_shape, params)``: the model's output (model units, on the output grid) back to
scanner units and the input's dtype (the exact inverse of the normalization, ``medldm.data.intensity``), clamped
from below to the input modality's physical range (:func:`medldm.data.intensity.clamp_physical`: CT >= -1024 HU,
a scan without negative values >= 0), NaN again where the input was not finite (nearest neighbour onto a finer
output grid), rebuilt as a MetaTensor on the output grid's affine (``medldm.io.geometry.resized_affine``: same
physical extent).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medldm.data.intensity import clamp_physical, denormalize, fill_nonfinite, normalize
from medldm.io.errors import CaseError
from medldm.io.geometry import resize_mask_nearest, resized_affine, spacing_from_affine

#: a voxel is "uncertain" when the std of its K samples exceeds this fraction of the normalization range
UNCERTAIN_STD = 0.05
#: warn when more than this fraction of the foreground is uncertain
UNCERTAIN_WARN_FRACTION = 0.01


@dataclass
class Scan:
    """One scan as the enhancers see it: ``img`` (MetaTensor (X, Y, Z), scanner units), its voxels ``arr``
    (float32), the non-finite mask ``bad`` and the source name for messages."""

    img: Any
    src: str
    arr: np.ndarray
    bad: np.ndarray

    @property
    def n_bad(self) -> int:
        return int(self.bad.sum())

    @cached_property
    def finite(self) -> np.ndarray:
        return self.arr[~self.bad]

    @property
    def finite_min(self) -> float:
        return float(self.finite.min())

    @property
    def constant(self) -> bool:
        return float(self.finite.min()) == float(self.finite.max())

    @cached_property
    def filled(self) -> np.ndarray:
        """The voxels with each non-finite one replaced by its nearest finite neighbour (what the model sees)."""
        return fill_nonfinite(self.arr, self.bad) if self.n_bad else self.arr

    def model_units(self, params: dict) -> torch.Tensor:
        """:attr:`filled` normalized with ``params`` (float32 tensor on the CPU)."""
        return torch.as_tensor(normalize(self.filled, params)).float().cpu()

    def constant_model(self, params: dict, out_shape: tuple[int, ...]) -> torch.Tensor:
        """The output of a constant scan in model units: the first finite voxel's value everywhere on the grid."""
        x = normalize(self.filled.reshape(-1)[int(np.flatnonzero(~self.bad.reshape(-1))[0])][None], params)
        return torch.full(tuple(out_shape), float(np.asarray(x).reshape(-1)[0]))

    def constant_note(self, out_shape: tuple[int, ...]) -> str:
        grid = "on the finer grid " if tuple(out_shape) != tuple(self.arr.shape) else ""
        return (f"constant scan (every finite voxel is {float(self.finite[0]):g}): returned unchanged {grid}"
                "without running the model")


def open_scan(img) -> Scan:
    """``img`` (MetaTensor or array (X, Y, Z), scanner units) -> :class:`Scan`; a ``CaseError`` for an empty
    image or one whose every voxel is NaN or infinite."""
    src = (getattr(img, "meta", None) or {}).get("filename_or_obj") or "<image>"
    if any(int(s) < 1 for s in img.shape):
        raise CaseError(src, f"empty image (shape {tuple(img.shape)})", "give a scan with at least one voxel")
    arr = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if int(bad.sum()) == arr.size:
        raise CaseError(src, "every voxel is NaN or infinite: nothing to enhance", "check the scan's export")
    return Scan(img=img, src=src, arr=arr, bad=bad)


def to_scanner(scan: Scan, mean: torch.Tensor, std: torch.Tensor | None, out_shape: tuple[int, ...],
               params: dict) -> tuple[MetaTensor, torch.Tensor | None, torch.Tensor | None, dict]:
    """``mean`` (model units, ``out_shape``) -> (image: MetaTensor in scanner units and the input's dtype values,
    ``std`` with NaN where the output is NaN (still model units), the output's non-finite mask or None, info:
    ``floor``, ``clamped_voxels``, ``nonfinite_voxels`` and a ``nonfinite_warning`` when there were any)."""
    img = scan.img
    affine = np.asarray(img.affine, dtype=np.float64)
    in_shape = tuple(img.shape)
    if tuple(out_shape) != in_shape:
        affine = resized_affine(affine, in_shape, tuple(out_shape))
    out = torch.as_tensor(denormalize(mean, params, to_original_dtype=True)).float()
    # never below the modality's physical range (magnitude MR >= 0, CT >= -1024 HU)
    out, floor, n_low = clamp_physical(out, params.get("modality"), scan.finite_min)
    info: dict[str, Any] = {"floor": floor, "clamped_voxels": n_low, "nonfinite_voxels": scan.n_bad}
    bad_out = None
    if scan.n_bad:  # NaN again where the input was not finite (nearest neighbour onto a finer output grid)
        bad_out = torch.from_numpy(resize_mask_nearest(scan.bad, tuple(out_shape)))
        out = out.clone()
        out[bad_out] = float("nan")
        if std is not None:
            std = std.clone()
            std[bad_out] = float("nan")
        finer = (f" ({int(bad_out.sum())} output voxels on the finer grid)"
                 if bad_out.numel() != scan.bad.size else "")
        info["nonfinite_warning"] = (
            f"{scan.n_bad} NaN/infinite input voxel(s): left out of the intensity statistics and the noise "
            f"estimate, replaced by their nearest finite neighbour for the model, and NaN in the output{finer}")
    meta = {k: v for k, v in dict(getattr(img, "meta", {}) or {}).items()
            if k not in ("affine", "original_affine", "spatial_shape")}
    meta.update(spacing=spacing_from_affine(affine), spatial_shape=np.asarray(out_shape), original_affine=affine)
    meta["warnings"] = list(meta.get("warnings", []))
    image = MetaTensor(out.contiguous(), affine=torch.as_tensor(affine), meta=dict(meta))
    return image, std, bad_out, info


def std_image(image: MetaTensor, std_scanner: torch.Tensor) -> MetaTensor:
    """A per-voxel std map (scanner units) on ``image``'s grid, as float32."""
    meta = {**dict(image.meta), "original_dtype": "float32"}
    meta.pop("affine", None)
    return MetaTensor(std_scanner.float().contiguous(), affine=torch.as_tensor(image.affine).clone(), meta=meta)


def uncertainty(mean: torch.Tensor, std: torch.Tensor, unit: float, bad_out: torch.Tensor | None) -> tuple[dict, str]:
    """Summary of the K samples' std (model units) over the foreground of ``mean`` and a warning ('' if none);
    ``unit``: scanner units per model unit."""
    fg = mean > (mean.min() + 0.05 * (mean.max() - mean.min()))
    if bad_out is not None:
        fg &= ~bad_out
    frac = float((std[fg] > UNCERTAIN_STD * 2.0).float().mean()) if bool(fg.any()) else 0.0
    summary = {
        "std_mean": float(std[fg].mean() * unit) if bool(fg.any()) else 0.0,
        "std_p99": float(torch.quantile(std[fg].flatten()[:1_000_000].float(), 0.99) * unit) if bool(fg.any()) else 0.0,
        "high_fraction": frac,
        "threshold": UNCERTAIN_STD * 2.0 * unit,
    }
    warn = ""
    if frac > UNCERTAIN_WARN_FRACTION:
        warn = (f"{100 * frac:.1f}% of the foreground has sample std > {UNCERTAIN_STD * 2.0 * unit:.3g} "
                "(scanner units): detail there may be invented — check the std map")
    return summary, warn


def unit_of(params: dict) -> float:
    """Scanner units per model unit of a normalization record."""
    return (float(params["hi"]) - float(params["lo"])) / (float(params["out_range"][1]) - float(params["out_range"][0]))
