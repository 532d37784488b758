"""Enhancement (denoising, super-resolution) of one scan with a trained model folder.

``Enhancer(bundle).enhance(img, opts) -> EnhanceResult``: scanner units in, scanner units out.

1. intensities -> model range [-1, 1] with the training recipe (``medldm.data.intensity``: CT window /
   foreground percentiles), recorded so the output goes back to the same units and dtype;
2. the condition image on the output grid, made by the function that makes the training pairs' condition
   (``medldm.data.condition.scan_condition``): the scan itself (denoise) or the scan interpolated to the
   high-resolution grid (sr: bilinear or, for models trained with ``degrade.upsample: cubic``, bicubic
   in-plane; slice replication for ``thick``), space-to-depth onto the latent grid as in training; the noise level (denoise: estimated from
   the scan with the wavelet MAD estimator of ``medldm.data.noise`` unless given; sr: the training's lowest noise-augmentation level);
3. 2D models: slices along an axis, in batches; 3D models: the whole volume; both with the denoiser run on
   overlapping latent windows (default ``Enhancer.default_window``: twice the training patch) blended at every
   step, and tiled decoding (``medldm.pipelines.tiling``); K samples -> posterior mean and per-voxel std
   (``sample_many``);
4. decode, crop, back to scanner units; SR output grid from ``medldm.io.geometry.resized_affine``
   (physical extent kept).

The scan handling before and after the model (steps 1 and 4, non-finite voxels, constant scans, the physical
range clamp, the MetaTensor) is :mod:`medldm.pipelines.scan`, shared with the thin-slice enhancer, which builds
on this module's latent sampling step (:class:`LatentSampler`).

Bad input (docs/limits.md): NaN/inf voxels are left out of the normalization and the noise estimate, replaced by
their nearest finite neighbour for the model, and NaN again in the output (nearest neighbour onto an SR grid),
counted in ``info["nonfinite_voxels"]`` and the warning; an image without finite voxels is a ``CaseError``; a
constant scan is returned unchanged (with a warning) without running the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medldm.data.condition import neighbour_slices, scan_condition
from medldm.data.intensity import fit_normalization, magnitude_scan
from medldm.data.noise import estimate_noise_sigma, rayleigh_background_sigma
from medldm.diffusion import make_model_fn, make_schedule, sample, sample_many
from medldm.io.errors import CaseError
from medldm.models.conditioning import space_to_depth as s2d
from medldm.models.config import DegradeConfig
from medldm.models.refiner import apply_refiner
from medldm.pipelines.adapt import adapt_refiner
from medldm.pipelines.scan import (
    UNCERTAIN_STD,
    UNCERTAIN_WARN_FRACTION,
    Scan,
    open_scan,
    std_image,
    to_scanner,
)
from medldm.pipelines.scan import uncertainty as _uncertainty
from medldm.pipelines.scan import unit_of as _unit_of
from medldm.pipelines.tiling import tiled_call, tiled_decode

__all__ = ["UNCERTAIN_STD", "UNCERTAIN_WARN_FRACTION", "EnhanceOptions", "EnhanceResult", "Enhancer", "LatentSampler"]
#: estimated noise level / the model's largest training level above which the result carries a warning
LEVEL_WARN = 1.1
#: smallest padded image size for a model folder with a refiner (2**4: BasicUNet's four poolings)
REFINER_MIN_SIZE = 16


@dataclass
class EnhanceOptions:
    """How to run a model on one scan (defaults from the model folder where None)."""

    steps: int | None = None
    sampler: str | None = None
    samples: int = 1
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    noise_level: float | None = None  # denoise: conditioning level in [0, 1] (default: estimated)
    axis: int | None = None  # 2D models: array axis to slice along (default: the training axis)
    # latent window of the tiled denoiser/decoder, 2D and 3D alike (default: the model's, ``Enhancer.default_window``
    # = 2 x the training patch / f: the networks' normalization layers saw training-sized images)
    window: tuple[int, ...] | None = None
    overlap: float = 0.5  # of neighbouring denoiser windows (VAE decoder and refiner: 0.25)
    normalization: dict | None = None  # fixed intensity params (e.g. shared by the chunks of one volume)
    noise_offset: int = 0  # index of the first slice (2D) / latent slice along Z (3D) of this chunk
    refine: bool = True  # apply the model folder's pixel-space refiner (stage 3) when it has one
    # fine-tune a copy of the refiner on this scan for this many seconds first (``medldm.pipelines.adapt``; 0 = off);
    # ``adapt_steps`` stops it after that many optimizer steps instead (repeatable on any machine)
    adapt: float = 0.0
    adapt_steps: int | None = None


@dataclass
class EnhanceResult:
    image: Any  # MetaTensor (X', Y', Z') float32 holding values of the original dtype, scanner units
    std: Any | None  # MetaTensor, per-voxel std of the K samples in scanner units (None when K = 1)
    info: dict = field(default_factory=dict)


class LatentSampler:
    """A loaded image-conditioned model folder (sr, denoise, thinslice): the latent sampling step, condition image
    (model units) -> posterior mean and std of K decoded (and refined) samples. The enhancers wrap it."""

    #: the model-folder tasks this class runs
    tasks: tuple[str, ...] = ("sr", "denoise", "thinslice")

    def __init__(self, bundle, device: str = "cpu"):
        card = bundle.card  # the folder's validated contract (medldm.models.card.ModelCard)
        self.card = card
        self.task = card.task
        if self.task not in self.tasks:
            raise CaseError(bundle.path, f"model task is {self.task!r}, not {' or '.join(map(repr, self.tasks))}",
                            "use `medldm synthesize` for synthesis models" if self.task == "synthesis"
                            else "open it with medldm.pipelines.factory.make_enhancer")
        if bundle.vae is None or bundle.denoiser is None:
            raise CaseError(bundle.path, "model folder lacks the VAE or the denoiser", "export the ldm stage's model folder")
        if card.condition != "space_to_depth":
            raise CaseError(bundle.path, f"unknown condition kind {card.condition!r}", "update medldm")
        self.device = torch.device(device)
        self.bundle = bundle.to(self.device)
        self.vae, self.denoiser = bundle.vae, bundle.denoiser
        self.schedule = make_schedule(bundle.diffusion)
        self.dcfg = bundle.diffusion
        self.scale = card.scale_factor
        self.dims = int(self.denoiser.spatial_dims)
        self.f = card.factor
        self.degrade = card.degrade or DegradeConfig()
        self.level_max = card.noise_level_max
        self.modality = card.normalization.forced_modality
        self.ct_window = card.normalization.ct_window
        # how the training scans were normalized (CT window / MR percentiles): a scan normalized otherwise is
        # outside the model's training domain (e.g. CT given to an MR model)
        self.trained_methods = card.normalization.trained_methods
        self.slice_axis = card.slice_axis
        self.refiner = bundle.refiner  # checked and loaded with the model folder, on self.device with the bundle
        self.refiner_base = bundle.refiner_base
        # refiners trained with a noise map get the U-Net's (estimated) noise level as a third input
        self.refiner_noise_map = bundle.refiner is not None and bundle.refiner_spec.noise_map
        # the ablation trained without the diffusion channel sees the degraded input in its place
        self.refiner_uses_diffusion = bundle.refiner is None or bundle.refiner_spec.uses_diffusion
        # 2.5D refiners see this many neighbouring slices on each side (0: the slice alone)
        self.refiner_context = 0 if bundle.refiner is None else int(bundle.refiner_spec.context)
        self.unet_down = 2 ** (len(self.denoiser.cfg.channels) - 1)  # latent sizes must be multiples of this
        self.align = self.f * self.unet_down  # image sizes are padded to multiples of this
        # ... and to at least this: the refiner (MONAI BasicUNet) pools 4 times, so a 1-pixel-wide image padded
        # to `align` only would be too small for it
        self.min_size = max(self.align, REFINER_MIN_SIZE if self.refiner is not None else 0)
        self.resize_to = card.resize_to
        patch = card.patch_size or [64] * self.dims
        self.default_window = tuple(_ceil(max(2 * int(p) // self.f, 8), self.unet_down) for p in patch)

    def _sample_items(self, cond_items: torch.Tensor, keys: list[int], level: float | None, opts: EnhanceOptions,
                      context: torch.Tensor | None = None):
        """cond_items (B, 1, *S) padded to multiples of f -> (mean, std) of K decoded samples (B, 1, *S).
        ``context`` (B, 2 k, *S): the neighbouring slices a 2.5D refiner sees (``RefinerSpec.context``).

        Start noise is seeded per (seed, sample, slice index), so results do not depend on the batch size
        or on how a volume is cut into chunks."""
        cond = space_to_depth(cond_items, self.f).to(self.device)
        lat_shape = (self.vae_latent_channels(), *(s // self.f for s in cond_items.shape[2:]))
        steps, name, window = opts.steps, opts.sampler, opts.window  # resolved (LatentSampler.resolve)

        def model_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            def call(xw, cw):
                fn = make_model_fn(self.denoiser, self.schedule, cond=cw, noise_level=level)
                with self._autocast():
                    return fn(xw, t.reshape(-1)[:1]).float()

            return tiled_call(call, xt, cond, window, opts.overlap, sw_batch_size=max(opts.batch_size, 1))

        refine = functools.partial(self._refine, level=level)
        img_window = None if window is None else tuple(w * self.f for w in window)
        # what the refiner sees of the degraded scan: the slice, then its neighbouring slices (2.5D)
        seen = cond_items if context is None else torch.cat([cond_items, context], dim=1)
        if self.refiner is not None and opts.refine and not self.refiner_uses_diffusion:
            # a refiner trained without the diffusion channel never sees a sample: nothing to draw or decode; it
            # gets the degraded input in the diffusion output's place (its training inputs)
            with self._autocast():
                out = tiled_call(refine, cond_items.to(self.device), seen.to(self.device), img_window, 0.25)
            return out.float().cpu(), torch.zeros(out.shape)

        def draw(i: int) -> torch.Tensor:
            if self.dims == 2:
                noise = torch.stack([_noise(lat_shape, opts.seed, i, k) for k in keys])
            else:  # one seed per latent Z slice: a chunk starting at noise_offset sees the volume's noise
                zs = [_noise(lat_shape[:-1], opts.seed, i, opts.noise_offset + k) for k in range(lat_shape[-1])]
                noise = torch.stack(zs, dim=-1)[None]
            noise = noise.to(self.device)
            gen = torch.Generator().manual_seed(_seed(opts.seed, i, keys[0], 1))
            z = sample(name, model_fn, noise, self.schedule, steps, generator=gen)
            with self._autocast():
                img = tiled_decode(self.vae.decode, z / self.scale, window).float()
                if self.refiner is not None and opts.refine:
                    img = tiled_call(refine, img, seen.to(self.device), img_window, 0.25).float()
            return img.cpu()

        return sample_many(max(int(opts.samples), 1), draw)

    def _refine(self, decoded: torch.Tensor, seen: torch.Tensor | None, level: float | None = None) -> torch.Tensor:
        """The refiner on a window: ``seen`` (N, 1 + 2 k, *S) is the degraded slice and its neighbours."""
        assert seen is not None and self.refiner is not None
        lev = (0.0 if level is None else level) if self.refiner_noise_map else None
        return apply_refiner(self.refiner, decoded, seen[:, :1], self.refiner_base, lev, seen[:, 1:])

    def resolve(self, opts: EnhanceOptions | None = None) -> EnhanceOptions:
        """``opts`` with the model's defaults filled in (steps, sampler: ``DiffusionConfig.sampling_options``,
        which also checks them; the latent window) — the one place options meet the model. What ``enhance`` runs
        with and what a resume record stores. Idempotent; ``ValueError`` naming the option."""
        opts = opts or EnhanceOptions()
        steps, sampler = self.dcfg.sampling_options(opts.steps, opts.sampler)
        return dataclasses.replace(opts, steps=steps, sampler=sampler, window=self.window(opts))

    def window(self, opts: EnhanceOptions) -> tuple[int, ...]:
        """The latent window used with ``opts``: ``opts.window`` or the model's default, rounded up to what the
        denoiser's down-sampling needs."""
        return tuple(_ceil(int(w), self.unet_down) for w in (opts.window or self.default_window))

    def vae_latent_channels(self) -> int:
        return int(self.denoiser.latent_channels)

    def sample_condition(self, cond_img: torch.Tensor, axis: int, level: float | None, opts: EnhanceOptions):
        """The latent sampling step: condition (X', Y', Z') in model units on the output grid -> (mean, std) of
        the K decoded samples, same shape (2D models: slices along ``axis``, in batches; 3D: the volume)."""
        if self.dims == 2:
            return self._run_2d(cond_img, axis, level, opts)
        return self._run_3d(cond_img, level, opts)

    def _run_2d(self, cond_img: torch.Tensor, axis: int, level, opts: EnhanceOptions):
        vol = torch.movedim(cond_img, axis, 0)  # (n, H, W)
        n, h, w = vol.shape
        ph, pw = (max(_ceil(v, self.align), self.min_size) for v in (h, w))
        means, stds = [], []
        for start in range(0, n, max(opts.batch_size, 1)):
            items = vol[start : start + opts.batch_size][:, None]
            items = _pad_to(items, (ph, pw))
            context = None
            if self.refiner_context and opts.refine:  # 2.5D refiner: the slices' neighbours in this volume
                index = torch.arange(start, start + items.shape[0])
                context = _pad_to(neighbour_slices(vol, index, self.refiner_context), (ph, pw))
            keys = list(range(opts.noise_offset + start, opts.noise_offset + start + items.shape[0]))
            m, s = self._sample_items(items, keys, level, opts, context)
            means.append(m[:, 0, :h, :w])
            stds.append(s[:, 0, :h, :w])
        return torch.movedim(torch.cat(means), 0, axis), torch.movedim(torch.cat(stds), 0, axis)

    def _run_3d(self, cond_img: torch.Tensor, level, opts: EnhanceOptions):
        shape = cond_img.shape
        items = _pad_to(cond_img[None, None], tuple(max(_ceil(s, self.align), self.min_size) for s in shape))
        m, s = self._sample_items(items, [0], level, opts)
        sl = (0, 0, *(slice(0, v) for v in shape))
        return m[sl], s[sl]

    def _domain_warning(self, params: dict) -> str:
        """A warning when ``params`` (this scan's normalization) is of a kind the training scans never had."""
        if not self.trained_methods or params.get("method") in self.trained_methods:
            return ""
        kinds = {"window": "CT (HU window)", "percentile": "non-CT (percentile-normalized, e.g. MR)"}
        return (f"this scan ({params.get('modality', 'unknown')}) is {kinds.get(params['method'], params['method'])}, "
                f"but the model was trained only on {', '.join(kinds.get(m, m) for m in sorted(self.trained_methods))} "
                "scans: outside its training domain, the result is unreliable")

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


class Enhancer(LatentSampler):
    """A loaded sr/denoise model folder, ready to enhance scans."""

    tasks = ("sr", "denoise")

    @torch.no_grad()
    def enhance(self, img, opts: EnhanceOptions | None = None) -> EnhanceResult:
        """img: MetaTensor (X, Y, Z) in scanner units -> EnhanceResult on the output grid."""
        opts = self.resolve(opts)
        scan = open_scan(img)
        params = opts.normalization or self._fit_normalization(img, scan.arr, scan.bad)
        x = scan.model_units(params)
        axis = self.slice_axis if opts.axis is None else int(opts.axis)
        cond_img, out_shape = scan_condition(x, self.task, self.degrade, axis=axis, dims=self.dims, seed=opts.seed)
        # constant scan: nothing to denoise, no detail to add (a chunk of a larger volume, with the volume's
        # fixed normalization, still runs the model: chunking must not change results)
        if opts.normalization is None and scan.constant:
            res = self._result(scan, params, scan.constant_model(params, out_shape), torch.zeros(out_shape),
                               out_shape, None, opts)
            res.info["constant"] = True
            res.info["warning"] = "; ".join(w for w in (scan.constant_note(out_shape), res.info.get("warning")) if w)
            return res
        ratio = self._noise_level(x, axis, opts, scan.bad, scan.arr, params)
        level = None if ratio is None else min(ratio, 1.0)
        net, adapted = None, None
        if opts.refine and (opts.adapt > 0 or opts.adapt_steps):
            net, adapted = adapt_refiner(self, x, axis, level, opts, params, opts.adapt, opts.adapt_steps)
        kept = self.refiner
        self.refiner = kept if net is None else net  # the adapted copy for this scan only: the folder's refiner is back after it
        try:
            mean, std = self.sample_condition(cond_img, axis, level, opts)
        finally:
            self.refiner = kept
        res = self._result(scan, params, mean, std, out_shape, level, opts)
        if ratio is not None and ratio > LEVEL_WARN:  # silently under-denoised otherwise (issue 22: Rician 10 %)
            top = 100 * self.level_max
            note = (f"the noise ({ratio * top:.0f} % of the intensity range, estimated) is beyond the model's "
                    f"training range (up to {top:.0f} %): denoised as if it were {top:.0f} %; if the scan is less noisy than that "
                    "(the blind estimate reads high on magnitude scans with little air around the body), give "
                    "--noise-level")
            res.info["warning"] = "; ".join(w for w in (res.info.get("warning"), note) if w)
        if adapted is not None:
            res.info["adapt"] = adapted
        return res

    def _fit_normalization(self, img, arr: np.ndarray, bad: np.ndarray) -> dict:
        """The training recipe's normalization fitted on the scan; for denoisers, made insensitive to zero-mean
        noise. Training normalizes the CLEAN scan and adds noise after, so its inputs keep the clean background
        at the bottom of the range; a percentile fit on a scan with zero-mean (Gaussian) noise on a flat
        background puts the 0.5th percentile about 2.6 sigma below the clean level, which shifts the whole image
        up and reads like the bias of Rician noise (measured on the held-out brain, Gaussian 5 %: 29.6 dB with the
        plain fit, 33.5 dB corrected, 33.3 dB with the clean scan's own parameters). So when the scan has values
        below -sigma (zero-mean noise around a zero background: magnitude MR is never negative), ``lo`` moves up
        by 2.576 sigma (the 0.5th percentile of a Gaussian); magnitude images keep the plain fit (a Rayleigh
        background's 0.5th percentile is 0.1 sigma)."""
        params = fit_normalization(img, self.modality, window=self.ct_window, foreground=True)
        lo, hi = float(params.get("lo", 0.0)), float(params.get("hi", 0.0))
        # lo < -sigma needs lo < 0: magnitude scans (never negative) skip the noise estimate
        if self.task != "denoise" or params.get("method") != "percentile" or magnitude_scan(params):
            return params

        sigma = estimate_noise_sigma(arr, axis=self.slice_axis, max_slices=16, min_side=8, exclude=bad)
        if sigma > 0 and lo < -sigma and lo + 2.576 * sigma < hi:
            params = {**params, "lo": lo + 2.576 * sigma, "lo_fit": lo, "lo_shift": "zero-mean noise: +2.576 sigma"}
        return params

    def _noise_level(self, x: torch.Tensor, axis: int, opts: EnhanceOptions, bad: np.ndarray | None = None,
                     arr: np.ndarray | None = None, params: dict | None = None) -> float | None:
        """Noise-level input (estimated: not clamped, above 1 when the noise is beyond the training range; given:
        clamped to [0, 1]), or None for models without that input."""
        if not self.denoiser.noise_level_cond:
            return None
        if opts.noise_level is not None:
            return float(min(max(opts.noise_level, 0.0), 1.0))
        if self.task == "sr":
            lo = float(self.degrade.noise_aug_range[0])
            return lo / self.level_max if self.level_max > 0 else 0.0

        # std in model units (range width 2): median over up to 16 non-constant slices
        sigma = estimate_noise_sigma(x, axis=axis, max_slices=16, min_side=8, exclude=bad)
        if arr is not None and params is not None and params.get("method") == "percentile":
            # magnitude (Rician) scans: the wavelet estimate reads ~0.75 x sigma there (medldm.data.noise); the
            # background's Rayleigh mode reads sigma. Never lower than the wavelet estimate; 0 when not magnitude

            unit = 2.0 / max(float(params["hi"]) - float(params["lo"]), 1e-12)
            sigma = max(sigma, rayleigh_background_sigma(arr, exclude=bad) * unit)
        return float(max(sigma / 2.0 / max(self.level_max, 1e-8), 0.0))  # > 1: beyond the training range

    def _result(self, scan: Scan, params: dict, mean, std, out_shape, level, opts: EnhanceOptions) -> EnhanceResult:
        image, std, bad_out, wrap = to_scanner(scan, mean, std, out_shape, params)
        info: dict[str, Any] = {
            "task": self.task, "noise_level": level, "samples": int(opts.samples),
            "steps": opts.steps, "sampler": opts.sampler,
            "input_shape": list(scan.arr.shape), "output_shape": list(out_shape), "normalization": params,
            "refined": self.refiner is not None and opts.refine, "nonfinite_voxels": wrap["nonfinite_voxels"],
            "window": list(opts.window), "overlap": opts.overlap, "batch_size": int(opts.batch_size),
            "floor": wrap["floor"], "clamped_voxels": wrap["clamped_voxels"],
        }
        if self.resize_to:
            info["note"] = (f"the model was trained on images resized to {list(self.resize_to)}; this scan was "
                            "enhanced at its own resolution")
        std_img = None
        if opts.samples > 1:
            unit = _unit_of(params)
            std_img = std_image(image, std * unit)
            info["uncertainty"], warn = _uncertainty(mean, std, unit, bad_out)
            if warn:
                info["warning"] = warn
        warns = (wrap.get("nonfinite_warning"), self._domain_warning(params), info.get("warning"))
        if any(warns):
            info["warning"] = "; ".join(w for w in warns if w)
        return EnhanceResult(image=image, std=std_img, info=info)


def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    """(N, C, *S) -> (N, C f^d, *S/f): the training stage's lossless condition layout."""
    return s2d(x, f)


def _noise(shape: tuple[int, ...], seed: int, sample_idx: int, item: int) -> torch.Tensor:
    """Start noise of one item, seeded by (seed, sample, item): independent of batch size and device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(_seed(seed, sample_idx, item)))


def _seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy SeedSequence: no collisions between key tuples in practice)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def _ceil(v: int, f: int) -> int:
    return int(math.ceil(v / f) * f)


def _pad_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Pad the trailing spatial dims of (N, C, *S) at the end to ``size`` (edge replication)."""
    pads: list[int] = []
    for s, t in zip(reversed(x.shape[2:]), reversed(size), strict=True):
        pads += [0, t - s]
    if not any(pads):
        return x
    mode = "replicate"
    return F.pad(x, pads, mode=mode)
