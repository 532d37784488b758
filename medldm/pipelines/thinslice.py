"""Thick -> thin slices with a 2D ``thinslice`` model folder (the shipped ``mr-thinslice-4x``).

``ThinSliceEnhancer(bundle).enhance(img, opts) -> EnhanceResult``, scanner units in and out, like
:class:`medldm.pipelines.enhance.Enhancer` (same options, same handling of NaN/inf voxels and constant scans).

The model learned (SMORE-style self-similarity, :mod:`medldm.train.conditioning`) to undo what thick slicing
does along ONE axis of an in-plane slice: thick slices of ``s`` thin ones (``s`` = the model's
``degrade.scale``; box profile = their mean, or a Gaussian profile), Keys cubic interpolation back to the thin
grid. At inference:

1. the scan (X, Y, Z) must have slices ``s`` x farther apart than its (finest) in-plane pixels (10 %
   tolerance; otherwise a one-line :class:`~medldm.io.errors.CaseError`);
2. it is interpolated along Z to ``s`` x as many slices over the same extent, with the same Keys cubic
   convolution (``medldm.eval.baselines.cubic_convolution_resize``: the ``bicubic`` baseline of
   ``medldm baseline --task sr --axis through``); the output grid's affine is
   ``medldm.io.geometry.resized_affine``: output voxel ``j`` lies where thin slice ``j`` was (thick slice
   ``k``, the mean of thin slices ``s k .. s k + s - 1``, is centred on thin index ``s k + (s - 1) / 2``);
3. the 2D model (latent diffusion + refiner, through the ``Enhancer`` as a same-grid model) runs on the
   sagittal (``axis=0``) and coronal (``axis=1``) reformats, in which Z is an in-plane axis, and the two
   results are averaged. A reformat thinner than ``MIN_REFORMAT`` voxels (e.g. the one slice of a 2D scan
   stored as (X, 1, Z)), or whose other axis has pixels over ``MAX_ANISOTROPY`` x the finest in-plane pixel, is
   left out (the model saw square pixels only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from medldm.io.errors import CaseError
from medldm.io.geometry import resize_mask_nearest, resized_affine, spacing_from_affine
from medldm.models.config import DegradeConfig

#: allowed relative difference between (slice spacing / in-plane pixel) and the model's factor
SPACING_TOLERANCE = 0.10
#: reformats (sagittal: axis 0, coronal: axis 1) are used when the scan has at least this many voxels along the
#: other in-plane axis
MIN_REFORMAT = 8
#: ... and when that axis's pixel is at most this many times the finest in-plane pixel
MAX_ANISOTROPY = 1.5


def thin_shape(shape: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    """The thin grid of a thick volume (X, Y, Z): (X, Y, factor * Z)."""
    x, y, z = (int(v) for v in shape[:3])
    return x, y, z * int(factor)


def thin_affine(affine: np.ndarray, shape: tuple[int, ...], factor: int) -> np.ndarray:
    """Affine of the thin grid: same extent, voxel ``j`` at thick index ``(j + 0.5) / factor - 0.5``."""
    return resized_affine(np.asarray(affine, dtype=np.float64), tuple(shape[:3]), thin_shape(shape, factor))


def interpolate_z(vol: np.ndarray, factor: int) -> np.ndarray:
    """Keys cubic convolution (a = -0.5) along Z to ``factor`` x the slices, pixel-area alignment, borders
    replicated (float32): exactly the training degradation's interpolation and the ``bicubic`` baseline."""
    from medldm.data.resample import cubic_convolution_resize

    return np.asarray(cubic_convolution_resize(vol, thin_shape(vol.shape, factor)), dtype=np.float32)


def reformat_axes(shape: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> list[int]:
    """The reformats the model runs on: axis 0 (sagittal, slices (Y, Z)) and axis 1 (coronal, (X, Z)), each when
    the scan is at least ``MIN_REFORMAT`` voxels wide along that slice's other in-plane axis and (given the
    voxel ``spacing``) that axis's pixels are at most ``MAX_ANISOTROPY`` x the finest in-plane pixel: the model
    was trained on slices with square pixels."""
    axes = [a for a in (0, 1) if int(shape[1 - a]) >= MIN_REFORMAT]
    if spacing is not None:
        fine = min(float(spacing[0]), float(spacing[1]))
        axes = [a for a in axes if float(spacing[1 - a]) <= MAX_ANISOTROPY * fine]
    return axes or [0, 1]


class ThinSliceEnhancer:
    """A loaded ``thinslice`` model folder, ready to turn thick-slice scans into thin-slice ones."""

    task = "thinslice"

    def __init__(self, bundle, device: str = "cpu"):
        from medldm.pipelines.enhance import Enhancer

        card = bundle.card
        if card.task != "thinslice":
            raise CaseError(bundle.path, f"model task is {card.task!r}, not 'thinslice'",
                            "use medldm.pipelines.enhance.Enhancer for sr/denoise models")
        deg = card.degrade or DegradeConfig(kind="thick", scale=4, noise_aug_range=(0.0, 0.0))
        self.factor = int(deg.scale)
        self.profile = str(deg.profile)
        # the network maps a thin-grid image to a thin-grid image: the Enhancer runs it as a same-grid model
        self.inner = Enhancer(dataclasses.replace(bundle, card=dataclasses.replace(card, task="denoise")), device=device)
        if self.inner.dims != 2:
            raise CaseError(bundle.path, f"a thinslice model must be 2D, this one is {self.inner.dims}D",
                            "train it with spatial_dims: 2")
        self.dims = 2
        self.bundle = self.inner.bundle
        self.device = self.inner.device
        self.path = bundle.path
        lo = float(deg.noise_aug_range[0])
        self.level = lo / self.inner.level_max if self.inner.level_max > 0 else 0.0

    def window(self, opts) -> tuple[int, ...]:
        return self.inner.window(opts)

    def resolve(self, opts=None):
        """The options with this model's defaults filled in (``Enhancer.resolve``)."""
        return self.inner.resolve(opts)

    def check_spacing(self, img, src: str) -> float:
        """Slice spacing / in-plane pixel of ``img``; a CaseError unless it is the model's factor (10 %)."""
        sp = spacing_from_affine(np.asarray(img.affine, dtype=np.float64))
        inplane = [sp[a] for a in (0, 1) if int(img.shape[a]) > 1] or [sp[0], sp[1]]
        pix = float(min(inplane))
        ratio = sp[2] / pix if pix > 0 else float("inf")
        if not abs(ratio / self.factor - 1.0) <= SPACING_TOLERANCE:
            raise CaseError(src, f"slices are {sp[2]:.3g} mm apart, {ratio:.2f} x the in-plane pixel ({pix:.3g} mm), "
                            f"but this model makes {self.factor} x thinner slices from slices {self.factor} x "
                            "thicker than the pixels",
                            f"give a scan with {self.factor} x {pix:.3g} mm slices (or a model for this ratio)")
        return ratio

    @torch.no_grad()
    def enhance(self, img, opts=None, *, check_spacing: bool = True):
        """img: MetaTensor (X, Y, Z), thick slices, scanner units -> EnhanceResult on (X, Y, factor Z)."""
        from monai.data import MetaTensor

        from medldm.data.intensity import (
            clamp_physical,
            denormalize,
            fill_nonfinite,
            fit_normalization,
            normalize,
        )
        from medldm.pipelines.enhance import EnhanceOptions, EnhanceResult

        opts = self.resolve(opts or EnhanceOptions())
        src = (getattr(img, "meta", None) or {}).get("filename_or_obj") or "<image>"
        shape = tuple(int(s) for s in img.shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise CaseError(src, f"thick -> thin slices needs a volume (X, Y, Z), got shape {shape}",
                            "give a 3D scan")
        if shape[2] < 2:
            raise CaseError(src, "one slice: nothing to interpolate between", "give a scan with at least 2 slices")
        if check_spacing:
            self.check_spacing(img, src)
        arr = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
        bad = ~np.isfinite(arr)
        n_bad = int(bad.sum())
        if n_bad == arr.size:
            raise CaseError(src, "every voxel is NaN or infinite: nothing to enhance", "check the scan's export")
        params = opts.normalization or fit_normalization(img, self.inner.modality, window=self.inner.ct_window,
                                                         foreground=True)
        params_f = {**params, "original_dtype": "float32"}
        out_shape = thin_shape(shape, self.factor)
        affine = thin_affine(np.asarray(img.affine, dtype=np.float64), shape, self.factor)
        thin = interpolate_z(fill_nonfinite(arr, bad) if n_bad else arr, self.factor)
        finite = arr[~bad]
        meta = {k: v for k, v in dict(getattr(img, "meta", {}) or {}).items()
                if k not in ("affine", "original_affine", "spatial_shape")}
        info: dict[str, Any] = {"task": self.task, "factor": self.factor, "profile": self.profile,
                                "input_shape": list(shape), "output_shape": list(out_shape), "normalization": params,
                                "nonfinite_voxels": n_bad, "interpolation": "keys cubic (a = -0.5) along Z"}
        warnings: list[str] = []
        if opts.normalization is None and float(finite.min()) == float(finite.max()):
            fused = torch.full(out_shape, float(finite[0]), dtype=torch.float32)
            std = torch.zeros(out_shape) if opts.samples > 1 else None
            info.update(constant=True, axes=[])
            warnings.append(f"constant scan (every finite voxel is {float(finite[0]):g}): returned unchanged on the "
                            "thin grid without running the model")
        else:
            axes = reformat_axes(shape, spacing_from_affine(np.asarray(img.affine, dtype=np.float64)))
            thin_meta = {**meta, "original_dtype": "float32", "filename_or_obj": src}
            thin_img = MetaTensor(torch.from_numpy(thin), affine=torch.as_tensor(affine), meta=thin_meta)
            level = self.level if opts.noise_level is None else opts.noise_level
            runs = [self.inner.enhance(thin_img, dataclasses.replace(opts, axis=a, normalization=params_f,
                                                                     noise_level=level)) for a in axes]
            fused = torch.stack([torch.as_tensor(r.image).float() for r in runs]).mean(0)
            # K samples: the root mean square of the two reformats' std maps
            std = (torch.stack([torch.as_tensor(r.std).float() ** 2 for r in runs]).mean(0).sqrt()
                   if opts.samples > 1 and all(r.std is not None for r in runs) else None)
            first = runs[0].info
            info.update(axes=axes, steps=first.get("steps"), sampler=first.get("sampler"), samples=int(opts.samples),
                        refined=first.get("refined"), window=first.get("window"), overlap=first.get("overlap"),
                        batch_size=first.get("batch_size"))
            if opts.samples > 1:
                info["uncertainty"] = {f"axis{a}": r.info.get("uncertainty") for a, r in zip(axes, runs, strict=True)}
            for r in runs:
                for w in str(r.info.get("warning") or "").split("; "):
                    if w and w not in warnings:
                        warnings.append(w)
        # back to the input's dtype (integers rounded and clipped), as the Enhancer does
        out = torch.as_tensor(denormalize(normalize(fused, params_f), params, to_original_dtype=True)).float()
        # never below the modality's physical range (the cubic interpolation along Z overshoots too)
        out, info["floor"], info["clamped_voxels"] = clamp_physical(out, params.get("modality"), float(finite.min()))
        if n_bad:
            bad_out = torch.from_numpy(resize_mask_nearest(bad, out_shape))
            out = out.clone()
            out[bad_out] = float("nan")
            if std is not None:
                std = std.clone()
                std[bad_out] = float("nan")
            warnings.insert(0, f"{n_bad} NaN/infinite input voxel(s): left out of the intensity statistics, replaced "
                               "by their nearest finite neighbour for the model, and NaN in the output "
                               f"({int(bad_out.sum())} output voxels on the thin grid)")
        meta.update(spacing=spacing_from_affine(affine), spatial_shape=np.asarray(out_shape), original_affine=affine)
        meta["warnings"] = list(meta.get("warnings", []))
        aff = torch.as_tensor(affine)
        image = MetaTensor(out.contiguous(), affine=aff, meta=dict(meta))
        std_img = None
        if std is not None:
            std_img = MetaTensor(std.float().contiguous(), affine=aff.clone(), meta={**meta, "original_dtype": "float32"})
        if warnings:
            info["warning"] = "; ".join(warnings)
        return EnhanceResult(image=image, std=std_img, info=info)
