"""Stage-3 refiner: a pixel-space network that gets past the VAE's reconstruction ceiling (sr / denoise).

A small MONAI ``BasicUNet`` at full resolution that sees both the decoded diffusion output ``d`` and the degraded
input ``y`` (and, for denoisers trained with ``refine.noise_map``, a constant map of the noise level ``s`` the
U-Net is given, FFDNet-style) and predicts a residual:

    x_hat = base + refiner([d, y(, s)]),   base = y (``degraded``) or d (``decoded``)

It is part of the model (``ModelBundle.refiner``, loaded by :func:`medldm.models.folder.load_model` with the same
shape checks as the VAE and the denoiser; ``medldm.models.folder.load_refiner`` for the refiner alone); its
training lives in :mod:`medldm.train.refine_stage`.

A model folder describes it in ``extra.json["refiner"]`` (:class:`RefinerSpec`) next to ``refiner.safetensors``.
The code has no defaults of its own for ``norm`` and ``base``: new folders store what the training config
(``refine.norm`` / ``refine.base``, ``medldm.train.schema.RefineConfig``) chose, and folders written before those
keys existed are read with what they were trained with (:data:`LEGACY_SPEC`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from medldm.models.config import MAX_CONTEXT

#: normalization layers of the BasicUNet, by ``norm`` name
NORMS: dict[str, Any] = {"none": None, "instance": ("instance", {"affine": True}), "batch": ("batch", {"affine": True})}
#: what the refiner's residual is added to
BASES = ("degraded", "decoded")
#: ``extra.json["refiner"]`` keys that folders written before they existed were trained with (instance-normalized
#: network, residual on the decoded output); a folder that stores them is read as stored (``medldm.models.card.migrate``)
LEGACY_SPEC: dict[str, str] = {"norm": "instance", "base": "decoded"}
#: keys of ``extra.json["refiner"]`` that older medldm versions wrote and nothing reads (``apply``: a dotted import
#: path of ``apply_refiner``); ignored on load, no longer written
IGNORED_KEYS = ("apply",)
#: the network inputs a refiner may have, in channel order
#: ("degraded", "degraded", ...): the ablation trained with ``refine.diffusion_channel: false`` (the refiner sees the
#: degraded input where the diffusion output would be; it measures what latent diffusion adds)
INPUTS = (("decoded", "degraded"), ("decoded", "degraded", "noise_level"),
          ("degraded", "degraded"), ("degraded", "degraded", "noise_level"))
#: widest BasicUNet level a model folder may ask for
MAX_FEATURES = 1024



@dataclass(frozen=True)
class RefinerSpec:
    """``extra.json["refiner"]`` of a model folder: how to build and apply ``refiner.safetensors``."""

    spatial_dims: Literal[2, 3]
    features: tuple[int, int, int, int, int, int]  # MONAI BasicUNet features
    norm: Literal["none", "instance", "batch"]
    base: Literal["degraded", "decoded"]
    inputs: tuple[str, ...] = ("decoded", "degraded")  # channel order of the network input
    residual: bool = True  # the output is added to ``base`` (informative; always true)
    # 2.5D: the degraded neighbouring slices on each side the network also sees (``refine.context``), appended
    # after ``inputs`` in the order z-1, z+1, z-2, z+2, ... (``medldm.data.condition.neighbour_slices``); 0 = the slice alone
    context: int = 0

    @property
    def in_channels(self) -> int:
        """Channels of the network input: ``inputs`` and the ``2 * context`` neighbouring slices."""
        return len(self.inputs) + 2 * self.context

    @property
    def uses_diffusion(self) -> bool:
        """False for the ablation trained without the diffusion channel (its first input is the degraded image)."""
        return self.inputs[0] == "decoded"

    @property
    def noise_map(self) -> bool:
        """True when the network's third input is the constant noise-level map (``refine.noise_map``)."""
        return "noise_level" in self.inputs

    def __post_init__(self) -> None:
        bad = [f for f in self.features if not 1 <= f <= MAX_FEATURES]
        if bad:
            raise ValueError(f"refiner.features = {list(self.features)}: every entry must be in 1..{MAX_FEATURES}")
        if not 0 <= int(self.context) <= MAX_CONTEXT or (self.context and self.spatial_dims != 2):
            raise ValueError(f"refiner.context = {self.context}: 0..{MAX_CONTEXT} neighbouring slices on each side, "
                             "for 2D refiners only (a 3D refiner sees its neighbours already)")
        if tuple(self.inputs) not in INPUTS or not self.residual:
            raise ValueError(f"refiner inputs {list(self.inputs)} / residual {self.residual}: medldm applies a "
                             "residual refiner to [decoded or degraded, degraded(, noise_level)] only")

    def to_extra(self) -> dict[str, Any]:
        """The ``extra.json["refiner"]`` entry (YAML/JSON-safe)."""
        out = {"spatial_dims": self.spatial_dims, "features": list(self.features), "norm": self.norm,
               "base": self.base, "inputs": list(self.inputs), "residual": self.residual}
        if self.context:  # written only when used, so the folders of 2D refiners stay as they were
            out["context"] = int(self.context)
        return out


def build_refiner(spatial_dims: int, features, norm: str, in_channels: int = 2) -> nn.Module:
    """MONAI BasicUNet: (N, in_channels, *S) [decoded, degraded(, noise level)] -> (N, 1, *S) residual."""
    from monai.networks.nets import BasicUNet

    if norm not in NORMS:
        raise ValueError(f"refiner norm {norm!r}: expected one of {', '.join(NORMS)}")
    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, features=tuple(features),
                     norm=NORMS[norm])


def build_from_spec(spec: RefinerSpec) -> nn.Module:
    """The (untrained) network a :class:`RefinerSpec` describes."""
    return build_refiner(spec.spatial_dims, spec.features, spec.norm, spec.in_channels)


def widen_first_layer(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 2D refiner's weights (``state``) fitted to a network with more input channels (``target``, e.g. the same
    refiner with 2.5D context): the first convolution's weights for the new channels start at zero, so the
    widened network computes exactly what the old one did until training moves them (a warm start)."""
    out = {}
    for key, w in target.items():
        old = state.get(key)
        if old is None or old.shape == w.shape:
            out[key] = w if old is None else old
        elif old.ndim == w.ndim and old.shape[0] == w.shape[0] and old.shape[2:] == w.shape[2:] \
                and old.shape[1] < w.shape[1]:
            new = torch.zeros_like(w)
            new[:, : old.shape[1]] = old
            out[key] = new
        else:
            raise ValueError(f"refiner weight {key}: {tuple(old.shape)} does not fit {tuple(w.shape)}")
    return out


def apply_refiner(refiner: nn.Module, decoded: torch.Tensor, degraded: torch.Tensor, base: str,
                  noise_level: torch.Tensor | float | None = None,
                  context: torch.Tensor | None = None) -> torch.Tensor:
    """decoded, degraded (N, 1, *S) in the model range -> refined (N, 1, *S) = base + refiner([d, y(, s)]).

    ``base`` is the model's (``ModelBundle.refiner_base``; in training ``refine.base``): 'degraded' or 'decoded'.
    ``noise_level`` (a float or (N,) in [0, 1], the level the U-Net is given) is passed to refiners trained with
    a noise map (``RefinerSpec.noise_map``) as a constant third channel, and must be None for the others.
    ``context`` (N, 2 k, *S): the degraded neighbouring slices of a 2.5D refiner (``medldm.data.condition.neighbour_slices``)."""
    if base not in BASES:
        raise ValueError(f"refiner base {base!r}: expected one of {', '.join(BASES)}")
    degraded = degraded.to(decoded.dtype)
    parts = [decoded, degraded]
    if noise_level is not None:
        lev = torch.as_tensor(noise_level, dtype=decoded.dtype, device=decoded.device).reshape(-1)
        lev = lev.expand(decoded.shape[0]) if lev.numel() == 1 else lev
        parts.append(lev.view(-1, *([1] * (decoded.ndim - 1))).expand_as(decoded))
    if context is not None and context.shape[1]:
        parts.append(context.to(decoded.dtype))
    res = refiner(torch.cat(parts, dim=1)).to(decoded.dtype)
    return (degraded if base == "degraded" else decoded) + res

