"""Forward processes, parametrisations and the training loss — plain functions over tensors (2D and 3D alike).

Both processes are Gaussian paths ``x_t = alpha_t * x0 + sigma_t * eps``:

* ``ddpm`` (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): discrete t in {0..T-1},
  ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``, ``abar_t = prod(1 - beta)``;
* ``flow`` (rectified flow: Liu et al. 2022, "Flow Straight and Fast"; Lipman et al. 2022, "Flow Matching"):
  continuous t in [0, 1], ``alpha_t = 1 - t``, ``sigma_t = t``; the network predicts the velocity ``eps - x0``.

Network outputs: ``eps``; ``v = alpha * eps - sigma * x0`` (Salimans & Ho 2022, "Progressive Distillation");
``x0``; ``flow`` velocity. ``predict_x0_eps`` / ``output_from_x0_eps`` convert between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medldm.diffusion.config import DiffusionConfig
from medldm.models.ema import unwrap


@dataclass(frozen=True)
class Schedule:
    """A forward process. ``betas`` / ``alphas_cumprod`` are (T,) float64 (empty for ``flow``)."""

    kind: str
    prediction: str
    num_train_timesteps: int
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 0.0
    flow_shift: float = 1.0

    @property
    def t_max(self) -> float:
        """The most-noisy time (where sampling starts)."""
        return float(self.num_train_timesteps - 1) if self.kind == "ddpm" else 1.0


def make_betas(name: str, n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Beta sequence (n,) float64: 'linear', 'scaled_linear' (LDM) or 'cosine' (Nichol & Dhariwal 2021)."""
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if name == "cosine":
        s = 0.008
        f = [math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
        return torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}")


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    """Build the ``Schedule`` described by a ``DiffusionConfig``."""
    if cfg.schedule == "ddpm":
        betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        abar = torch.cumprod(1.0 - betas, dim=0)
    else:
        betas = abar = torch.zeros(0, dtype=torch.float64)
    return Schedule(
        cfg.schedule, cfg.prediction, cfg.num_train_timesteps, betas, abar, cfg.cfg_dropout, cfg.min_snr_gamma, cfg.flow_shift
    )


def alpha_sigma(schedule: Schedule, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise scales at time ``t`` (any shape; ddpm accepts fractional t, linearly interpolated)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule.kind == "flow":
        return 1.0 - t, t
    abar = schedule.alphas_cumprod.to(t.device)
    tc = t.clamp(0, schedule.num_train_timesteps - 1)
    lo = tc.floor().long()
    hi = (lo + 1).clamp(max=schedule.num_train_timesteps - 1)
    a = torch.lerp(abar[lo], abar[hi], tc - lo)
    return a.sqrt(), (1.0 - a).sqrt()


def model_time(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """Time fed to the network's sinusoidal embedding, on the [0, T] scale (flow: t * T)."""
    t = t.float()
    return t * schedule.num_train_timesteps if schedule.kind == "flow" else t


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) or () -> broadcastable against (N, C, *S), in ``like``'s dtype/device."""
    v = v.to(device=like.device, dtype=like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t noise; x0, noise: (N, C, *S); t: (N,)."""
    a, s = alpha_sigma(schedule, t)
    return _bcast(a, x0) * x0 + _bcast(s, x0) * noise


def output_from_x0_eps(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network target for (x0, eps) at time t under ``schedule.prediction``."""
    a, s = alpha_sigma(schedule, t)
    a, s = _bcast(a, x0), _bcast(s, x0)
    p = schedule.prediction
    if p == "eps":
        return eps
    if p == "x0":
        return x0
    if p == "v":
        return a * eps - s * x0
    return eps - x0  # flow velocity d x_t / d t


def training_target(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Regression target of the network for ``x_t = q_sample(x0, t, noise)``."""
    return output_from_x0_eps(schedule, x0, noise, t)


def predict_x0_eps(
    schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor | float, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output at (x_t, t) into the implied (x0, eps) estimates."""
    a, s = alpha_sigma(schedule, torch.as_tensor(t))
    a, s = _bcast(a, x_t), _bcast(s, x_t)
    p = schedule.prediction
    if p == "eps":
        return (x_t - s * out) / a, out
    if p == "x0":
        return out, (x_t - a * out) / s
    if p == "v":  # variance preserving: a^2 + s^2 = 1
        return a * x_t - s * out, s * x_t + a * out
    return x_t - s * out, x_t + a * out  # flow: x0 = x - t v, eps = x + (1 - t) v


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (reproducible across devices)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def sample_train_times(schedule: Schedule, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times (n,): uniform integers (ddpm) or uniform [0, 1] with the SD3 time shift (flow)."""
    dev = generator.device if generator is not None else "cpu"
    if schedule.kind == "ddpm":
        return torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator, device=dev)
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    sh = schedule.flow_shift
    return sh * u / (1 + (sh - 1) * u)


def loss_weight(schedule: Schedule, t: torch.Tensor) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"), or None."""
    if schedule.min_snr_gamma <= 0 or schedule.kind == "flow":
        return None
    a, s = alpha_sigma(schedule, t)
    snr = (a / s) ** 2
    clipped = snr.clamp(max=schedule.min_snr_gamma)
    if schedule.prediction == "eps":
        return clipped / snr
    if schedule.prediction == "v":
        return clipped / (snr + 1)
    return clipped


def drop_labels(
    labels: torch.Tensor, null_class: int, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``p`` (classifier-free guidance training,
    Ho & Salimans 2022)."""
    if p <= 0:
        return labels
    dev = generator.device if generator is not None else labels.device
    drop = (torch.rand(labels.shape, generator=generator, device=dev) < p).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def diffusion_loss(
    denoiser: Callable[..., torch.Tensor],
    schedule: Schedule,
    x0: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    noise_level: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scalar training loss for a batch of clean latents x0 (N, C, *S).

    Draws t and eps (from ``generator`` when given), forms x_t, drops class labels to the null class with
    probability ``schedule.cfg_dropout`` (when the denoiser is class-conditional) and returns the (Min-SNR
    weighted) MSE between the network output and ``training_target``.
    """
    n = x0.shape[0]
    t = sample_train_times(schedule, n, generator).to(x0.device)
    noise = randn_like(x0, generator)
    x_t = q_sample(schedule, x0, t, noise)
    num_classes = int(getattr(unwrap(denoiser), "num_classes", 0) or 0)  # type: ignore[arg-type]
    if num_classes > 0:
        labels = class_labels if class_labels is not None else torch.full((n,), num_classes, dtype=torch.long)
        class_labels = drop_labels(labels.to(x0.device).long(), num_classes, schedule.cfg_dropout, generator)
    out = denoiser(x_t, model_time(schedule, t), cond=cond, class_labels=class_labels, noise_level=noise_level)
    target = training_target(schedule, x0, noise, t)
    per_sample = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
    w = loss_weight(schedule, t)
    if w is not None:
        per_sample = per_sample * w.to(per_sample)
    return per_sample.mean()
