"""Thick -> thin slices with a 2D ``thinslice`` model folder (the shipped ``mr-thinslice-4x``).

``ThinSliceEnhancer(bundle).enhance(img, opts) -> EnhanceResult``, scanner units in and out, like
:class:`medldm.pipelines.enhance.Enhancer`: same options, the same scan wrapper (:mod:`medldm.pipelines.scan`:
NaN/inf voxels, constant scans, normalization and its inverse, the physical-range clamp, MetaTensor) and the same
latent sampling step (:class:`medldm.pipelines.enhance.LatentSampler`), run on the condition made by
:func:`medldm.data.condition.scan_condition`, the module the training pairs come from.

The model learned (SMORE-style self-similarity, :mod:`medldm.data.condition`) to undo what thick slicing
does along ONE axis of an in-plane slice: thick slices of ``s`` thin ones (``s`` = the model's
``degrade.scale``; box profile = their mean, or a Gaussian profile), Keys cubic interpolation back to the thin
grid. At inference:

1. the scan (X, Y, Z) must have slices ``s`` x farther apart than its (finest) in-plane pixels (10 %
   tolerance; otherwise a one-line :class:`~medldm.io.errors.CaseError`);
2. it is interpolated along Z to ``s`` x as many slices over the same extent, with the same Keys cubic
   convolution (``medldm.data.condition.interpolate_z``; the ``bicubic`` baseline of
   ``medldm baseline --task sr --axis through``); the output grid's affine is
   ``medldm.io.geometry.resized_affine``: output voxel ``j`` lies where thin slice ``j`` was (thick slice
   ``k``, the mean of thin slices ``s k .. s k + s - 1``, is centred on thin index ``s k + (s - 1) / 2``);
3. the 2D model (latent diffusion + refiner: ``LatentSampler.sample_condition``) runs on the
   sagittal (``axis=0``) and coronal (``axis=1``) reformats, in which Z is an in-plane axis, and the two
   results are averaged. A reformat thinner than ``MIN_REFORMAT`` voxels (e.g. the one slice of a 2D scan
   stored as (X, 1, Z)), or whose other axis has pixels over ``MAX_ANISOTROPY`` x the finest in-plane pixel, is
   left out (the model saw square pixels only). Each reformat's result goes back to scanner units (float32) and
   is clamped to the physical range before the two are averaged (as since the model shipped), then the mean goes
   through the scan wrapper (input dtype, clamp, NaN, MetaTensor).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from medldm.data.condition import interpolate_z, scan_condition, thin_shape
from medldm.data.intensity import clamp_physical, denormalize, fit_normalization, normalize
from medldm.io.errors import CaseError
from medldm.io.geometry import resized_affine, spacing_from_affine
from medldm.pipelines.enhance import EnhanceOptions, EnhanceResult, LatentSampler
from medldm.pipelines.scan import open_scan, std_image, to_scanner, uncertainty, unit_of

__all__ = ["ThinSliceEnhancer", "interpolate_z", "reformat_axes", "thin_affine", "thin_shape"]

#: allowed relative difference between (slice spacing / in-plane pixel) and the model's factor
SPACING_TOLERANCE = 0.10
#: reformats (sagittal: axis 0, coronal: axis 1) are used when the scan has at least this many voxels along the
#: other in-plane axis
MIN_REFORMAT = 8
#: ... and when that axis's pixel is at most this many times the finest in-plane pixel
MAX_ANISOTROPY = 1.5


def thin_affine(affine: np.ndarray, shape: tuple[int, ...], factor: int) -> np.ndarray:
    """Affine of the thin grid: same extent, voxel ``j`` at thick index ``(j + 0.5) / factor - 0.5``."""
    return resized_affine(np.asarray(affine, dtype=np.float64), tuple(shape[:3]), thin_shape(shape, factor))


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


class ThinSliceEnhancer(LatentSampler):
    """A loaded ``thinslice`` model folder, ready to turn thick-slice scans into thin-slice ones."""

    tasks = ("thinslice",)

    def __init__(self, bundle, device: str = "cpu"):
        super().__init__(bundle, device=device)
        if self.dims != 2:
            raise CaseError(bundle.path, f"a thinslice model must be 2D, this one is {self.dims}D",
                            "train it with spatial_dims: 2")
        self.factor = int(self.degrade.scale)
        self.profile = str(self.degrade.profile)
        self.path = bundle.path
        lo = float(self.degrade.noise_aug_range[0])
        self.level = lo / self.level_max if self.level_max > 0 else 0.0

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
    def enhance(self, img, opts: EnhanceOptions | None = None, *, check_spacing: bool = True) -> EnhanceResult:
        """img: MetaTensor (X, Y, Z), thick slices, scanner units -> EnhanceResult on (X, Y, factor Z)."""
        opts = self.resolve(opts)
        src = (getattr(img, "meta", None) or {}).get("filename_or_obj") or "<image>"
        shape = tuple(int(s) for s in img.shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise CaseError(src, f"thick -> thin slices needs a volume (X, Y, Z), got shape {shape}",
                            "give a 3D scan")
        if shape[2] < 2:
            raise CaseError(src, "one slice: nothing to interpolate between", "give a scan with at least 2 slices")
        if check_spacing:
            self.check_spacing(img, src)
        scan = open_scan(img)
        params = opts.normalization or fit_normalization(img, self.modality, window=self.ct_window, foreground=True)
        out_shape = thin_shape(shape, self.factor)
        info: dict[str, Any] = {"task": self.task, "factor": self.factor, "profile": self.profile,
                                "input_shape": list(shape), "output_shape": list(out_shape), "normalization": params,
                                "interpolation": "keys cubic (a = -0.5) along Z"}
        warnings: list[str] = []
        std = None
        if opts.normalization is None and scan.constant:
            fused = scan.constant_model(params, out_shape)
            std = torch.zeros(out_shape) if opts.samples > 1 else None
            info.update(constant=True, axes=[])
            warnings.append(scan.constant_note(out_shape).replace("on the finer grid", "on the thin grid"))
        else:
            fused, std = self._fuse_reformats(scan, params, opts, info, warnings)
        image, std, _, wrap = to_scanner(scan, fused, std, out_shape, params)
        info.update(floor=wrap["floor"], clamped_voxels=wrap["clamped_voxels"], nonfinite_voxels=scan.n_bad)
        if scan.n_bad:
            warnings.insert(0, wrap["nonfinite_warning"].replace(" and the noise estimate", "")
                            .replace("on the finer grid", "on the thin grid"))
        std_img = None if std is None else std_image(image, std)
        if warnings:
            info["warning"] = "; ".join(warnings)
        return EnhanceResult(image=image, std=std_img, info=info)

    def _fuse_reformats(self, scan, params: dict, opts: EnhanceOptions, info: dict, warnings: list[str]):
        """The model on each reformat of the Z-interpolated scan -> (mean in model units, std in scanner units or
        None): each reformat's mean back to scanner units (float32) and clamped, averaged, then to model units."""
        params_f = {**params, "original_dtype": "float32"}
        thin, out_shape = scan_condition(scan.filled, self.task, self.degrade)
        thin_np = thin.numpy()
        x = torch.as_tensor(normalize(thin_np, params_f)).float().cpu()
        thin_min = float(thin_np.min())
        axes = reformat_axes(tuple(scan.arr.shape), spacing_from_affine(np.asarray(scan.img.affine, dtype=np.float64)))
        level = self.level if opts.noise_level is None else opts.noise_level
        run_opts = dataclasses.replace(opts, normalization=params_f, noise_level=level)
        level = self._level(run_opts)
        unit = unit_of(params_f)
        means, stds, unc = [], [], {}
        domain = self._domain_warning(params_f)
        if domain and domain not in warnings:
            warnings.append(domain)
        for a in axes:
            mean, std = self.sample_condition(x, a, level, dataclasses.replace(run_opts, axis=a))
            out = torch.as_tensor(denormalize(mean, params_f, to_original_dtype=True)).float()
            means.append(clamp_physical(out, params_f.get("modality"), thin_min)[0])
            if opts.samples > 1:
                stds.append(std * unit)
                unc[f"axis{a}"], warn = uncertainty(mean, std, unit, None)
                if warn and warn not in warnings:
                    warnings.append(warn)
        fused = torch.as_tensor(normalize(torch.stack(means).mean(0), params_f))
        # K samples: the root mean square of the reformats' std maps
        std = torch.stack([s.float() ** 2 for s in stds]).mean(0).sqrt() if stds else None
        info.update(axes=axes, steps=opts.steps, sampler=opts.sampler,
                    samples=int(opts.samples), refined=self.refiner is not None and opts.refine,
                    window=list(opts.window), overlap=opts.overlap, batch_size=int(opts.batch_size))
        if opts.samples > 1:
            info["uncertainty"] = unc
        assert tuple(fused.shape) == tuple(out_shape)
        return fused, std

    def _level(self, opts: EnhanceOptions) -> float | None:
        """The U-Net's noise-level input: the training's lowest noise augmentation (or ``opts.noise_level``)."""
        if not self.denoiser.noise_level_cond:
            return None
        return float(min(max(opts.noise_level, 0.0), 1.0))
