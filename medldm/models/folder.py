"""Model folders: the portable form of a trained model (diffusers-style ``save_pretrained``).

Layout::

    MODEL/
      config.yaml            # resolved config; sections ``vae``, ``unet``, ``diffusion`` (top level or under ``model``)
      vae.safetensors        # one file per module (``<name>.safetensors``); ``<name>_ema.safetensors`` preferred
      denoiser.safetensors   #   by ``load_model(ema=True)`` when present
      extra.json             # scale_factor, normalization params, class names, data hashes ...

Loading parses YAML/JSON and safetensors only: no pickle, no code execution.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from medldm.io.atomic import atomic_dir
from medldm.io.errors import CaseError
from medldm.models.config import UNetConfig, VAEConfig, from_dict

CONFIG_FILE = "config.yaml"
EXTRA_FILE = "extra.json"
_HINT = "point -m at a folder written by `medldm train`"


@dataclass
class ModelBundle:
    """A loaded model folder. ``vae`` / ``denoiser`` are in eval mode on CPU, or None when absent."""

    config: dict[str, Any]
    vae: nn.Module | None
    denoiser: nn.Module | None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def diffusion(self):
        """The ``DiffusionConfig`` of the folder (defaults when the section is absent)."""
        from medldm.diffusion.config import DiffusionConfig

        return from_dict(DiffusionConfig, model_sections(self.config).get("diffusion"))

    @property
    def scale_factor(self) -> float:
        """Latent scale factor (z_model = z_vae * scale_factor), 1.0 when not stored."""
        return float(self.extra.get("scale_factor", 1.0))

    def to(self, device: str | torch.device) -> ModelBundle:
        """Move the networks to ``device`` (in place) and return self."""
        for m in (self.vae, self.denoiser):
            if m is not None:
                m.to(device)
        return self


def model_sections(config: dict[str, Any]) -> dict[str, Any]:
    """The ``vae`` / ``unet`` / ``diffusion`` sections of a config (top level wins over ``model:``)."""
    nested = config.get("model") if isinstance(config.get("model"), dict) else {}
    return {k: config.get(k, nested.get(k)) for k in ("vae", "unet", "diffusion") if k in config or k in nested}


def save_model_folder(
    path: str | os.PathLike, *, config: dict[str, Any], modules: dict[str, nn.Module], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``config.yaml``, ``<name>.safetensors`` per module and ``extra.json``; the folder appears atomically.

    Tensors are saved contiguous, on CPU, in their own dtype. Returns the folder path.
    """
    path = Path(path)
    for name in modules:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"module name {name!r} must be alphanumeric/underscore (it becomes a file name)")
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(_plain(config), sort_keys=False))
        for name, module in modules.items():
            state = {k: v.detach().to("cpu").contiguous() for k, v in _state(module).items()}
            save_file(state, str(tmp / f"{name}.safetensors"), metadata={"format": "pt", "producer": "medldm"})
        (tmp / EXTRA_FILE).write_text(json.dumps(_plain(extra or {}), indent=2, sort_keys=True))
    return path


def load_model(path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild the networks named in ``config.yaml`` and load their safetensors (EMA weights when present)."""
    from medldm.models.denoiser import build_denoiser
    from medldm.models.vae import build_vae

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CaseError(path, f"not a model folder (no {CONFIG_FILE})", _HINT)
    try:
        config = yaml.safe_load(cfg_file.read_text()) or {}
        extra = json.loads((path / EXTRA_FILE).read_text()) if (path / EXTRA_FILE).is_file() else {}
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise CaseError(path, f"unreadable model config ({exc.__class__.__name__})", _HINT) from exc
    sections = model_sections(config)
    vae = denoiser = None
    try:
        vae_cfg = from_dict(VAEConfig, sections["vae"]) if sections.get("vae") is not None else None
        if vae_cfg is not None and _weights(path, "vae", ema) is not None:
            vae = build_vae(vae_cfg)
            _load_into(vae, _weights(path, "vae", ema), path)
        if sections.get("unet") is not None and _weights(path, "denoiser", ema) is not None:
            if vae_cfg is None:
                raise ValueError("a denoiser needs the vae section (spatial_dims, latent_channels)")
            unet_cfg = from_dict(UNetConfig, sections["unet"])
            denoiser = build_denoiser(unet_cfg, vae_cfg.spatial_dims, vae_cfg.latent_channels)
            _load_into(denoiser, _weights(path, "denoiser", ema), path)
    except (ValueError, TypeError) as exc:
        raise CaseError(path, f"invalid model config: {exc}", _HINT) from exc
    if vae is None and denoiser is None:
        raise CaseError(path, "model folder holds no vae/denoiser weights", _HINT)
    bundle = ModelBundle(config=config, vae=vae, denoiser=denoiser, extra=extra, path=path)
    for m in (vae, denoiser):
        if m is not None:
            m.eval().requires_grad_(False)
    return bundle.to(device)


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) over ``config.yaml`` and every ``*.safetensors`` of a model folder (names + bytes)."""
    path = Path(path)
    files = [path / CONFIG_FILE, *sorted(path.glob("*.safetensors"))]
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            raise CaseError(path, f"model folder lacks {f.name}", _HINT)
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _weights(path: Path, name: str, ema: bool) -> Path | None:
    for cand in ([f"{name}_ema", name] if ema else [name]):
        f = path / f"{cand}.safetensors"
        if f.is_file():
            return f
    return None


def _load_into(module: nn.Module, file: Path | None, folder: Path) -> None:
    assert file is not None
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise CaseError(folder, f"{file.name} is not a readable safetensors file ({exc})", _HINT) from exc
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        bad = (missing or unexpected or reshaped)[0]
        raise CaseError(
            folder,
            f"{file.name} does not match config.yaml ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(reshaped)} reshaped tensors, e.g. {bad})",
            "the weights were trained with another config; keep config.yaml and weights together",
        )
    module.load_state_dict(state, strict=True)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    from medldm.models.ema import unwrap

    return unwrap(module).state_dict()


def _plain(obj: Any) -> Any:
    """Tuples -> lists, numpy/torch scalars -> Python, Paths -> str (YAML/JSON-safe)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        from medldm.models.config import to_dict

        return _plain(to_dict(obj))
    return obj
