"""Diffusion process configuration (the ``diffusion`` section of a training YAML / model folder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


SCHEDULES = ("ddpm", "flow")
PREDICTIONS = ("eps", "v", "x0", "flow")
BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
SAMPLERS = ("ddim", "dpmpp_2m", "unipc", "euler_flow")


@dataclass
class DiffusionConfig:
    """Forward process, training target and default sampling settings."""

    schedule: str = _f("ddpm", "'ddpm' (discrete variance-preserving, Ho et al. 2020) or 'flow' (rectified flow, Liu et al. 2022)")
    num_train_timesteps: int = _f(1000, "number of discrete training timesteps (ddpm); time resolution of the embedding (flow)")
    beta_schedule: str = _f("scaled_linear", "ddpm betas: 'scaled_linear' (LDM), 'linear' or 'cosine' (Nichol & Dhariwal 2021)")
    beta_start: float = _f(0.0015, "first beta (linear / scaled_linear)")
    beta_end: float = _f(0.0195, "last beta (linear / scaled_linear)")
    prediction: str = _f("eps", "network target: 'eps', 'v' (Salimans & Ho 2022), 'x0'; 'flow' velocity for schedule='flow'")
    cfg_dropout: float = _f(0.1, "probability of replacing the class label by the learned null class during training")
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (Hang et al. 2023); 0 = plain MSE")
    flow_shift: float = _f(1.0, "flow time shift s: t' = s t / (1 + (s - 1) t) when sampling training times (SD3); 1 = none")
    sampler: str = _f("dpmpp_2m", "default sampler at inference: 'ddim', 'dpmpp_2m', 'unipc' or 'euler_flow'")
    sampling_steps: int = _f(20, "default number of sampling steps at inference")
    guidance: float = _f(1.0, "default classifier-free guidance weight (1 = conditional model only)")

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if (self.schedule == "flow") != (self.prediction == "flow"):
            raise ValueError("diffusion.prediction='flow' goes with schedule='flow' (and only with it)")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"diffusion.beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"diffusion.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError("diffusion.cfg_dropout must be in [0, 1)")
        if self.num_train_timesteps < 2:
            raise ValueError("diffusion.num_train_timesteps must be >= 2")
