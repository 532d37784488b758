"""Low-dose CT simulation from a full-dose scan, in the projection domain (HU in, HU out).

Model (Yu et al., "Development and validation of a practical lower-dose-simulation tool", Med. Phys.
39(10), 2012; Zeng et al., "A simple low-dose x-ray CT simulation from high-dose scan", IEEE TNS 62(5),
2015), per axial slice:

1. HU -> linear attenuation ``mu = mu_water (1 + HU/1000)`` (1/mm, clipped at 0; ``mu_water`` = 0.0192/mm,
   water at ~70 keV effective energy), voxel spacing from the affine.
2. Parallel-beam line integrals ``p`` (:mod:`medldm.data.radon`; one detector bin per pixel width,
   ``ceil(pi/2 n_det)`` views over 180 degrees).
3. Expected counts ``lam = I0 exp(-p)`` at full dose (``I0`` photons per bin per view, default 1e5).
   The measured log-sinogram of a scan with dose fraction ``d`` has variance ``(d lam + se^2) / (d lam)^2``
   (Poisson + Gaussian electronic noise ``se``). The input already carries full-dose noise, so only the
   **extra** variance ``v = (1/d - 1)/lam + se^2 (1/d^2 - 1)/lam^2`` is added: Gaussian, independent per bin.
4. The noise sinogram alone is reconstructed by filtered back-projection (ramp filter) and added to the
   input in HU: the image itself is never re-projected, so no resolution is lost and no FBP artefacts
   are introduced; the output is ``input + noise``.

``lowdose_noise_std`` gives the model's predicted per-pixel noise standard deviation (variance
propagation through the same FBP), against which the simulation is validated in tests/test_degrade.py.
Expected low-dose counts are floored at 1 photon per bin (photon starvation behind metal).
"""

from __future__ import annotations

import numpy as np
import torch

from medldm.data import radon as rd

MU_WATER = 0.0192  # 1/mm, water at ~70 keV
I0_FULL = 1e5  # photons per detector bin per view at full dose


def _to_mu(hu: torch.Tensor, mu_water: float) -> torch.Tensor:
    return (mu_water * (1.0 + hu / 1000.0)).clamp_min(0.0)


def _pad_square(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Pad HU slices (B, X, Y) to a square with air (-1000 HU)."""
    b, nx, ny = x.shape
    n = max(nx, ny)
    if nx == ny:
        return x, nx, ny
    out = x.new_full((b, n, n), -1000.0)
    out[:, :nx, :ny] = x
    return out, nx, ny


def extra_variance(p: torch.Tensor, dose: float, i0: float, electronic_noise: float = 0.0) -> torch.Tensor:
    """Variance added to the log-sinogram ``p`` (line integrals, dimensionless) to go from full dose
    to dose fraction ``dose``: ``(1/d-1)/lam + se^2 (1/d^2-1)/lam^2`` with ``lam = i0 exp(-p)``."""
    lam = (i0 * torch.exp(-p)).clamp_min(1.0 / dose)
    se2 = float(electronic_noise) ** 2
    return (1.0 / dose - 1.0) / lam + se2 * (1.0 / dose**2 - 1.0) / lam**2


def _check(dose: float, pixel_mm: float) -> None:
    if not 0.0 < dose <= 1.0:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose}")
    if not pixel_mm > 0:
        raise ValueError(f"pixel size must be > 0 mm, got {pixel_mm}")


def line_integrals(mu: torch.Tensor, pixel_mm: float, n_views: int, coarse: int = 1) -> torch.Tensor:
    """Line integrals ``p`` (dimensionless) of ``mu`` (B, N, N; 1/mm) -> (B, n_views, n_det).

    ``coarse > 1`` projects a ``coarse``-times area-downsampled slice with ``coarse``-times fewer views
    and interpolates the sinogram back (``coarse**3`` times faster; ``p`` only sets the noise variance,
    which varies slowly)."""
    n = mu.shape[-1]
    if coarse <= 1:
        return rd.radon(mu, n_views) * pixel_mm
    b = mu.shape[0]
    m = -(-n // coarse) * coarse
    x = torch.nn.functional.pad(mu, (0, m - n, 0, m - n))
    xc = torch.nn.functional.avg_pool2d(x[:, None], coarse)[:, 0]
    # the padded grid's centre is shifted by (m - n)/2 fine pixels: undo it by shifting back
    vc = max(8, -(-n_views // coarse))
    pc = rd.radon(xc, vc) * (pixel_mm * coarse)  # (B, vc, ndc)
    nd, ndc = rd.n_detectors(n), pc.shape[-1]
    theta = rd.view_angles(n_views, mu.device)
    t = torch.arange(nd, dtype=torch.float64, device=mu.device) - (nd - 1) / 2.0
    shift = (m - n) / 2.0  # fine-grid centre sits at -shift in the padded grid's centred coordinates
    tc = (t[None, :] - shift * (theta.cos() + theta.sin())[:, None]) / coarse  # coarse detector offset
    gx = tc / ((ndc - 1) / 2.0)
    gy = (theta / (torch.pi / vc)) / ((vc - 1) / 2.0) - 1.0
    grid = torch.stack([gx, gy[:, None].expand_as(gx)], dim=-1).to(pc.dtype)[None].expand(b, -1, -1, -1)
    return torch.nn.functional.grid_sample(pc[:, None], grid, mode="bilinear", padding_mode="border",
                                           align_corners=True)[:, 0]


def _auto_coarse(n: int) -> int:
    return max(1, n // 256)


def _sino_var(hu: torch.Tensor, pixel_mm: float, dose: float, i0: float, n_views: int,
              mu_water: float, electronic_noise: float, coarse: int | None = None) -> torch.Tensor:
    c = _auto_coarse(hu.shape[-1]) if coarse is None else coarse
    p = line_integrals(_to_mu(hu, mu_water), pixel_mm, n_views, c)
    return extra_variance(p, dose, i0, electronic_noise)


def lowdose_noise(
    hu: torch.Tensor,
    pixel_mm: float,
    dose: float,
    rng: np.random.Generator,
    *,
    i0: float = I0_FULL,
    n_views: int | None = None,
    mu_water: float = MU_WATER,
    electronic_noise: float = 0.0,
    coarse: int | None = None,
) -> torch.Tensor:
    """Extra noise (HU) of a ``dose``-fraction scan for full-dose slices ``hu`` (B, X, Y) -> (B, X, Y).

    ``pixel_mm``: in-plane pixel size (square pixels). The Gaussian draws come from ``rng`` (numpy),
    so a seed gives the same noise on CPU and GPU. ``coarse``: projection grid for the variance
    (:func:`line_integrals`; default ``max(1, N // 256)``)."""
    _check(dose, pixel_mm)
    if dose == 1.0:
        return torch.zeros_like(hu)
    x, nx, ny = _pad_square(hu)
    n = x.shape[-1]
    nv = n_views or rd.default_views(n)
    var = _sino_var(x, pixel_mm, dose, i0, nv, mu_water, electronic_noise, coarse)
    z = torch.from_numpy(rng.standard_normal(var.shape)).to(device=var.device, dtype=var.dtype)
    noise_mu = rd.fbp(var.sqrt() * z, n) / pixel_mm
    return (noise_mu * (1000.0 / mu_water))[:, :nx, :ny]


def _kernel_energy(n_det: int) -> tuple[float, float]:
    """sum h^2 and sum h[k] h[k+1] of the (padded, circular) spatial ramp kernel used by FBP."""
    filt = rd.ramp_filter(n_det)
    size = 2 * (filt.shape[0] - 1)
    h = torch.fft.irfft(filt, n=size)
    return float((h * h).sum()), float((h * torch.roll(h, 1)).sum())


def lowdose_noise_std(
    hu: torch.Tensor,
    pixel_mm: float,
    dose: float,
    *,
    i0: float = I0_FULL,
    n_views: int | None = None,
    mu_water: float = MU_WATER,
    electronic_noise: float = 0.0,
    coarse: int | None = None,
) -> torch.Tensor:
    """Predicted per-pixel standard deviation (HU) of :func:`lowdose_noise`, (B, X, Y).

    Variance propagation through FBP, assuming the sinogram variance is locally constant over the
    ramp kernel's support: ``var(x) = (pi/V)^2 sum_theta v(theta, t(x)) g(w)`` with
    ``g(w) = ((1-w)^2 + w^2) E0 + 2 w (1-w) E1`` for the linear-interpolation weight ``w``."""
    _check(dose, pixel_mm)
    x, nx, ny = _pad_square(hu)
    b, n, _ = x.shape
    nv = n_views or rd.default_views(n)
    var = _sino_var(x, pixel_mm, dose, i0, nv, mu_water, electronic_noise, coarse)
    nd = var.shape[-1]
    e0, e1 = _kernel_energy(nd)
    coord = torch.arange(n, dtype=torch.float64, device=var.device) - (n - 1) / 2.0
    vv, uu = torch.meshgrid(coord, coord, indexing="ij")
    theta = rd.view_angles(nv, var.device)
    out = torch.zeros(b, n * n, dtype=torch.float64, device=var.device)
    step = max(1, 2**22 // (n * n * b))
    for a0 in range(0, nv, step):
        th = theta[a0:a0 + step]
        pos = uu.reshape(1, -1) * th.cos()[:, None] + vv.reshape(1, -1) * th.sin()[:, None] + (nd - 1) / 2.0
        i0_ = pos.floor().clamp(0, nd - 2)
        w = (pos - i0_).clamp(0, 1)
        g = ((1 - w) ** 2 + w**2) * e0 + 2 * w * (1 - w) * e1
        idx = i0_.long().unsqueeze(0).expand(b, -1, -1)
        va = var[:, a0:a0 + th.shape[0]].to(torch.float64)
        vloc = torch.gather(va, 2, idx) * (1 - w) + torch.gather(va, 2, idx + 1) * w
        out += (vloc * g).sum(1)
    std = out.sqrt() * (np.pi / nv) / pixel_mm * (1000.0 / mu_water)
    return std.reshape(b, n, n)[:, :nx, :ny].to(hu.dtype)
