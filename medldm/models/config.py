"""The configurations a model folder holds (plain dataclasses: str/int/float/bool/tuple fields only): the one
config room below training and inference.

``VAEConfig``, ``UNetConfig`` and ``DiffusionConfig`` are the ``vae``, ``unet`` and ``diffusion`` sections of a
training YAML and of a model folder's ``config.yaml``; ``DegradeConfig`` is the ``degrade`` section (how training
pairs were made, which inference needs to make the same condition). The model card that ties them together
(``extra.json``) is :mod:`medldm.models.card`. The sampler names a folder may ask for are ``SAMPLER_NAMES`` here
(torch-free, so ``--help`` can list them); :data:`medldm.diffusion.samplers.SAMPLERS` maps each to its function.
The ``vae`` / ``unet`` sections:
``from_dict`` rebuilds them from the YAML mapping with :func:`medldm.config.from_mapping` (keys and types
checked, lists become tuples). Each invariant between settings is checked once, by the dataclass itself
(``__post_init__``: attention levels per channel level, GroupNorm groups and attention heads dividing the
channels); :func:`validate` adds the ranges a model folder read from disk must keep to.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from medldm.config import ConfigError, doc_field, from_mapping

T = TypeVar("T")


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line doc in ``metadata["doc"]`` (tuples stay immutable defaults)."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class VAEConfig:
    """MONAI ``AutoencoderKL`` (stage 1). Downsampling factor f = 2 ** (len(channels) - 1)."""

    spatial_dims: int = _f(2, "2 for slice models, 3 for volume models")
    in_channels: int = _f(1, "image channels fed to the encoder")
    out_channels: int = _f(1, "image channels produced by the decoder")
    latent_channels: int = _f(4, "channels of the latent z")
    channels: tuple[int, ...] = _f((64, 128, 128), "feature channels per resolution level")
    num_res_blocks: int = _f(2, "residual blocks per level")
    attention_levels: tuple[bool, ...] = _f((False, False, False), "self-attention per level (same length as channels)")
    norm_num_groups: int = _f(32, "GroupNorm groups; must divide every entry of channels")
    with_encoder_nonlocal_attn: bool = _f(False, "attention block at the encoder bottleneck")
    with_decoder_nonlocal_attn: bool = _f(False, "attention block at the decoder bottleneck")
    use_flash_attention: bool = _f(False, "use torch scaled_dot_product_attention kernels")

    def __post_init__(self) -> None:
        _check_levels(self, "vae")

    @property
    def downsample_factor(self) -> int:
        """Spatial size ratio image / latent."""
        return 2 ** (len(self.channels) - 1)


@dataclass
class UNetConfig:
    """Latent denoiser: MONAI ``DiffusionModelUNet`` plus medldm's conditioning (see ``LatentDenoiser``)."""

    channels: tuple[int, ...] = _f((128, 256, 512), "feature channels per resolution level")
    attention_levels: tuple[bool, ...] = _f((False, True, True), "self-attention per level (same length as channels)")
    num_res_blocks: int = _f(2, "residual blocks per level")
    num_head_channels: int = _f(64, "channels per attention head")
    norm_num_groups: int = _f(32, "GroupNorm groups; must divide every entry of channels")
    num_classes: int = _f(0, "0 = no class conditioning; else classes 0..n-1 plus a learned null class at index n (CFG)")
    cond_channels: int = _f(0, "channels of an image condition concatenated to the noisy latent (SR / denoising)")
    noise_level_cond: bool = _f(False, "condition on a continuous scalar in [0, 1] (noise-augmentation or degradation level)")
    use_flash_attention: bool = _f(False, "use torch scaled_dot_product_attention kernels")

    def __post_init__(self) -> None:
        _check_levels(self, "unet")
        heads = self.num_head_channels
        if _is_int(heads) and heads < 1:
            raise ValueError(f"unet.num_head_channels = {heads!r}: must be a positive integer")
        if _is_int(heads) and _ints(self.channels) and len(self.attention_levels) == len(self.channels):
            attn = [c for c, a in zip(self.channels, self.attention_levels, strict=True) if a] + [self.channels[-1]]
            if any(c % heads for c in attn):
                raise ValueError(
                    f"unet.num_head_channels={heads} must divide the channels of every attention level "
                    f"and of the bottleneck ({self.channels[-1]})"
                )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(values: Any) -> bool:
    return isinstance(values, (tuple, list)) and len(values) > 0 and all(_is_int(c) for c in values)


def _check_levels(cfg: VAEConfig | UNetConfig, prefix: str) -> None:
    """The structural invariants of a network config, checked once, where it is built (``from_mapping`` /
    ``from_dict`` and direct construction): one ``attention_levels`` entry per ``channels`` level, and
    ``norm_num_groups`` dividing every ``channels`` entry. Ranges of values read from model folders are
    :func:`validate`'s; these checks only look at values of the right type."""
    if isinstance(cfg.attention_levels, (tuple, list)) and isinstance(cfg.channels, (tuple, list)) \
            and len(cfg.attention_levels) != len(cfg.channels):
        raise ValueError(f"{prefix}.attention_levels = {list(cfg.attention_levels)}: needs one entry per "
                         f"{prefix}.channels level ({len(cfg.channels)})")
    groups = cfg.norm_num_groups
    if _is_int(groups) and groups < 1:
        raise ValueError(f"{prefix}.norm_num_groups = {groups!r}: must be a positive integer")
    if _is_int(groups) and _ints(cfg.channels) and any(c % groups for c in cfg.channels):
        raise ValueError(f"{prefix}.norm_num_groups={groups} must divide every {prefix}.channels entry")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a parsed-YAML mapping with medldm's one validated mechanism
    (:func:`medldm.config.from_mapping`): every key and type checked, lists -> tuples, an unknown key names the
    nearest valid one (``prefix`` = the section name in messages, e.g. ``"vae"``)."""
    return from_mapping(cls, data, prefix=prefix)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# Bounds for configs read from model folders (``validate``): generous for real models, far below what would
# exhaust memory while the networks are built. A folder beyond them is refused before anything is allocated.
MAX_WIDTH = 4096  # feature channels of one level
MAX_LEVELS = 8  # resolution levels
MAX_RES_BLOCKS = 16  # residual blocks per level
MAX_IO_CHANNELS = 256  # image / latent / condition channels
MAX_CLASSES = 10_000


def validate(cfg: Any, prefix: str) -> None:
    """Check the types and ranges of a ``VAEConfig`` / ``UNetConfig`` (as read from a YAML file).

    Raises ``ValueError`` naming the key (``prefix.key``), its value and the allowed range.
    """

    def where(name: str) -> str:
        return f"{prefix}.{name}"

    def integer(name: str, lo: int, hi: int) -> None:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{where(name)} = {v!r}: must be an integer in {lo}..{hi}")

    def flag(name: str) -> None:
        v = getattr(cfg, name)
        if not isinstance(v, bool):
            raise ValueError(f"{where(name)} = {v!r}: must be true or false")

    def widths(name: str) -> None:
        v = getattr(cfg, name)
        if not isinstance(v, tuple) or not 1 <= len(v) <= MAX_LEVELS:
            raise ValueError(f"{where(name)} = {v!r}: must be a list of 1..{MAX_LEVELS} channel counts")
        for i, c in enumerate(v):
            if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_WIDTH:
                raise ValueError(f"{where(name)}[{i}] = {c!r}: must be an integer in 1..{MAX_WIDTH}")

    def levels(name: str) -> None:  # one per channels level: the config's own check (_check_levels)
        v = getattr(cfg, name)
        if not isinstance(v, tuple) or not all(isinstance(a, bool) for a in v):
            raise ValueError(f"{where(name)} = {v!r}: must be a list of true/false values (one per channels level)")

    for f in dataclasses.fields(cfg):
        if f.name in ("channels", "attention_levels"):
            continue
        if isinstance(f.default, bool):
            flag(f.name)
    widths("channels")
    levels("attention_levels")
    integer("num_res_blocks", 1, MAX_RES_BLOCKS)
    integer("norm_num_groups", 1, MAX_WIDTH)
    if isinstance(cfg, VAEConfig):
        integer("spatial_dims", 2, 3)
        for name in ("in_channels", "out_channels", "latent_channels"):
            integer(name, 1, MAX_IO_CHANNELS)
    elif isinstance(cfg, UNetConfig):
        integer("num_head_channels", 1, MAX_WIDTH)
        integer("num_classes", 0, MAX_CLASSES)
        integer("cond_channels", 0, MAX_IO_CHANNELS)


# ------------------------------------------------------------------------------------------ diffusion
ScheduleKind = Literal["ddpm", "flow"]
Prediction = Literal["eps", "v", "x0", "flow"]
BetaSchedule = Literal["scaled_linear", "linear", "cosine"]
SamplerName = Literal["ddim", "dpmpp_2m", "unipc", "euler_flow"]

# The choices, for code that lists them (defined once, by the types above).
SCHEDULES: tuple[str, ...] = typing.get_args(ScheduleKind)
PREDICTIONS: tuple[str, ...] = typing.get_args(Prediction)
BETA_SCHEDULES: tuple[str, ...] = typing.get_args(BetaSchedule)
SAMPLER_NAMES: tuple[str, ...] = typing.get_args(SamplerName)
#: most neighbouring slices on each side a 2.5D refiner may see (``refine.context``, ``RefinerSpec.context``)
MAX_CONTEXT = 8

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

    def sampling_options(self, steps: int | None = None, sampler: str | None = None) -> tuple[int, str]:
        """The (steps, sampler) a run uses: the user's values, else this model's defaults; checked here, once, for
        every entry point (``medldm enhance`` / ``synthesize`` / ``listen``, ``medldm.shipped``, the demo).
        Raises ``ValueError`` (one line, naming the option)."""
        steps = self.sampling_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps!r}")
        if steps > MAX_SAMPLING_STEPS:
            raise ValueError(f"--steps {steps}: at most {MAX_SAMPLING_STEPS:,}")
        sampler = self.sampler if sampler is None else sampler
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLER_NAMES)}")
        return steps, sampler

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


# ------------------------------------------------------------------------------------------ degradation
@dataclass
class DegradeConfig:
    """How SR / denoising training pairs are made from clean samples (seeded, on the fly)."""

    kind: Literal["gaussian", "rician", "downsample", "thick"] = doc_field(
        "gaussian", "gaussian/rician noise (denoise) or downsample/thick slices (sr)")
    scale: int = doc_field(2, "sr: down-sampling factor (in-plane) or slice thickness factor (thick, 3D); "
                              "thinslice: thin slices per thick slice")
    level_range: tuple[float, float] = doc_field((0.02, 0.1), "denoise: noise sigma relative to the model range width")
    noise_aug_range: tuple[float, float] = doc_field((0.0, 0.1), "sr: noise-augmentation sigma added to the low-res "
                                                                  "condition; its level is a U-Net input")
    blur_range: tuple[float, float] = doc_field(
        (0.0, 0.0), "sr (downsample): Gaussian pre-blur sigma in high-res pixels, drawn per sample, before area "
        "down-sampling (0.5 at x2 is skimage's anti_aliasing=True): robustness to the scanner's / user's kernel")
    rician_fraction: float = doc_field(
        0.0, "denoise: fraction of training samples given Rician (magnitude MR) instead of `kind`'s noise, drawn per "
        "sample, so one model is blind to the noise model; validation uses `kind`")
    upsample: Literal["linear", "cubic"] = doc_field(
        "linear", "sr (downsample): how the low-res input is put on the output grid for the U-Net's condition and "
        "the refiner's base: linear, or cubic (Keys bicubic, a = -0.75; 2D models only); the model folder records it")
    profile: Literal["box", "gaussian"] = doc_field(
        "box", "thinslice: slice profile of a thick slice: box (the mean of `scale` thin slices) or gaussian "
        "(FWHM = `scale` thin slices, same centre)")

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"degrade.scale: must be >= 1, got {self.scale}")
        if not 0.0 <= self.rician_fraction <= 1.0:
            raise ValueError(f"degrade.rician_fraction: must be in [0, 1], got {self.rician_fraction}")
