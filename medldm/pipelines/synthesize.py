"""Synthesis: a synthesis model folder -> synthetic scans in scanner-like units, with provenance.

``Synthesizer(bundle).generate(seed=, label=, guidance=) -> MetaTensor (X, Y, Z)``. Geometry: the training
image size (``extra.resize_to`` or ``patch_size``; 2D models give (X, Y, 1) images) on an axis-aligned grid with
``spacing`` mm voxels. Intensities: model range -> CT Hounsfield units through the training CT window, otherwise
through the normalization of the first training scan (MR has no absolute scale; recorded in the provenance).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from medldm.diffusion import make_model_fn, make_schedule, sample
from medldm.io.errors import CaseError


class Synthesizer:
    """A loaded synthesis model folder."""

    def __init__(self, bundle, device: str = "cpu"):
        ex = bundle.extra
        if ex.get("task") != "synthesis":
            raise CaseError(bundle.path, f"model task is {ex.get('task')!r}, not 'synthesis'", "use `medldm enhance` for sr/denoise models")
        if bundle.vae is None or bundle.denoiser is None:
            raise CaseError(bundle.path, "model folder lacks the VAE or the denoiser", "export the ldm stage's model folder")
        self.device = torch.device(device)
        self.bundle = bundle.to(self.device)
        self.vae, self.denoiser = bundle.vae, bundle.denoiser
        self.schedule = make_schedule(bundle.diffusion)
        self.dcfg = bundle.diffusion
        self.dims = int(self.denoiser.spatial_dims)
        self.f = int(ex.get("factor") or 2 ** (len((bundle.config.get("vae") or {}).get("channels", [0, 0, 0])) - 1))
        self.size = tuple(int(v) for v in (ex.get("resize_to") or ex.get("patch_size") or [64] * self.dims))
        self.class_names = list(ex.get("class_names") or [])
        self.num_classes = int(self.denoiser.num_classes)
        self.intensity = _output_params(ex)

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
    ):
        """One synthetic scan: MetaTensor (X, Y, Z) float32 holding values of the output dtype."""
        from monai.data import MetaTensor

        from medldm.data.intensity import denormalize

        size = tuple(size or self.size)
        if len(size) != self.dims or any(s % self.f for s in size):
            raise ValueError(f"size {list(size)}: needs {self.dims} values, each a multiple of {self.f}")
        w = float(self.dcfg.guidance if guidance is None else guidance)
        if label is None or self.num_classes == 0:
            w = 1.0  # unconditional: the null class alone, no guidance
        g = torch.Generator().manual_seed(int(seed))
        shape = (1, int(self.denoiser.latent_channels), *(s // self.f for s in size))
        x_t = torch.randn(shape, generator=g).to(self.device)
        labels = None if self.num_classes == 0 else torch.tensor([self.num_classes if label is None else label])
        fn = make_model_fn(self.denoiser, self.schedule, class_labels=labels, guidance=w)

        def model_fn(x, t):
            with self._autocast():
                return fn(x, t).float()

        z = sample(sampler or self.dcfg.sampler, model_fn, x_t, self.schedule, steps or self.dcfg.sampling_steps, generator=g)
        with self._autocast():
            img = self.vae.decode(z / self.bundle.scale_factor).float().cpu()[0, 0]
        if self.dims == 2:
            img = img[:, :, None]
        vals = torch.as_tensor(denormalize(img, self.intensity, to_original_dtype=True)).float()
        affine = np.diag([spacing, spacing, spacing, 1.0])
        meta: dict[str, Any] = {
            "kind": "synthetic", "modality": self.intensity.get("modality", "OT"),
            "original_dtype": self.intensity["original_dtype"], "original_ndim": self.dims,
            "spacing": (spacing,) * 3, "warnings": [], "series_description": "SYNTHETIC",
        }
        return MetaTensor(vals.contiguous(), affine=torch.as_tensor(affine), meta=meta), {"guidance": w, "label": label}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _output_params(extra: dict) -> dict:
    """Normalization params used to map model outputs back to scanner-like units."""
    from medldm.data.intensity import CT_WINDOWS

    norm = extra.get("normalization") or {}
    examples = [e for e in (norm.get("examples") or []) if isinstance(e, dict) and "lo" in e]
    modality = str(norm.get("modality") or "auto").upper()
    if modality == "AUTO" and examples:
        modality = str(examples[0].get("modality", "unknown")).upper()
    if modality == "CT":
        lo, hi = CT_WINDOWS.get(norm.get("ct_window", "full"), CT_WINDOWS["full"])
        return {"modality": "CT", "lo": lo, "hi": hi, "out_range": [-1.0, 1.0], "clip": False, "original_dtype": "int16"}
    if examples:
        e = examples[0]
        return {"modality": modality if modality != "AUTO" else "OT", "lo": float(e["lo"]), "hi": float(e["hi"]),
                "out_range": list(e.get("out_range", [-1.0, 1.0])), "clip": False,
                "original_dtype": str(e.get("original_dtype", "float32"))}
    return {"modality": "OT", "lo": 0.0, "hi": 1.0, "out_range": [-1.0, 1.0], "clip": False, "original_dtype": "float32"}
