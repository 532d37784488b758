"""Synthesis: a synthesis model folder -> synthetic scans in scanner-like units, with provenance.

``Synthesizer(bundle).generate(seed=, label=, guidance=, mask=) -> MetaTensor (X, Y, Z)``. Geometry: the training
image size (``extra.resize_to`` or ``patch_size``; 2D models give (X, Y, 1) images) on an axis-aligned grid with
``spacing`` mm voxels. Intensities: model range -> CT Hounsfield units through the training CT window, otherwise
through the normalization of the first training scan (MR has no absolute scale; recorded in the provenance).

Mask-conditioned models (``extra.condition == "mask"``, trained with ``condition: mask``) take a label map
(values 0..mask_classes-1, 0 = background): the image is generated on the label map's grid (its size, padded with
background up to a multiple of the VAE factor and cropped back; its affine), the map one-hot and space-to-depth
onto the latent grid as in training (:func:`medldm.models.denoiser.mask_condition`). Without a mask they sample
unconditionally (the all-zero condition they were trained with, ``diffusion.cfg_dropout``).

Sizes are checked before anything is allocated (``Synthesizer.check_size``): the output voxels against
``$MEDLDM_MAX_VOXELS`` (``medldm.io.limits``, as for scans read), and the estimated peak memory of sampling and
decoding (activations, skip connections and the quadratic self-attention maps of the U-Net and VAE) against
``$MEDLDM_MAX_MEMORY`` (bytes, e.g. ``16G``), by default 80 % of the available RAM (free GPU memory on a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medldm.data.intensity import CT_WINDOWS, denormalize
from medldm.diffusion import make_model_fn, make_schedule, sample
from medldm.io.errors import CaseError
from medldm.io.limits import max_voxels
from medldm.models.card import Normalization
from medldm.models.denoiser import mask_condition

MAX_VOXELS_ENV = "MEDLDM_MAX_VOXELS"  # the one voxel limit of medldm.io.limits
MAX_MEMORY_ENV = "MEDLDM_MAX_MEMORY"
_ACT_COPIES = 8  # live activation tensors of the widest level (measured: 1.6-2.5x a 4-copy estimate)
_ATT_COPIES = 3  # attention scores, softmax, and a temporary of the same size
_WORKSPACE = 64 << 20  # convolution workspaces and allocator slack, measured at small sizes


class SizeError(ValueError):
    """A requested image size is invalid or would not fit in memory (a usage error; the message says why).

    ``reason``: the message without the leading ``size X,Y: `` (empty for a bad limit setting)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def _size_error(size: tuple[int, ...], reason: str) -> SizeError:
    return SizeError(f"size {','.join(map(str, size))}: {reason}", reason)


class Synthesizer:
    """A loaded synthesis model folder."""

    def __init__(self, bundle, device: str = "cpu"):
        card = bundle.card
        if card.task != "synthesis":
            raise CaseError(bundle.path, f"model task is {card.task!r}, not 'synthesis'", "use `medldm enhance` for sr/denoise models")
        if bundle.vae is None or bundle.denoiser is None:
            raise CaseError(bundle.path, "model folder lacks the VAE or the denoiser", "export the ldm stage's model folder")
        self.device = torch.device(device)
        self.bundle = bundle.to(self.device)
        self.vae, self.denoiser = bundle.vae, bundle.denoiser
        self.schedule = make_schedule(bundle.diffusion)
        self.dcfg = bundle.diffusion
        self.dims = int(self.denoiser.spatial_dims)
        self.card = card
        self.vae_cfg = card.vae
        self.f = card.factor
        self.size = card.training_size
        self.class_names = list(card.class_names)
        self.num_classes = int(self.denoiser.num_classes)
        self.intensity = _output_params(card.normalization)
        self.mask_classes = card.mask_classes if card.condition == "mask" else 0
        want = self.mask_classes * self.f ** self.dims
        if int(self.denoiser.cond_channels) != want:
            raise CaseError(bundle.path, f"the denoiser takes a {self.denoiser.cond_channels}-channel image condition, "
                                         f"extra.json describes {want} (condition {card.condition!r})",
                            "export the model folder again with this medldm version")

    def mask_array(self, mask) -> torch.Tensor:
        """A label map (array (X, Y), (X, Y, 1) for 2D models, (X, Y, Z) for 3D) -> int64 tensor of the model's
        dimensionality; ValueError naming what is wrong (not integer, values outside 0..mask_classes-1, shape)."""
        if not self.mask_classes:
            raise ValueError("this model is not mask-conditioned (train it with condition: mask): drop --mask")
        a = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask, dtype=np.float64)
        if self.dims == 2 and a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim != self.dims:
            raise ValueError(f"label map of shape {tuple(a.shape)}: a {self.dims}D model needs a {self.dims}D map"
                             + (" (one slice)" if self.dims == 2 else ""))
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError("label map: values must be whole numbers (class indices)")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.mask_classes:
            raise ValueError(f"label map values {lo}..{hi}: this model knows labels 0..{self.mask_classes - 1} "
                             "(0 = background)")
        return torch.from_numpy(a.astype(np.int64))

    @property
    def multiple(self) -> int:
        """What every side of a generated image must be a multiple of: VAE factor x U-Net down-sampling."""
        return self.f * 2 ** (len(self.denoiser.cfg.channels) - 1)

    def mask_size(self, mask: torch.Tensor) -> tuple[int, ...]:
        """The generation size for a label map: its shape, each side rounded up to :attr:`multiple`."""
        return tuple(-(-int(s) // self.multiple) * self.multiple for s in mask.shape)

    def class_name_for(self, contrast: str | None = None, position: str | int | None = None) -> str | None:
        """The class name of a contrast and/or slice-position bin (models trained with class_from
        'contrast_position': ``T1/position-2``; 'slice_position': ``position-2``); None when neither is given."""
        if contrast is None and position is None:
            return None
        known = set(self.class_names)
        if contrast is not None and position is None:
            raise ValueError(f"contrast={contrast}: give position=B too (classes: {', '.join(self.class_names)})")
        name = f"position-{position}" if contrast is None else f"{contrast}/position-{position}"
        if name not in known:
            raise ValueError(f"no class {name!r} in this model; classes: {', '.join(self.class_names) or 'none'}")
        return name

    def label_index(self, value: str | int | None) -> int | None:
        """Class index from an index or a class name; None = unconditional (the null class)."""
        if value is None:
            return None
        if self.num_classes == 0:
            raise ValueError("this model is not class-conditional: drop --condition class=...")
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if value not in self.class_names:
                raise ValueError(f"unknown class {value!r}; classes: {', '.join(self.class_names) or 'indices only'}")
            return self.class_names.index(value)
        idx = int(value)
        if not 0 <= idx < self.num_classes:
            raise ValueError(f"class index {idx} out of range 0..{self.num_classes - 1}")
        return idx

    @torch.no_grad()
    def generate(
        self, *, seed: int = 0, label: int | None = None, guidance: float | None = None, steps: int | None = None,
        sampler: str | None = None, size: tuple[int, ...] | None = None, spacing: float = 1.0,
        mask=None, affine: np.ndarray | None = None,
    ):
        """One synthetic scan: MetaTensor (X, Y, Z) float32 holding values of the output dtype.

        ``mask`` (mask-conditioned models): label map (see :meth:`mask_array`); the output takes its shape and
        ``affine`` (4x4, default: ``spacing`` mm voxels)."""
        if not (math.isfinite(spacing) and spacing > 0):
            raise ValueError(f"spacing {spacing}: must be a positive number of mm")
        steps, sampler = self.dcfg.sampling_options(steps, sampler)
        w = float(self.dcfg.guidance if guidance is None else guidance)
        if label is None or self.num_classes == 0:
            w = 1.0  # unconditional: the null class alone, no guidance
        labels_map = None
        if mask is not None:
            labels_map = self.mask_array(mask)
            size = self.mask_size(labels_map)
        size = self.check_size(size, guidance=w)
        cond = None
        if self.mask_classes:
            lat = (1, self.mask_classes * self.f ** self.dims, *(s // self.f for s in size))
            if labels_map is None:
                cond = torch.zeros(lat)  # no mask: the unconditional branch (condition dropout in training)
            else:
                pad = []
                for s, t in zip(reversed(labels_map.shape), reversed(size), strict=True):
                    pad += [0, t - s]
                padded = torch.nn.functional.pad(labels_map, pad)  # background 0 up to the multiple
                cond = mask_condition(padded[None], self.mask_classes, self.f)
            cond = cond.to(self.device)
        g = torch.Generator().manual_seed(int(seed))
        shape = (1, int(self.denoiser.latent_channels), *(s // self.f for s in size))
        x_t = torch.randn(shape, generator=g).to(self.device)
        # the user's label is checked here, once, before sampling (the denoiser's forward pass does not check it)
        if label is not None and self.num_classes:
            whole = isinstance(label, (int, np.integer)) and not isinstance(label, bool)
            if not (whole and 0 <= label <= self.num_classes):
                raise ValueError(f"class label {label!r} is outside [0, {self.num_classes}] (last = null class)")
        labels = None if self.num_classes == 0 else torch.tensor([self.num_classes if label is None else label])
        fn = make_model_fn(self.denoiser, self.schedule, cond=cond, class_labels=labels, guidance=w)

        def model_fn(x, t):
            with self._autocast():
                return fn(x, t).float()

        z = sample(sampler, model_fn, x_t, self.schedule, steps, generator=g)
        with self._autocast():
            img = self.vae.decode(z / self.bundle.scale_factor).float().cpu()[0, 0]
        if labels_map is not None:
            img = img[tuple(slice(0, s) for s in labels_map.shape)]
        if self.dims == 2:
            img = img[:, :, None]
        vals = torch.as_tensor(denormalize(img, self.intensity, to_original_dtype=True)).float()
        affine = np.diag([spacing, spacing, spacing, 1.0]) if affine is None else np.asarray(affine, np.float64)
        meta: dict[str, Any] = {
            "kind": "synthetic", "modality": self.intensity.get("modality", "OT"),
            "original_dtype": self.intensity["original_dtype"], "original_ndim": self.dims,
            "spacing": tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)), "warnings": [], "series_description": "SYNTHETIC",
        }
        return MetaTensor(vals.contiguous(), affine=torch.as_tensor(affine), meta=meta), {
            "guidance": w, "label": label, "mask": labels_map is not None}

    def check_size(self, size: tuple[int, ...] | None = None, *, guidance: float = 1.0) -> tuple[int, ...]:
        """``size`` (default: the training size) when it is valid and fits in memory, else ``SizeError`` saying
        what fits. ``guidance != 1`` runs two network passes per step (batch 2)."""
        size = tuple(self.size if size is None else size)
        if len(size) != self.dims or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size) \
                or any(s % self.f for s in size):
            raise _size_error(size, f"needs {self.dims} positive values, each a multiple of {self.f}, "
                                    f"e.g. {','.join(map(str, self.size))}")
        if any(s % self.multiple for s in size):  # the U-Net halves the latent grid at each level below the first
            raise _size_error(size, f"each value must be a multiple of {self.multiple} (VAE factor {self.f} x the "
                                    f"U-Net's {self.multiple // self.f} down-samplings), "
                                    f"e.g. {','.join(map(str, self.size))}")
        voxels = math.prod(size)
        try:
            max_vox = max_voxels()
        except CaseError as e:
            raise SizeError(e.line()) from None
        if voxels > max_vox:
            raise _size_error(size, f"{voxels:,} voxels, more than the {int(max_vox):,} allowed: pass a smaller "
                                    f"size, or raise {MAX_VOXELS_ENV}")
        batch = 2 if guidance != 1.0 else 1
        need = self.estimate_bytes(size, batch=batch)
        limit, what = memory_limit(self.device)
        if need > limit:
            fit = size
            while self.estimate_bytes(fit, batch=batch) > limit and max(fit) > self.f:
                fit = tuple(max(self.f, (s // 2) // self.f * self.f) for s in fit)
            hint = (f": pass a smaller size ({','.join(map(str, fit))} fits)" if self.estimate_bytes(fit, batch=batch)
                    <= limit else ": pass a smaller size")
            raise _size_error(size, f"synthesis would need about {_gb(need)} of memory, more than the "
                                    f"{_gb(limit)} {what}{hint}")
        return size

    def estimate_bytes(self, size: tuple[int, ...], *, batch: int = 1) -> int:
        """Rough peak memory (bytes) of one ``generate`` at ``size``: the larger of the U-Net pass on the latent
        and the VAE decode, float32 activations of the widest level plus skip connections and attention maps."""
        vae_cfg = self.vae_cfg
        unet_cfg = self.denoiser.cfg
        dims, img = self.dims, math.prod(size)
        lat = img / self.f**dims
        skips = peak = 0.0
        for level, (ch, attn) in enumerate(zip(unet_cfg.channels, unet_cfg.attention_levels, strict=False)):
            vox = lat / 2 ** (dims * level)
            skips += (unet_cfg.num_res_blocks + 1) * ch * vox * 4
            heads = max(1, ch // unet_cfg.num_head_channels)
            att = _ATT_COPIES * heads * vox * vox * 4 if attn and not unet_cfg.use_flash_attention else 0.0
            peak = max(peak, _ACT_COPIES * ch * vox * 4 + att)
        unet = batch * (skips + peak)
        vae = 0.0
        if vae_cfg is not None:
            levels = list(zip(vae_cfg.channels, vae_cfg.attention_levels, strict=False))
            for level, (ch, attn) in enumerate(levels):
                vox = img / 2 ** (dims * level)
                att = _ATT_COPIES * vox * vox * 4 if attn and not vae_cfg.use_flash_attention else 0.0
                if level == len(levels) - 1 and vae_cfg.with_decoder_nonlocal_attn and not vae_cfg.use_flash_attention:
                    att = max(att, _ATT_COPIES * vox * vox * 4)
                vae = max(vae, _ACT_COPIES * ch * vox * 4 + att)
        # x1.5: the allocator keeps freed blocks; measured growth at 512^2 (shipped mr-synth-2d, CPU) was 192-203 MB
        # against 206 MB for the unscaled count, too close for a bound that must not let through what does not fit
        return int(1.5 * (max(unet, vae) + img * 4 * 4) + _WORKSPACE)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def memory_limit(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(bytes, what): ``$MEDLDM_MAX_MEMORY`` when set, else 80 % of the free GPU memory (CUDA device) or of the
    available RAM."""
    if os.environ.get(MAX_MEMORY_ENV, "").strip():
        return int(_env_number(MAX_MEMORY_ENV, 0)), f"allowed ({MAX_MEMORY_ENV})"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free), f"allowed (80% of the free GPU memory; set {MAX_MEMORY_ENV} to change)"
    return int(0.8 * _available_ram()), f"allowed (80% of the available memory; set {MAX_MEMORY_ENV} to change)"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _env_number(name: str, default: float) -> float:
    """A positive number from the environment (``2e9``, ``16G``, ``512M``), else ``default``; bad values are a
    ``SizeError`` naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    m = re.fullmatch(r"([0-9.eE+]+)\s*([KMGT]?)i?B?", raw, flags=re.IGNORECASE)
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).upper()] if m else -1.0
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise SizeError(f"{name}={raw!r}: expected a positive number such as 2e9 or 16G")
    return value


def _gb(n: float) -> str:
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MB"


def _output_params(norm: Normalization) -> dict:
    """Normalization params used to map model outputs back to scanner-like units."""
    examples = [e for e in norm.examples if isinstance(e, dict) and "lo" in e]
    modality = str(norm.modality or "auto").upper()
    if modality == "AUTO" and examples:
        modality = str(examples[0].get("modality", "unknown")).upper()
    if modality == "CT":
        lo, hi = CT_WINDOWS.get(norm.ct_window, CT_WINDOWS["full"])
        return {"modality": "CT", "lo": lo, "hi": hi, "out_range": [-1.0, 1.0], "clip": False, "original_dtype": "int16"}
    if examples:
        e = examples[0]
        return {"modality": modality if modality != "AUTO" else "OT", "lo": float(e["lo"]), "hi": float(e["hi"]),
                "out_range": list(e.get("out_range", [-1.0, 1.0])), "clip": False,
                "original_dtype": str(e.get("original_dtype", "float32"))}
    return {"modality": "OT", "lo": 0.0, "hi": 1.0, "out_range": [-1.0, 1.0], "clip": False, "original_dtype": "float32"}
