"""Diffusion process configuration (the ``diffusion`` section of a training YAML / model folder).

:class:`DiffusionConfig` uses the same validated-dataclass mechanism as every other config of medldm
(:mod:`medldm.config`): typed fields with ``Literal`` choices and a one-line doc each. Build it from a parsed
YAML mapping with :func:`medldm.config.from_mapping` (what the training schema and model folders do) or
:func:`load_diffusion_config` (the same with the ``diffusion.`` prefix on error keys); an unknown key, a wrong type or an unknown choice is a ``ConfigError`` naming the
key and the nearest valid one. ``__post_init__`` holds the checks no type can express (which prediction goes
with which schedule, value ranges), so they hold for a config built in Python too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from medldm.config import ConfigError, doc_field, from_mapping

ScheduleKind = Literal["ddpm", "flow"]
Prediction = Literal["eps", "v", "x0", "flow"]
BetaSchedule = Literal["scaled_linear", "linear", "cosine"]
SamplerName = Literal["ddim", "dpmpp_2m", "unipc", "euler_flow"]

# The choices, for code that lists them (defined once, by the types above).
SCHEDULES: tuple[str, ...] = typing.get_args(ScheduleKind)
PREDICTIONS: tuple[str, ...] = typing.get_args(Prediction)
BETA_SCHEDULES: tuple[str, ...] = typing.get_args(BetaSchedule)
SAMPLER_NAMES: tuple[str, ...] = typing.get_args(SamplerName)

# Bounds on what sizes arrays at training / inference: generous for real models, far below what would exhaust
# memory when a model folder from elsewhere is loaded.
MAX_TRAIN_TIMESTEPS = 1_000_000
MAX_SAMPLING_STEPS = 100_000


@dataclass
class DiffusionConfig:
    """Forward process, training target and default sampling settings."""

    schedule: ScheduleKind = doc_field(
        "ddpm", "'ddpm' (discrete variance-preserving, Ho et al. 2020) or 'flow' (rectified flow, Liu et al. 2022)")
    num_train_timesteps: int = doc_field(
        1000, "number of discrete training timesteps (ddpm); time resolution of the embedding (flow)")
    beta_schedule: BetaSchedule = doc_field(
        "scaled_linear", "ddpm betas: 'scaled_linear' (LDM), 'linear' or 'cosine' (Nichol & Dhariwal 2021)")
    beta_start: float = doc_field(0.0015, "first beta (linear / scaled_linear)")
    beta_end: float = doc_field(0.0195, "last beta (linear / scaled_linear)")
    prediction: Prediction = doc_field(
        "eps", "network target: 'eps', 'v' (Salimans & Ho 2022), 'x0'; 'flow' velocity for schedule='flow'")
    cfg_dropout: float = doc_field(0.1, "probability of replacing the class label by the learned null class during training")
    min_snr_gamma: float = doc_field(0.0, "Min-SNR loss weighting gamma (Hang et al. 2023); 0 = plain MSE")
    flow_shift: float = doc_field(
        1.0, "flow time shift s: t' = s t / (1 + (s - 1) t) when sampling training times (SD3); 1 = none")
    sampler: SamplerName = doc_field("dpmpp_2m", "default sampler at inference: 'ddim', 'dpmpp_2m', 'unipc' or 'euler_flow'")
    sampling_steps: int = doc_field(20, "default number of sampling steps at inference")
    guidance: float = doc_field(1.0, "default classifier-free guidance weight (1 = conditional model only)")

    def __post_init__(self) -> None:
        # Choices: the Literal types are the one list. from_mapping has checked them already when the config
        # came from YAML; this keeps a config built in Python (DiffusionConfig(schedule="edm")) from passing.
        for name, choices in _choices(type(self)).items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"diffusion.{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        if (self.schedule == "flow") != (self.prediction == "flow"):
            raise ValueError("diffusion.prediction: 'flow' goes with schedule 'flow' (and only with it), "
                             f"got prediction {self.prediction!r} with schedule {self.schedule!r}")
        _int_in("num_train_timesteps", self.num_train_timesteps, 2, MAX_TRAIN_TIMESTEPS)
        _int_in("sampling_steps", self.sampling_steps, 1, MAX_SAMPLING_STEPS)
        for name in ("beta_start", "beta_end", "cfg_dropout", "min_snr_gamma", "flow_shift", "guidance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"diffusion.{name}: expected a finite number, got {v!r}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"diffusion.cfg_dropout: must be in [0, 1), got {self.cfg_dropout}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"diffusion.min_snr_gamma: must be >= 0 (0 = off), got {self.min_snr_gamma}")
        if self.flow_shift <= 0:
            raise ValueError(f"diffusion.flow_shift: must be > 0 (1 = no shift), got {self.flow_shift}")
        if self.schedule == "ddpm" and self.beta_schedule != "cosine" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"diffusion.beta_start / beta_end: need 0 < beta_start <= beta_end < 1, "
                             f"got {self.beta_start}, {self.beta_end}")


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


def _int_in(name: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"diffusion.{name}: expected an integer in {lo}..{hi}, got {v!r}")


def load_diffusion_config(section: Mapping | None) -> DiffusionConfig:
    """Validate a parsed ``diffusion`` section (None = all defaults) into a :class:`DiffusionConfig`.

    Raises :class:`medldm.config.ConfigError` naming the key, e.g. ``diffusion.sampler: expected one of 'ddim',
    'dpmpp_2m', 'unipc', 'euler_flow', got 'euler'; did you mean 'euler_flow'?``."""
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"diffusion: expected a section (mapping of keys), got {section!r}")
    return from_mapping(DiffusionConfig, section, prefix="diffusion")
