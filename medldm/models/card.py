"""The model card: what a model folder's ``extra.json`` says, as one typed, validated dataclass.

The training stages write it (``ModelCard.to_extra()`` -> ``extra.json``); :func:`medldm.models.folder.load_model`
reads it once (:func:`read_card`: the folder's ``config.yaml`` sections and ``extra.json`` -> :class:`ModelCard`)
and every pipeline reads its typed fields (``card.task``, ``card.factor``, ``card.degrade``, ``card.refiner``, ...)
instead of looking keys up with local defaults. Folders written by older medldm versions go through one function,
:func:`migrate`, before they are parsed; an unknown top-level key of ``config.yaml`` or ``extra.json`` (a typo such
as ``tsak:``) is refused with the nearest valid key (docs/limits.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from medldm.config import ConfigError, doc_field, from_mapping, to_mapping
from medldm.models.config import DegradeConfig, DiffusionConfig, UNetConfig, VAEConfig, validate
from medldm.models.refiner import IGNORED_KEYS, LEGACY_SPEC, RefinerSpec

Task = Literal["sr", "denoise", "thinslice", "synthesis"]

#: top-level keys of a model folder's ``config.yaml``: the training config that made it (``medldm.train.schema.
#: TrainingConfig``'s sections; the networks are rebuilt from ``vae`` / ``unet`` / ``diffusion``; ``model:``, an
#: older layout nesting those three, is rewritten by ``migrate`` first). A test keeps this set equal to the schema's.
CONFIG_KEYS = frozenset({"stage", "task", "condition", "spatial_dims", "seed", "vae_path", "ldm_path", "data", "augment",
                         "degrade", "vae", "unet", "diffusion", "vae_train", "ldm_train", "refine", "engine"})
NETWORK_SECTIONS = ("vae", "unet", "diffusion")


class CardError(ConfigError):
    """A model folder's config.yaml or extra.json is invalid: ``file`` names which, ``key`` the top-level key at
    fault; the message (without the file) names the key and what is wrong."""

    def __init__(self, file: str, key: str, message: str):
        super().__init__(message)
        self.file, self.key = file, key


@dataclass(frozen=True)
class Normalization:
    """How the training scans were normalized (``extra.json["normalization"]``)."""

    modality: str | None = doc_field("auto", "modality the training forced ('auto': from each scan)")
    ct_window: str = doc_field("full", "CT window name of the training recipe")
    method: str = doc_field("", "the recipe, in words")
    examples: list[dict] = doc_field([], "fitted parameters of a few training scans (method, lo, hi, ...)")

    @property
    def forced_modality(self) -> str | None:
        """The modality to normalize a scan as, None to detect it per scan."""
        return None if self.modality in (None, "auto") else self.modality

    @property
    def trained_methods(self) -> set[str]:
        """The normalization methods the training scans had (a scan normalized otherwise is out of domain)."""
        return {e["method"] for e in self.examples if isinstance(e, dict) and e.get("method")}


@dataclass
class ModelCard:
    """A model folder's contract: ``extra.json`` (written by the training stages) plus the network sections of
    ``config.yaml``. Build it with :func:`read_card`; write it with :meth:`to_extra`."""

    task: Task | None = doc_field(None, "what the model does; None for a folder that holds only a VAE from elsewhere")
    stage: Literal["vae", "ldm"] | None = doc_field(None, "the training stage that wrote the folder")
    spatial_dims: Literal[2, 3] | None = doc_field(None, "2 = slice model, 3 = volume model (default: the VAE's)")
    factor: int | None = doc_field(None, "image size / latent size (default: the VAE's down-sampling factor)")
    scale_factor: float = doc_field(1.0, "latent scale: z_model = z_vae * scale_factor")
    condition: Literal["space_to_depth", "mask"] | None = doc_field(
        None, "the U-Net's image condition: the degraded scan (space_to_depth) or a label map (mask)")
    mask_classes: int = doc_field(0, "mask models: label values 0..mask_classes-1")
    mask_method: str | None = doc_field(None, "mask models: how the training label maps were made")
    degrade: DegradeConfig | None = doc_field(None, "sr / denoise / thinslice: how the training pairs were made")
    noise_level_max: float = doc_field(0.0, "the noise sigma (model units) that the U-Net's level 1.0 stands for")
    normalization: Normalization = field(default_factory=Normalization, metadata={"doc": "intensity recipe"})
    patch_size: tuple[int, ...] | None = doc_field(None, "training crop (pixels)")
    resize_to: tuple[int, ...] | None = doc_field(None, "size the training images were resized to")
    slice_axis: int = doc_field(2, "2D models: the array axis the training sliced along")
    class_from: str = doc_field("none", "where the class labels came from")
    class_names: tuple[str, ...] = doc_field((), "class-conditional models: the name of each label")
    refiner: RefinerSpec | None = doc_field(None, "the stage-3 refiner, when the folder has one")
    # provenance: written, shown, never read to run the model
    train_scans: list = doc_field([], "training scans")
    val_scans: list = doc_field([], "validation scans")
    val_metrics: dict = doc_field({}, "validation figures of the stage that wrote the folder")
    vae_val_metrics: dict = doc_field({}, "validation figures of the VAE stage")
    refine_val_metrics: dict = doc_field({}, "validation figures of the refine stage")
    metric_range: str = doc_field("", "the range the validation figures were measured in")
    # config.yaml's network sections (not written to extra.json)
    vae: VAEConfig | None = field(default=None, metadata={"doc": "config.yaml: vae", "config": True})
    unet: UNetConfig | None = field(default=None, metadata={"doc": "config.yaml: unet", "config": True})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig,
                                       metadata={"doc": "config.yaml: diffusion", "config": True})

    def __post_init__(self) -> None:
        if self.vae is not None:
            if self.factor is None:
                self.factor = self.vae.downsample_factor
            if self.spatial_dims is None:
                self.spatial_dims = self.vae.spatial_dims
        if self.factor is not None and not 1 <= self.factor <= 1 << 10:
            raise ConfigError(f"factor = {self.factor!r}: must be a positive integer")
        if not 0 < abs(self.scale_factor) < 1e6:
            raise ConfigError(f"scale_factor = {self.scale_factor!r}: must be a finite non-zero number")
        for key in ("resize_to", "patch_size"):
            v = getattr(self, key)
            if v is not None and (not 1 <= len(v) <= 3 or not all(1 <= d <= 1 << 16 for d in v)):
                raise ConfigError(f"{key} = {list(v)!r}: must be a list of 1..3 positive sizes")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"slice_axis = {self.slice_axis!r}: must be 0, 1 or 2")

    @property
    def training_size(self) -> tuple[int, ...]:
        """The image size the model was trained on: ``resize_to``, else ``patch_size``, else 64 per side."""
        return tuple(self.resize_to or self.patch_size or (64,) * int(self.spatial_dims or 2))

    def to_extra(self) -> dict[str, Any]:
        """The ``extra.json`` mapping (YAML/JSON-safe; config.yaml's sections left out)."""
        out = {}
        for name, f in self.__dataclass_fields__.items():
            if f.metadata.get("config"):
                continue
            v = getattr(self, name)
            out[name] = v.to_extra() if isinstance(v, RefinerSpec) else to_mapping(v)
        return out


#: top-level keys of ``extra.json``: the card's fields but config.yaml's sections
EXTRA_KEYS = frozenset(k for k, f in ModelCard.__dataclass_fields__.items() if not f.metadata.get("config"))


def migrate(config: Mapping[str, Any], extra: Mapping[str, Any]) -> tuple[dict, dict]:
    """Folders written by older medldm versions -> today's layout: the one place that knows their history.

    * ``config.yaml`` with the networks nested under ``model:`` -> top-level ``vae`` / ``unet`` / ``diffusion``
      (a top-level section wins);
    * ``extra.json`` null entries written for "not applicable" (``degrade``, ``noise_level_max``,
      ``mask_classes``, ``class_names``, ``condition``) -> the card's defaults;
    * sr / denoise / thinslice folders without ``condition`` were trained with ``space_to_depth``;
    * the refiner spec: keys that folders written before they existed were trained with (``norm: instance``,
      ``base: decoded``), and ``apply`` (a dotted import path nothing reads) dropped.
    """
    config, extra = dict(config), dict(extra)
    nested = config.pop("model", None)
    if isinstance(nested, Mapping):
        for k in NETWORK_SECTIONS:
            if k in nested and k not in config:
                config[k] = nested[k]
    for k in ("degrade", "noise_level_max", "mask_classes", "mask_method", "class_names", "condition", "factor",
              "patch_size", "resize_to", "stage", "task", "spatial_dims", "refiner"):
        if k in extra and extra[k] is None:
            del extra[k]
    if extra.get("task") in ("sr", "denoise", "thinslice") and "condition" not in extra:
        extra["condition"] = "space_to_depth"
    if not extra.get("refiner"):
        extra.pop("refiner", None)
    elif isinstance(extra["refiner"], Mapping):
        raw = extra["refiner"]
        extra["refiner"] = {**LEGACY_SPEC, **{k: v for k, v in raw.items() if k not in IGNORED_KEYS}}
    return config, extra


def read_card(config: Mapping[str, Any], extra: Mapping[str, Any]) -> ModelCard:
    """``config.yaml`` and ``extra.json`` of a model folder (parsed mappings) -> the validated :class:`ModelCard`.

    Raises :class:`CardError` (the file, the top-level key, and a message naming the key): an unknown top-level key
    (with the nearest valid one), a section that is not a mapping, a wrong type or range."""
    config, extra = migrate(config, extra)
    _known_keys("config.yaml", config, CONFIG_KEYS)
    _known_keys("extra.json", extra, EXTRA_KEYS)
    nets: dict[str, Any] = {}
    for name, cls in (("vae", VAEConfig), ("unet", UNetConfig), ("diffusion", DiffusionConfig)):
        sec = config.get(name)
        if sec is None:
            continue
        if not isinstance(sec, Mapping):
            raise CardError("config.yaml", name, f"section {name!r} is a {_kind(sec)}, not a mapping of settings")
        try:
            nets[name] = from_mapping(cls, sec, prefix=name)
            if name != "diffusion":
                validate(nets[name], name)
        except (ValueError, TypeError) as exc:
            raise CardError("config.yaml", name, _one_line(exc)) from None
    for name, value in extra.items():  # one key at a time, so the error names the key at fault
        try:
            from_mapping(ModelCard, {name: value})
        except (ValueError, TypeError) as exc:
            raise CardError("extra.json", name, _one_line(exc)) from None
    card = from_mapping(ModelCard, extra)
    for name, v in nets.items():
        setattr(card, name, v)
    try:
        card.__post_init__()  # defaults that come from the VAE section, ranges
    except ValueError as exc:
        raise CardError("extra.json", str(exc).split(" ", 1)[0], _one_line(exc)) from None
    if card.condition == "mask" and not 1 <= card.mask_classes <= 255:
        raise CardError("extra.json", "mask_classes", f"mask_classes = {card.mask_classes!r}: a mask model needs "
                        "1..255 label values")
    return card


def _known_keys(file: str, data: Mapping[str, Any], valid) -> None:
    for key in data:
        if key not in valid:
            near = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(valid))}"
            raise CardError(file, str(key), f"unknown key {key!r}; {hint}")


def _kind(obj: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(obj),
                                                                                        type(obj).__name__)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")
