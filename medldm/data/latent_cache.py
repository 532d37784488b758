"""Latent cache: encode every training item once with the frozen VAE, keeping the posterior ``mu`` and
``sigma`` (stage 2 draws ``z = mu + sigma * eps`` each step, so the encoder never runs per batch and the
latent noise of the VAE posterior is still seen, as in LDM training from images).

The cache is saved as one safetensors file tagged with the VAE's hash, so a resumed run reuses it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medldm.io.atomic import atomic_file

#: Posterior std above the prior's (1) carries no information about the image; an under-trained VAE can emit huge
#: sigmas (MONAI clamps log-variance only at 20) in rarely seen regions, which would blow up the diffusion loss.
SIGMA_MAX = 1.0


@dataclass
class LatentCache:
    """``mu[i]``, ``sigma[i]``: (C, *S/f) float32 for item ``i`` (CPU)."""

    mu: list[torch.Tensor]
    sigma: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.mu)

    def crop(self, idx, corners, patch_lat: tuple[int, ...], factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *patch_lat) mu and sigma crops; ``corners`` in pixels (multiples of ``factor``)."""
        mus, sigs = [], []
        for i, c in zip(idx, corners, strict=True):
            sl = (slice(None), *(slice(a // factor, a // factor + p) for a, p in zip(c, patch_lat, strict=True)))
            mus.append(self.mu[int(i)][sl])
            sigs.append(self.sigma[int(i)][sl])
        return torch.stack(mus), torch.stack(sigs)


#: voxels per VAE encoder call when caching (2**24: 256 slices of 256 x 256, or one 256 x 256 x 256 volume); the
#: encoder's activations are ~channels x voxels, so 16 whole 3D volumes in one call would exhaust a GPU
ENCODE_VOXEL_BUDGET = 2**24


def encode_batch(shape: tuple[int, ...], batch_size: int, voxel_budget: int = ENCODE_VOXEL_BUDGET) -> int:
    """Images of ``shape`` per encoder call: at most ``batch_size`` and ``voxel_budget`` voxels, at least one."""
    return max(1, min(batch_size, voxel_budget // max(1, math.prod(shape))))


@torch.no_grad()
def encode_items(vae: torch.nn.Module, images: list[torch.Tensor], device: torch.device,
                 autocast=None, batch_size: int = 16, voxel_budget: int = ENCODE_VOXEL_BUDGET) -> LatentCache:
    """Encode (1, *S) images (grouped by shape into batches of at most ``batch_size`` images and ``voxel_budget``
    voxels, :func:`encode_batch`) -> posterior mu and sigma per image."""
    vae.eval()
    mu: list[torch.Tensor | None] = [None] * len(images)
    sigma: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    for shape, ids in sorted(by_shape.items()):
        n = encode_batch(shape, batch_size, voxel_budget)
        for k in range(0, len(ids), n):
            chunk = ids[k:k + n]
            x = torch.stack([images[i] for i in chunk]).to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                m, s = vae.encode(x)
            for j, i in enumerate(chunk):
                mu[i] = m[j].float().cpu()
                sigma[i] = s[j].float().clamp(max=SIGMA_MAX).cpu()
    return LatentCache(mu, sigma)  # type: ignore[arg-type]


def save_cache(cache: LatentCache, path: str | Path, tag: str) -> None:
    """Write the cache atomically with ``tag`` (e.g. the VAE's model hash) in the metadata."""
    tensors = {}
    for i, (m, s) in enumerate(zip(cache.mu, cache.sigma, strict=True)):
        tensors[f"mu.{i}"] = m.contiguous()
        tensors[f"sigma.{i}"] = s.contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"tag": tag, "n": str(len(cache))})


def load_cache(path: str | Path, tag: str) -> LatentCache | None:
    """The cache at ``path`` if it exists and was made with ``tag``; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("tag") != tag:
        return None
    t = load_file(str(path))
    n = int(meta["n"])
    return LatentCache([t[f"mu.{i}"] for i in range(n)], [t[f"sigma.{i}"] for i in range(n)])
