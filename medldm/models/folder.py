"""Model folders: the portable form of a trained model (diffusers-style ``save_pretrained``).

Layout::

    MODEL/
      config.yaml            # resolved config; sections ``vae``, ``unet``, ``diffusion`` (top level or under ``model``)
      vae.safetensors        # one file per module (``<name>.safetensors``); ``<name>_ema.safetensors`` preferred
      denoiser.safetensors   #   by ``load_model(ema=True)`` when present
      refiner.safetensors    # optional stage-3 refiner (sr / denoise), described by extra.json["refiner"]
      extra.json             # the model card (medldm.models.card.ModelCard): task, factor, scale_factor,
                             #   degradation, normalization, class names, refiner spec, provenance

Loading parses YAML/JSON and safetensors only: no pickle, no code execution.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load, save_file
from torch import nn

from medldm.io.atomic import atomic_dir
from medldm.io.errors import CaseError
from medldm.models.budget import DEFAULT_MAX_PARAMS, MAX_PARAMS_ENV, max_params, meta_shapes  # noqa: F401 (re-exported)
from medldm.models.budget import numel as _numel
from medldm.models.card import (  # noqa: F401 (CONFIG_KEYS, EXTRA_KEYS: the keys a folder may hold)
    CONFIG_KEYS,
    EXTRA_KEYS,
    NETWORK_SECTIONS,
    CardError,
    ModelCard,
    _kind,
    _one_line,
    read_card,
)
from medldm.models.config import DiffusionConfig, to_dict
from medldm.models.ema import unwrap
from medldm.models.refiner import RefinerSpec, build_from_spec

CONFIG_FILE = "config.yaml"
EXTRA_FILE = "extra.json"
_HINT = "point -m at a folder written by `medldm train`"
_FIX = "the model folder is damaged or was edited: copy it again, or point -m at a folder written by `medldm train`"
_REFINER_FIX = "the model folder is damaged: copy it again"

MAX_CONFIG_BYTES = 4 << 20  # config.yaml / extra.json: a few KB in real folders
MAX_CONFIG_NODES = 200_000  # YAML aliases can make a small file a huge tree
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class ModelBundle:
    """A loaded model folder. ``card`` is its validated contract (:class:`medldm.models.card.ModelCard`: task,
    factor, degradation, refiner spec, the network configs ...); ``vae`` / ``denoiser`` / ``refiner`` (stage 3, sr /
    denoise models trained with one) are in eval mode, or None when absent. ``config`` / ``extra``: the files as
    read (provenance records copy them; nothing reads settings from them)."""

    config: dict[str, Any]
    vae: nn.Module | None
    denoiser: nn.Module | None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    refiner: nn.Module | None = None
    card: ModelCard = field(default_factory=ModelCard)
    hash: str | None = None  # model_hash of the folder, computed while its files were read

    @property
    def diffusion(self) -> DiffusionConfig:
        """The ``DiffusionConfig`` of the folder (defaults when the section is absent)."""
        return self.card.diffusion

    @property
    def scale_factor(self) -> float:
        """Latent scale factor (z_model = z_vae * scale_factor), 1.0 when not stored."""
        return self.card.scale_factor

    @property
    def refiner_spec(self) -> RefinerSpec | None:
        """How the refiner is built and applied (``extra.json["refiner"]``); None without a refiner."""
        return self.card.refiner if self.refiner is not None else None

    @property
    def refiner_base(self) -> str | None:
        """What the refiner's residual is added to ('degraded' or 'decoded'), for ``apply_refiner``."""
        spec = self.refiner_spec
        return None if spec is None else spec.base

    def to(self, device: str | torch.device) -> ModelBundle:
        """Move the networks to ``device`` (in place) and return self."""
        for m in (self.vae, self.denoiser, self.refiner):
            if m is not None:
                m.to(device)
        return self


def save_model_folder(
    path: str | os.PathLike, *, config: dict[str, Any], modules: dict[str, nn.Module],
    extra: ModelCard | dict[str, Any] | None = None,
) -> Path:
    """Write ``config.yaml``, ``<name>.safetensors`` per module and ``extra.json`` (the model card,
    ``ModelCard.to_extra()``); the folder appears atomically.

    Tensors are saved contiguous, on CPU, in their own dtype. Returns the folder path.
    """
    path = Path(path)
    if isinstance(extra, ModelCard):
        extra = extra.to_extra()
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
    """Rebuild the networks named in ``config.yaml`` and load their safetensors (EMA weights when present).

    Nothing large is allocated before the folder is checked: the config's types and ranges
    (``medldm.models.config.validate``), the parameter count it implies (networks built on the ``meta``
    device, no memory) against ``MEDLDM_MAX_PARAMS``, and the tensor names and shapes it implies against the
    safetensors headers (read without loading the tensors). Every problem is a one-line ``CaseError`` naming
    the file of the folder at fault. The refiner (``refiner.safetensors``, built from ``extra.json["refiner"]``)
    goes through the same checks; its faults read ``refiner.safetensors: not a usable refiner (...)``.
    """
    # lazy: the network builders import MONAI; `medldm.models.folder` (model_hash, the card) stays free of it
    from medldm.models.denoiser import build_denoiser
    from medldm.models.vae import build_vae

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CaseError(path, f"not a model folder (no {CONFIG_FILE})", _HINT)
    config = _read_mapping(cfg_file, yaml.safe_load, "YAML")
    extra = _read_mapping(path / EXTRA_FILE, json.loads, "JSON") if (path / EXTRA_FILE).is_file() else {}
    ref_file = _weights(path, "refiner", ema)
    try:
        card = read_card(config, extra)
    except CardError as exc:
        file = path / exc.file
        if exc.key == "refiner" and ref_file is not None:
            raise CaseError(ref_file, f"not a usable refiner (extra.json: {exc})", _REFINER_FIX) from exc
        if exc.key == "refiner":  # a spec without weights: no refiner (as before the card)
            card = read_card(config, {k: v for k, v in extra.items() if k != "refiner"})
        elif exc.file == CONFIG_FILE and exc.key in NETWORK_SECTIONS and not str(exc).startswith("section"):
            raise CaseError(file, f"invalid model config: {exc}", _FIX) from exc
        else:
            raise CaseError(file, str(exc), _FIX) from exc
    vae_cfg, unet_cfg = card.vae, card.unet
    builders = {}
    if vae_cfg is not None and _weights(path, "vae", ema) is not None:
        builders["vae"] = lambda: build_vae(vae_cfg)
    if unet_cfg is not None and _weights(path, "denoiser", ema) is not None:
        if vae_cfg is None:
            raise CaseError(cfg_file, "invalid model config: a denoiser needs the vae section "
                            "(spatial_dims, latent_channels)", _FIX)
        builders["denoiser"] = lambda: build_denoiser(unet_cfg, vae_cfg.spatial_dims, vae_cfg.latent_channels)
    if not builders:
        raise CaseError(path, "model folder holds no vae/denoiser weights", _HINT)
    described_by = {name: cfg_file for name in builders}
    if ref_file is not None and card.refiner is not None:  # weights without a spec (or a spec alone): no refiner
        spec = card.refiner
        builders["refiner"] = lambda: build_from_spec(spec)
        described_by["refiner"] = path / EXTRA_FILE
    else:
        card.refiner = None
    budget = max_params()
    for name, build in builders.items():  # check everything before allocating anything
        file = _weights(path, name, ema)
        assert file is not None
        with _as_refiner_fault(name, file):
            n = _check_against_weights(build, file, described_by[name], name, budget)
        budget -= n
    nets: dict[str, nn.Module] = {}
    for name, build in builders.items():
        with _as_refiner_fault(name, _weights(path, name, ema)):
            try:
                nets[name] = build()
            except (ValueError, TypeError, RuntimeError) as exc:
                raise CaseError(described_by[name], f"invalid model config: {_one_line(exc)}", _FIX) from exc
    # every file read once: hashed (model_hash's order) and, for the weights used, loaded from the same bytes
    used = {_weights(path, name, ema): name for name in nets}
    h = hashlib.sha256()
    for f in _hashed_files(path):
        h.update(f.name.encode() + b"\0")
        if f not in used:
            _hash_file(h, f)
            continue
        data = f.read_bytes()
        h.update(data)
        with _as_refiner_fault(used[f], f):
            _load_into(nets[used[f]], f, path, data)
        del data
    vae, denoiser, refiner = nets.get("vae"), nets.get("denoiser"), nets.get("refiner")
    bundle = ModelBundle(config=config, vae=vae, denoiser=denoiser, extra=extra, path=path, refiner=refiner, card=card,
                         hash=h.hexdigest())
    for m in (vae, denoiser, refiner):
        if m is not None:
            m.eval().requires_grad_(False)
    return bundle.to(device)


def load_refiner(path: str | os.PathLike, *, ema: bool = True) -> nn.Module | None:
    """The stage-3 refiner of a model folder, or None when it has none: ``load_model(path).refiner`` (the whole
    folder is checked and loaded; keep the ``ModelBundle`` when the VAE and the denoiser are needed too)."""
    return load_model(path, ema=ema).refiner


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) over ``config.yaml`` and every ``*.safetensors`` of a model folder (names + bytes); a loaded
    folder has it as ``ModelBundle.hash`` (computed as its files are read)."""
    h = hashlib.sha256()
    for f in _hashed_files(Path(path)):
        h.update(f.name.encode() + b"\0")
        _hash_file(h, f)
    return h.hexdigest()


def _hashed_files(path: Path) -> list[Path]:
    files = [path / CONFIG_FILE, *sorted(path.glob("*.safetensors"))]
    for f in files:
        if not f.is_file():
            raise CaseError(path, f"model folder lacks {f.name}", _HINT)
    return files


def _hash_file(h, f: Path) -> None:
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


@contextlib.contextmanager
def _as_refiner_fault(name: str, file: Path | None):
    """Re-word a fault of the refiner's checks as ``refiner.safetensors: not a usable refiner (...)``."""
    try:
        yield
    except CaseError as exc:
        if name != "refiner":
            raise
        hint = exc.hint if MAX_PARAMS_ENV in exc.hint else _REFINER_FIX
        raise CaseError(file, f"not a usable refiner ({exc.reason})", hint) from exc


def _weights(path: Path, name: str, ema: bool) -> Path | None:
    for cand in ([f"{name}_ema", name] if ema else [name]):
        f = path / f"{cand}.safetensors"
        if f.is_file():
            return f
    return None


def read_safetensors_header(file: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors file's JSON header, without reading the tensors.

    Checks that the header and every tensor's byte range lie inside the file and match dtype x shape, so a
    truncated or forged file is found before anything is allocated. Raises ``ValueError`` (one line).
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header length {n} does not fit the file's {size} bytes (truncated, or not safetensors)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the header is not JSON (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object (not a safetensors file)")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (dtype in _DTYPE_BYTES and isinstance(shape, list)
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"tensor {name!r}: malformed header entry")
        numel = _numel(shape)
        if end > data_bytes:
            raise ValueError(f"tensor {name!r} lies beyond the end of the file (truncated: {size} bytes)")
        if end - begin != numel * _DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes for a {dtype} tensor of shape {shape}")
        out[name] = (dtype, tuple(shape))
    return out


def _check_against_weights(build, file: Path, cfg_file: Path, name: str, budget: int) -> int:
    """Build ``name`` on the meta device (no memory), refuse it beyond ``budget`` parameters, compare its
    tensors with ``file``'s header. ``cfg_file``: the file that describes the network (config.yaml; extra.json
    for the refiner). Returns its parameter count."""
    try:
        expected = meta_shapes(build)
    except Exception as exc:  # MONAI / torch reject some combinations with their own error types
        raise CaseError(cfg_file, f"invalid model config: {_one_line(exc)}", _FIX) from exc
    n_cfg = sum(_numel(s) for s in expected.values())
    if n_cfg > budget:
        raise CaseError(cfg_file, f"the {name} it describes has {n_cfg:,} parameters, more than the "
                        f"{max_params():,} allowed", f"a damaged or hostile config.yaml? copy the model folder "
                        f"again; if the model really is that large, set {MAX_PARAMS_ENV}")
    try:
        header = read_safetensors_header(file)
    except (OSError, ValueError) as exc:
        raise CaseError(file, f"{file.name} is not a readable safetensors file ({_one_line(exc)})", _FIX) from exc
    n_file = sum(_numel(s) for _, s in header.values())
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    reshaped = [k for k in expected if k in header and header[k][1] != expected[k]]
    if missing or unexpected or reshaped:
        bad = (missing or unexpected or reshaped)[0]
        raise CaseError(
            cfg_file,
            f"{file.name} does not match {cfg_file.name} ({cfg_file.name} describes {n_cfg:,} parameters, {file.name} "
            f"holds {n_file:,}; {len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} reshaped "
            f"tensors, e.g. {bad})",
            f"the config or the weights are corrupt, or come from another model: keep {cfg_file.name} and weights "
            "together (copy the model folder again)",
        )
    return n_cfg


def _read_mapping(file: Path, parse, kind: str) -> dict[str, Any]:
    """A YAML/JSON file of a model folder that must hold a mapping (small, no alias bombs)."""
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CaseError(file, f"{size:,} bytes: far too large for a model folder's {file.name}", _FIX)
        data = parse(file.read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaseError(file, f"unreadable model config ({exc.__class__.__name__}: {_one_line(exc)})", _FIX) from exc
    except OSError as exc:
        raise CaseError(file, f"cannot read it ({exc.strerror or exc})", "check the model folder's permissions") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CaseError(file, f"holds a {kind} {_kind(data)}, not a mapping of settings", _FIX)
    if _count_nodes(data, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
        raise CaseError(file, f"more than {MAX_CONFIG_NODES:,} entries (YAML aliases?)", _FIX)
    return data


def _count_nodes(obj: Any, limit: int) -> int:
    """Entries of a parsed YAML/JSON tree, counting shared (aliased) nodes each time; stops past ``limit``."""
    count, stack = 0, [obj]
    while stack and count <= limit:
        o = stack.pop()
        count += 1
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return count


def _load_into(module: nn.Module, file: Path, folder: Path, data: bytes) -> None:
    """Load ``module``'s weights from ``data``, the bytes of ``file``."""
    try:
        state = load(data)
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
        return _plain(to_dict(obj))
    return obj
