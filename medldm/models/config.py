"""Network configurations (plain dataclasses: str/int/float/bool/tuple fields only).

They are the ``vae`` and ``unet`` sections of a training YAML and of a model folder's ``config.yaml``;
``from_dict`` rebuilds them from the YAML mapping with :func:`medldm.config.from_mapping` (keys and types
checked, lists become tuples). Each invariant between settings is checked once, by the dataclass itself
(``__post_init__``: attention levels per channel level, GroupNorm groups and attention heads dividing the
channels); :func:`validate` adds the ranges a model folder read from disk must keep to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    from medldm.config import from_mapping

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
