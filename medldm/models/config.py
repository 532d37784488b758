"""Network configurations (plain dataclasses: str/int/float/bool/tuple fields only).

They are the ``vae`` and ``unet`` sections of a training YAML and of a model folder's ``config.yaml``;
``from_dict`` rebuilds them from the YAML mapping (lists become tuples, unknown keys are an error).
"""

from __future__ import annotations

import dataclasses
import difflib
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


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build dataclass ``cls`` from a mapping (e.g. parsed YAML): lists -> tuples, unknown keys rejected."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(k, list(names), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"{cls.__name__}: unknown key {k!r}{hint}; valid keys: {', '.join(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
