"""The model's input made from a degraded scan, for training pairs AND inference (sr, denoise, thinslice; 2D, 3D).

One room for the condition, as nnU-Net's predictor runs the preprocessing its plans name: training
(:func:`make_pair`, on clean crops) and inference (:func:`scan_condition`, on the degraded scan a user brings)
call the same interpolations (:func:`upsample_grid` for ``sr``, the Keys cubic convolution of
:mod:`medldm.data.resample` for ``thinslice``), so the two match by construction.

**Training pairs** are made on the fly from clean crops with seeded, batched torch degradations (CPU or GPU), in
the model range [-1, 1] (width 2):

* ``gaussian``: ``y = x + s * 2 * n``; ``rician``: magnitude of a complex Gaussian perturbation in [0, 1]
  units, ``y01 = |x01 + s (n1 + i n2)|``; ``s`` drawn per sample from ``degrade.level_range`` (relative to the
  intensity range, the convention of :mod:`medldm.data.degrade`);
* ``downsample``: area down-sampling by ``scale`` in-plane (anti-aliased; optionally after a Gaussian pre-blur
  drawn from ``degrade.blur_range``, so the model does not learn one kernel) and back to the high-res grid
  (:func:`upsample_grid`: linear, or bicubic for ``degrade.upsample: cubic``); ``thick`` (3D): average of ``scale``
  slices along the last axis, replicated back; then a noise-augmentation ``s`` from ``degrade.noise_aug_range``
  is added to the low-res condition (Ho et al. 2021, cascaded diffusion) and ``s`` is a U-Net input;
* ``thinslice`` (2D, SMORE-style self-similarity): along ONE in-plane axis of the slice (drawn per sample, 0 or
  1), thick slices of ``scale`` thin ones (``degrade.profile``: box = their mean; gaussian = FWHM ``scale``
  pixels, centred on the same points), then Keys cubic interpolation back to the thin grid, exactly what
  :func:`interpolate_z` does along Z at inference (thick slice ``k`` centred on thin index
  ``k * scale + (scale - 1) / 2``, pixel-area convention); a noise augmentation as for ``sr``.

**At inference** (:func:`scan_condition`) the degraded scan is already on its (low-res) grid: denoise keeps it,
sr interpolates it in-plane by ``scale`` with :func:`upsample_grid` (``thick``: slice replication) and adds the
training's lowest noise augmentation (seeded), thinslice interpolates along Z with :func:`interpolate_z`.

The condition goes to the U-Net rearranged onto the latent grid by space-to-depth
(:func:`medldm.models.conditioning.space_to_depth`, shared by training and inference). The noise level given to
the U-Net is ``s / max(range)`` in [0, 1]; ``noise_level_max`` is stored in the model folder's ``extra.json`` so
inference feeds the same scale.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from medldm.data.resample import cubic_convolution_resize


def _levels(n: int, lo_hi: tuple[float, float], gen: torch.Generator, device) -> torch.Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    u = torch.rand(n, generator=gen)
    return (lo + (hi - lo) * u).to(device)


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1)))


def add_noise(x: torch.Tensor, sigma: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Gaussian or Rician noise, ``sigma`` (N,) relative to the model range width 2."""
    n1 = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    s = _bshape(sigma, x).to(x.dtype)
    if kind == "gaussian":
        return x + 2.0 * s * n1
    if kind == "rician":
        n2 = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        x01 = (x + 1.0) / 2.0
        return torch.sqrt((x01 + s * n1) ** 2 + (s * n2) ** 2) * 2.0 - 1.0
    raise ValueError(f"unknown noise kind {kind!r}")


def gaussian_blur_inplane(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur ``x`` (N, C, *S) along its first two spatial axes with a Gaussian of std ``sigma[n]`` (pixels) per
    sample (reflect padding); sigma 0 leaves a sample unchanged."""
    if not bool((sigma > 0).any()):
        return x
    d = x.ndim - 2
    r = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = torch.where(sigma.to(x.device)[:, None] > 0, k, (t[None] == 0).to(x.dtype))
    k = k / k.sum(dim=1, keepdim=True)  # (N, 2r+1)
    n, c = x.shape[:2]
    y = x.reshape(1, n * c, *x.shape[2:])
    kk = k.repeat_interleave(c, dim=0)  # (N*C, 2r+1)
    conv = F.conv2d if d == 2 else F.conv3d
    for axis in (0, 1):
        shape = [n * c, 1] + [1] * d
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = r
        y = conv(F.pad(y, pad, mode="reflect"), kk.reshape(shape), groups=n * c)
    return y.reshape(x.shape)


#: ``degrade.upsample`` -> torch interpolation mode, by number of spatial dims (cubic: 2D only)
UPSAMPLE_MODES = {("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}


def downsample_upsample(x: torch.Tensor, scale: int, kind: str = "downsample",
                        blur: torch.Tensor | None = None, upsample: str = "linear") -> torch.Tensor:
    """Low-res version of ``x`` (N, C, *S) on the same grid: anti-aliased area down-sampling in-plane by
    ``scale`` (kind 'downsample'; optionally after an in-plane Gaussian pre-blur of std ``blur[n]`` pixels),
    back on the grid by :func:`upsample_grid` (``upsample``: linear / cubic), or ``scale``-slice averaging along the last
    axis (kind 'thick')."""
    if scale <= 1:
        return x
    d = x.ndim - 2
    if blur is not None and kind != "thick":
        x = gaussian_blur_inplane(x, blur)
    if kind == "thick":
        k = (1,) * (d - 1) + (scale,)
        low = F.avg_pool3d(x, kernel_size=k, stride=k)
        return torch.repeat_interleave(low, scale, dim=-1)
    k = (scale, scale) + ((1,) if d == 3 else ())
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    low = pool(x, kernel_size=k, stride=k)
    return upsample_grid(low, tuple(x.shape[2:]), upsample)


def upsample_grid(low: torch.Tensor, size: tuple[int, ...], mode: str = "linear") -> torch.Tensor:
    """(N, C, *S) -> (N, C, *size): the interpolation from the low-res grid to the condition grid, in training
    pairs and at inference alike (``degrade.upsample``: ``linear`` = bi/trilinear, ``cubic`` = bicubic, 2D
    only; pixel-area alignment, ``align_corners=False``)."""
    key = (mode, low.ndim - 2)
    if key not in UPSAMPLE_MODES:
        raise ValueError(f"degrade.upsample {mode!r} is not available for {low.ndim - 2}D images")
    return F.interpolate(low, size=tuple(int(v) for v in size), mode=UPSAMPLE_MODES[key], align_corners=False)


def thick_matrix(n: int, scale: int, profile: str = "box") -> torch.Tensor:
    """(n // scale, n) float64 matrix: thin slices -> thick slices of ``scale`` thin ones (box: their mean;
    gaussian: FWHM ``scale`` thin slices around the same centre ``k * scale + (scale - 1) / 2``, borders
    replicated). ``n`` must be a multiple of ``scale``."""
    import numpy as np

    if n % scale:
        raise ValueError(f"thick slices of {scale}: {n} thin slices is not a multiple of {scale}")
    m = n // scale
    w = np.zeros((m, n))
    if profile == "box":
        for k in range(m):
            w[k, k * scale:(k + 1) * scale] = 1.0 / scale
    elif profile == "gaussian":
        sd = scale / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # FWHM = scale thin slices
        r = int(math.ceil(3.0 * sd + scale / 2.0))
        for k in range(m):
            c = k * scale + (scale - 1) / 2.0
            for i in range(int(math.floor(c - r)), int(math.ceil(c + r)) + 1):
                w[k, min(max(i, 0), n - 1)] += math.exp(-0.5 * ((i - c) / sd) ** 2)
        w /= w.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"unknown slice profile {profile!r} (box or gaussian)")
    return torch.from_numpy(w)


def thin_matrix(m: int, scale: int) -> torch.Tensor:
    """(m * scale, m) float64 matrix: Keys cubic convolution (a = -0.5, borders replicated) from ``m`` thick
    slices to ``m * scale`` thin ones over the same extent: ``medldm.eval.baselines.cubic_convolution_resize``
    (the 'bicubic' baseline), as a matrix."""
    import numpy as np

    return torch.from_numpy(cubic_convolution_resize(np.eye(m), (m * scale, m)))


@functools.lru_cache(maxsize=32)
def _degrade_matrix(n: int, scale: int, profile: str) -> torch.Tensor:
    return thin_matrix(n // scale, scale) @ thick_matrix(n, scale, profile)


def thinslice_degrade(x: torch.Tensor, scale: int, profile: str, axes: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) -> thick slices along axis ``axes[n]`` (0: H, 1: W) of each sample, interpolated back to
    the thin grid (same shape). H and W must be multiples of ``scale``."""
    h, w = x.shape[-2:]
    mh = _degrade_matrix(h, scale, profile).to(x.device, x.dtype)
    mw = mh if w == h else _degrade_matrix(w, scale, profile).to(x.device, x.dtype)
    along_h = torch.einsum("ij,ncjw->nciw", mh, x)
    along_w = torch.einsum("ij,nchj->nchi", mw, x)
    pick = _bshape(axes.to(x.device), x).bool()
    return torch.where(pick, along_w, along_h)


def _noise_augment(low: torch.Tensor, degrade, fixed, rng_range, gen: torch.Generator):
    """Noise augmentation of the low-quality condition (sr, thinslice): Gaussian noise of a level drawn from
    ``rng_range`` (or ``fixed``), returned as the U-Net's noise-level input in [0, 1] of ``noise_aug_range``."""
    sigma = fixed if fixed is not None else _levels(low.shape[0], rng_range, gen, low.device)
    top = float(degrade.noise_aug_range[1])
    if top > 0:
        low = add_noise(low, sigma, "gaussian", gen)
    level = (sigma / top).clamp(0, 1) if top > 0 else torch.zeros_like(sigma)
    return low, level


def make_pair(clean: torch.Tensor, task: str, degrade, gen: torch.Generator,
              sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """clean (N, 1, *S) -> (degraded (N, 1, *S) on the same grid, noise level (N,) in [0, 1]).

    ``degrade`` is the config's ``DegradeConfig``; ``gen`` a CPU generator seeded for this step; ``sigma``
    fixes the noise sigma (validation / inference) instead of drawing it from the configured range.
    """
    n = clean.shape[0]
    rng_range = degrade.level_range if task == "denoise" else degrade.noise_aug_range
    fixed = None if sigma is None else torch.full((n,), float(sigma), device=clean.device)
    if task == "denoise":
        sigma = fixed if fixed is not None else _levels(n, rng_range, gen, clean.device)
        frac = float(getattr(degrade, "rician_fraction", 0.0))
        if fixed is None and frac > 0:  # blind to the noise model: Rician for a drawn share of the samples
            rician = _bshape(torch.rand(n, generator=gen) < frac, clean).to(clean.device)
            y = torch.where(rician, add_noise(clean, sigma, "rician", gen), add_noise(clean, sigma, degrade.kind, gen))
        else:
            y = add_noise(clean, sigma, degrade.kind, gen)
        top = max(float(degrade.level_range[1]), 1e-8)
        return y, (sigma / top).clamp(0, 1)
    if task == "sr":
        lo_b, hi_b = (float(v) for v in getattr(degrade, "blur_range", (0.0, 0.0)))
        blur = None
        if hi_b > 0 and fixed is not None:  # validation: skimage's anti-aliasing kernel at this scale
            blur = torch.full((n,), max(0.0, (degrade.scale - 1) / 2.0))
        elif hi_b > 0:  # drawn only when configured, so configs without it keep their random stream
            blur = _levels(n, (lo_b, hi_b), gen, "cpu")
        low = downsample_upsample(clean, degrade.scale, degrade.kind, blur, getattr(degrade, "upsample", "linear"))
        return _noise_augment(low, degrade, fixed, rng_range, gen)
    if task == "thinslice":
        if fixed is not None:  # validation: alternate the axis, so both reformat directions are measured
            axes = torch.arange(n) % 2
        else:
            axes = (torch.rand(n, generator=gen) < 0.5).long()
        low = thinslice_degrade(clean, int(degrade.scale), getattr(degrade, "profile", "box"), axes)
        return _noise_augment(low, degrade, fixed, rng_range, gen)
    raise ValueError(f"task {task!r} has no degraded pair")


def noise_level_max(task: str, degrade) -> float:
    """The absolute noise sigma that maps to noise level 1.0 (stored in extra.json)."""
    return float(degrade.level_range[1] if task == "denoise" else degrade.noise_aug_range[1])


# ---------------------------------------------------------------------------------------------- at inference
def _field(degrade, key: str, default):
    """``degrade.key`` of a config object or a model folder's ``degrade`` dict (None / missing -> ``default``)."""
    v = degrade.get(key) if isinstance(degrade, dict) else getattr(degrade, key, None)
    return default if v is None else v


def thin_shape(shape: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    """The thin grid of a thick volume (X, Y, Z): (X, Y, factor * Z)."""
    x, y, z = (int(v) for v in shape[:3])
    return x, y, z * int(factor)


def interpolate_z(vol, factor: int):
    """Keys cubic convolution (a = -0.5) along Z of (X, Y, Z) to ``factor`` x the slices, pixel-area alignment,
    borders replicated (float32 array): the interpolation of the ``thinslice`` training pairs (:func:`thin_matrix`)
    and the ``bicubic`` baseline."""
    import numpy as np

    return np.asarray(cubic_convolution_resize(vol, thin_shape(vol.shape, factor)), dtype=np.float32)


def scan_condition(x, task: str, degrade, *, axis: int = 2, dims: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The model's condition made from a degraded scan ``x`` (X, Y, Z), on the output grid, and that grid's shape.

    * ``denoise``: ``x`` itself;
    * ``sr``: ``x`` interpolated by ``degrade.scale`` with :func:`upsample_grid` (2D models: the two axes other
      than ``axis``; 3D: X and Y; ``kind: thick``: slices replicated along Z), plus the training's lowest noise
      augmentation ``degrade.noise_aug_range[0]`` (seeded by ``seed``) that every training condition carried;
    * ``thinslice``: ``x`` interpolated along Z to ``degrade.scale`` x the slices (:func:`interpolate_z`).

    ``x`` is in model units for sr / denoise (a tensor); thin slices are interpolated in the units given (an
    array), as the shipped ``mr-thinslice-4x`` was run since it was made.
    """
    if task == "denoise":
        return x, tuple(x.shape)
    s = int(_field(degrade, "scale", 2 if task == "sr" else 4))
    if task == "thinslice":
        out = torch.from_numpy(interpolate_z(x, s))
        return out, tuple(out.shape)
    if task != "sr":
        raise ValueError(f"task {task!r} has no scan condition")
    shape = list(x.shape)
    if _field(degrade, "kind", "downsample") == "thick":
        shape[2] *= s
        up = torch.repeat_interleave(x, s, dim=2)
    else:
        for a in ([a for a in range(3) if a != axis] if dims == 2 else [0, 1]):
            shape[a] *= s
        if _field(degrade, "upsample", "linear") == "cubic":  # 2D models: bicubic slice by slice
            sl = torch.movedim(x, axis, 0)[:, None]
            size = tuple(int(sl.shape[d]) * s for d in (2, 3))
            up = torch.movedim(upsample_grid(sl, size, "cubic")[:, 0], 0, axis)
        else:  # folders without the key were trained with linear; one trilinear pass over the volume
            up = upsample_grid(x[None, None], tuple(shape), "linear")[0, 0]
    sigma = float(_field(degrade, "noise_aug_range", [0.0, 0.0])[0])
    if sigma > 0:  # the training condition always carried at least this noise augmentation
        g = torch.Generator().manual_seed(seed + 7)
        up = up + 2.0 * sigma * torch.randn(up.shape, generator=g)
    return up, tuple(shape)


def neighbour_slices(vol: torch.Tensor, index: torch.Tensor, context: int) -> torch.Tensor:
    """The 2.5D context of slices ``index`` (B,) of ``vol`` (n, *S): (B, 2 context, *S), the slices z-1, z+1, z-2,
    z+2, ... with the edge slice repeated past either end of the volume — the channel order a refiner with
    ``context`` was trained with (training items, ``medldm.data.datasets.make_items``, and inference,
    ``medldm.pipelines.enhance``, both call this)."""
    n = vol.shape[0]
    offsets = [s * d for d in range(1, context + 1) for s in (-1, 1)]
    if not offsets:
        return vol.new_zeros((len(index), 0, *vol.shape[1:]))
    idx = (index.reshape(-1, 1) + torch.tensor(offsets, dtype=torch.long)).clamp(0, n - 1)
    return vol[idx]
