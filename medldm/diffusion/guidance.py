"""Wrapping a trained denoiser as ``model_fn(x, t)`` for the samplers, with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from medldm.diffusion.schedules import Schedule, model_time
from medldm.models.ema import unwrap


def make_model_fn(
    denoiser: Callable[..., torch.Tensor],
    schedule: Schedule,
    *,
    cond: torch.Tensor | None = None,
    class_labels: torch.Tensor | int | None = None,
    guidance: float = 1.0,
    noise_level: torch.Tensor | float | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x, t) -> output`` with fixed conditioning, t in schedule units (ddpm index, flow [0, 1]).

    Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"):
    ``out = out_null + w (out_cond - out_null)`` with the learned null class, both halves in one batched call.
    ``guidance = 1`` evaluates the conditional model only; guidance needs a class-conditional denoiser.
    """
    num_classes = int(getattr(unwrap(denoiser), "num_classes", 0) or 0)  # type: ignore[arg-type]
    if guidance != 1.0 and num_classes == 0:
        raise ValueError("guidance != 1 needs a class-conditional model (unet.num_classes > 0)")
    if guidance != 1.0 and class_labels is None:
        raise ValueError("guidance != 1 needs class_labels (the null class is the unconditional branch)")

    def _expand(v, n: int, device, dtype) -> torch.Tensor | None:
        if v is None:
            return None
        v = torch.as_tensor(v, device=device, dtype=dtype)
        return v.reshape(-1).expand(n) if v.numel() == 1 else v.reshape(n)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        tm = model_time(schedule, torch.as_tensor(t, device=x.device).reshape(-1).expand(n))
        lev = _expand(noise_level, n, x.device, torch.float32)
        labels = _expand(class_labels, n, x.device, torch.long)
        if guidance == 1.0:
            return denoiser(x, tm, cond=cond, class_labels=labels, noise_level=lev)
        assert labels is not None
        null = torch.full_like(labels, num_classes)
        c2 = None if cond is None else torch.cat([cond, cond])
        l2 = None if lev is None else torch.cat([lev, lev])
        out = denoiser(torch.cat([x, x]), torch.cat([tm, tm]), cond=c2, class_labels=torch.cat([labels, null]), noise_level=l2)
        out_c, out_u = out.chunk(2)
        return out_u + guidance * (out_c - out_u)

    return model_fn
