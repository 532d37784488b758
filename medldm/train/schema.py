"""The training config schema: one YAML file = one :class:`TrainingConfig`.

Sections: ``data``, ``augment``, ``degrade`` (SR / denoising pairs), ``vae`` / ``unet`` / ``diffusion``
(network and process, from :mod:`medldm.models.config` and :mod:`medldm.diffusion.config`),
``vae_train`` / ``ldm_train`` (optimisation per stage) and ``engine`` (device, precision, speed).
:func:`load_config` is the one call a user needs::

    cfg = load_config("configs/sr_2d.yaml", overrides=["ldm_train.steps=500"])

docs/training.md's reference table is generated from these fields by ``python tools/gen_config_docs.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from medldm.config import ConfigError, doc_field, load_dataclass
from medldm.models.config import MAX_CONTEXT, DegradeConfig, DiffusionConfig, UNetConfig, VAEConfig, validate


@dataclass
class DataConfig:
    """Where the scans come from and how training samples are cut from them."""

    train: list[str] = doc_field([], "scans: folders (walked recursively), list files (.txt, one path a line), "
                                     "NIfTI/DICOM paths, or pkg://PACKAGE/path inside an installed package")
    val: list[str] = doc_field([], "validation scans of OTHER subjects; empty = split train by scan")
    val_fraction: float = doc_field(0.2, "fraction of train scans held out when val is empty (by scan, never by slice)")
    modality: Literal["auto", "CT", "MR"] = doc_field("auto", "normalization: CT = HU window, MR = percentiles; auto = from the scan")
    ct_window: str = doc_field("full", "CT window name for normalization (medldm.data.intensity.CT_WINDOWS)")
    slice_axis: Literal[0, 1, 2] = doc_field(2, "2D models: array axis the slices are taken along")
    reformat: bool = doc_field(False, "2D models: also train on the planes along the other two axes of volumes whose "
                                      "pixels in that plane are near-square (spacing ratio <= 1.25) and at least a "
                                      "patch wide: all three orientations of isotropic volumes")
    patch_size: tuple[int, ...] = doc_field((64, 64), "training crop in pixels (2 or 3 values); a multiple of the VAE factor")
    resize_to: tuple[int, ...] | None = doc_field(None, "resize each slice/volume (padded to square first) to this size; "
                                                      "null = native resolution with random crops")
    min_foreground: float = doc_field(0.05, "2D: skip slices with less than this fraction of voxels above the background")
    class_from: Literal["none", "source", "slice_position", "contrast_position"] = doc_field(
        "none", "class label for synthesis: index of the train entry; slice position bin (num_classes bins); or "
        "contrast x slice position (data.contrasts; num_classes = distinct contrasts x position bins)")
    contrasts: list[str] = doc_field([], "class_from contrast_position: the contrast/sequence of each data.train "
                                         "entry, in order (e.g. T1, EPI); entries of one name share a class")
    val_contrasts: list[str] = doc_field([], "class_from contrast_position: the same for each data.val entry "
                                             "(names from data.contrasts)")
    mask_classes: int = doc_field(4, "condition mask: label classes of the tissue maps medldm derives per slice/volume "
                                     "(0 = background, 1.. = intensity clusters, darkest first; medldm.data.tissue)")
    batch_size: int = doc_field(8, "samples per optimiser step per process (before gradient accumulation)")
    num_workers: int = doc_field(0, "DataLoader worker processes (0 = in the training process)")
    cache: Literal["memory", "disk"] = doc_field("memory", "MONAI CacheDataset (memory) or PersistentDataset (disk): scans are parsed once")
    cache_dir: str | None = doc_field(None, "PersistentDataset folder (cache: disk); default OUT_DIR/cache")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size: must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.class_from == "contrast_position":
            if len(self.contrasts) != len(self.train):
                raise ValueError(f"data.contrasts: class_from 'contrast_position' needs one contrast name per "
                                 f"data.train entry ({len(self.train)}), got {len(self.contrasts)}")
            if self.val and len(self.val_contrasts) != len(self.val):
                raise ValueError(f"data.val_contrasts: needs one contrast name per data.val entry ({len(self.val)}), "
                                 f"got {len(self.val_contrasts)}")
            unknown = sorted(set(self.val_contrasts) - set(self.contrasts))
            if unknown:
                raise ValueError(f"data.val_contrasts: {unknown[0]!r} is not a training contrast "
                                 f"({', '.join(self.contrast_names)})")
        if self.reformat and self.class_from in ("slice_position", "contrast_position"):
            raise ValueError(f"data.reformat: slice positions of reformatted planes are not comparable; it cannot "
                             f"be combined with class_from {self.class_from!r}")
        if (self.contrasts or self.val_contrasts) and self.class_from != "contrast_position":
            raise ValueError("data.contrasts / data.val_contrasts: only for class_from 'contrast_position'")

    @property
    def contrast_names(self) -> list[str]:
        """The distinct contrasts of ``contrasts`` in first-seen order (the contrast part of the class index)."""
        return list(dict.fromkeys(self.contrasts))

    def contrast_of(self, val: bool) -> list[int]:
        """Contrast index of each data.train (``val``: data.val) entry; [] without contrast classes."""
        names = self.val_contrasts if val else self.contrasts
        return [self.contrast_names.index(c) for c in names]

    def class_names(self, num_classes: int) -> list[str] | None:
        """Names of the synthesis classes (stored in the model folder for ``--condition class=NAME``)."""
        if self.class_from == "source":
            return list(self.train)
        if self.class_from == "slice_position":
            return [f"position-{b}" for b in range(num_classes)]
        if self.class_from == "contrast_position":
            bins = num_classes // max(len(self.contrast_names), 1)
            return [f"{c}/position-{b}" for c in self.contrast_names for b in range(bins)]
        return None

@dataclass
class AugmentConfig:
    """MONAI augmentation applied on the fly to clean training samples (never to validation)."""

    enabled: bool = doc_field(True, "master switch")
    flip_prob: float = doc_field(0.5, "probability of a flip along each spatial axis")
    rotate_prob: float = doc_field(0.3, "probability of a small rotation")
    rotate_degrees: float = doc_field(10.0, "maximum rotation angle (degrees)")
    bias_field_prob: float = doc_field(0.3, "probability of a smooth multiplicative bias field (MR)")
    contrast_prob: float = doc_field(0.3, "probability of a gamma contrast change")
    gamma: tuple[float, float] = doc_field((0.7, 1.5), "gamma range of the contrast change")


@dataclass
class StageTrainConfig:
    """Optimisation shared by the three stages (``vae_train``, ``ldm_train``, ``refine``): steps, learning rate,
    warm-up, schedule, gradient accumulation and clipping, EMA, logging and checkpoints. A stage section inherits
    these keys and may change their defaults; its own keys (losses, validation sampling, the refiner network)
    follow them."""

    _section: ClassVar[str] = "stage"  # the YAML section, for error messages

    steps: int = doc_field(2000, "optimiser steps")
    lr: float = doc_field(1e-4, "AdamW learning rate")
    weight_decay: float = doc_field(0.0, "AdamW weight decay")
    warmup_steps: int = doc_field(100, "linear learning-rate warm-up")
    lr_schedule: Literal["constant", "cosine"] = doc_field("constant", "after warm-up: constant, or cosine decay to 1 % at the last step")
    grad_accum: int = doc_field(1, "micro-batches per optimiser step")
    grad_clip: float = doc_field(1.0, "clip gradient norm (0 = off)")
    ema_decay: float = doc_field(0.0, "EMA of the weights (0 = off)")
    log_every: int = doc_field(10, "steps between CSV/TensorBoard log rows")
    val_every: int = doc_field(500, "steps between validation runs; 0 = only at the end")
    image_every: int = doc_field(500, "steps between PNG grids (0 = off)")
    ckpt_every: int = doc_field(500, "steps between checkpoints")
    val_max_items: int = doc_field(8, "validation slices/volumes evaluated (evenly spread)")

    def __post_init__(self) -> None:
        """The optimisation invariants, checked here once for every stage."""
        sec = self._section
        for name in ("steps", "grad_accum", "log_every", "ckpt_every", "val_max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{sec}.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_every", "image_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{sec}.{name}: must be >= 0 (0 = off), got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{sec}.lr: must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{sec}.{name}: must be a finite number >= 0, got {v}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{sec}.ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")


@dataclass
class VAETrainConfig(StageTrainConfig):
    """Stage 1 optimisation and losses."""

    _section: ClassVar[str] = "vae_train"

    lr: float = doc_field(1e-4, "AdamW learning rate (generator)")
    val_every: int = doc_field(500, "steps between validation runs (PSNR/SSIM); 0 = only at the end")
    image_every: int = doc_field(500, "steps between PNG grids of reconstructions (0 = off)")
    val_max_items: int = doc_field(16, "validation slices/volumes evaluated (evenly spread)")
    kl_weight: float = doc_field(1e-6, "weight of the KL term")
    ssim_weight: float = doc_field(0.0, "weight of 1 - SSIM (0 = off)")
    grad_weight: float = doc_field(0.0, "weight of the L1 loss between image gradients (0 = off)")
    adv_weight: float = doc_field(0.0, "weight of the patch adversarial loss (0 = off; MONAI PatchDiscriminator)")
    adv_start: int = doc_field(0, "step from which the adversarial loss is used")
    disc_lr: float = doc_field(1e-4, "discriminator learning rate")


@dataclass
class LDMTrainConfig(StageTrainConfig):
    """Stage 2 optimisation."""

    _section: ClassVar[str] = "ldm_train"

    steps: int = doc_field(5000, "optimiser steps")
    ema_decay: float = doc_field(0.999, "EMA of the U-Net weights saved in the model (0 = off)")
    val_every: int = doc_field(1000, "steps between validation runs (0 = only at the end)")
    image_every: int = doc_field(1000, "steps between PNG grids of samples (0 = off)")
    val_max_items: int = doc_field(8, "validation items sampled")
    val_sampling_steps: int = doc_field(20, "sampler steps for validation samples")


@dataclass
class RefineConfig(StageTrainConfig):
    """Stage 3 (sr / denoise): pixel-space refiner past the VAE ceiling (see docs/training.md)."""

    _section: ClassVar[str] = "refine"

    lr: float = doc_field(2e-4, "AdamW learning rate")
    warmup_steps: int = doc_field(50, "linear learning-rate warm-up")
    ema_decay: float = doc_field(0.0, "EMA of the refiner weights (0 = off)")
    val_every: int = doc_field(500, "steps between validation runs (0 = only at the end)")
    val_max_items: int = doc_field(8, "validation items")
    enabled: bool = doc_field(False, "train a refiner: clean ~ base + net([decoded, degraded]) at full resolution")
    features: tuple[int, int, int, int, int, int] = doc_field((16, 32, 64, 128, 256, 16),
                                                              "MONAI BasicUNet features (6 values)")
    base: Literal["degraded", "decoded"] = doc_field(
        "degraded", "what the refiner's residual is added to: the degraded input (robust when the diffusion output "
        "is poor) or the decoded diffusion output")
    norm: Literal["none", "instance", "batch"] = doc_field(
        "none", "normalization layers of the refiner ('none': its output does not depend on the image size)")
    augment: bool = doc_field(True, "apply the config's augment section to the clean training crops")
    diffusion_channel: bool = doc_field(
        True, "false = ablation: the refiner sees the degraded input where the diffusion output would be (no "
        "sampling in training), to measure what the latent diffusion model adds; the model folder records it")
    noise_map: bool = doc_field(
        False, "denoise: give the refiner the noise level (the U-Net's, estimated per scan at inference) as a "
        "constant third input channel (FFDNet-style); needs unet.noise_level_cond")
    context: int = doc_field(
        0, "2D: neighbouring slices on each side the refiner also sees (2.5D; the degraded slices z-1, z+1, ...); "
        "0 = the slice alone")
    context_dropout: float = doc_field(
        0.0, "with refine.context: share of training items whose neighbours are replaced by the slice itself (what a "
        "single-slice scan gives at inference), so the refiner also learns to work without them")


@dataclass
class EngineConfig:
    """Device, precision and speed switches (GPU features are ignored on CPU)."""

    device: Literal["auto", "cpu", "cuda"] = doc_field("auto", "auto = cuda when available")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = doc_field("auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    channels_last: bool = doc_field(True, "channels-last memory format on CUDA")
    compile: bool = doc_field(False, "torch.compile the networks")
    flash_attention: bool = doc_field(True, "scaled-dot-product (flash) attention in MONAI blocks on CUDA")
    fused_adamw: bool = doc_field(True, "fused AdamW kernel on CUDA")
    tf32: bool = doc_field(True, "TF32 matmuls on CUDA")
    deterministic: bool = doc_field(False, "deterministic CUDA kernels (slower); CPU runs are always repeatable")
    num_threads: int = doc_field(0, "CPU threads for torch (0 = leave torch's default)")
    tensorboard: bool = doc_field(True, "write TensorBoard logs when the tensorboard package is installed")
    progress: bool = doc_field(True, "progress bar on stderr")


@dataclass
class TrainingConfig:
    """A training run: ``medldm train CONFIG.yaml -o OUT_DIR``."""

    stage: Literal["vae", "ldm", "both", "refine"] = doc_field(
        "both", "which stage(s) to train (refine: only the refiner, on the frozen VAE and U-Net of ldm_path)")
    task: Literal["synthesis", "sr", "denoise", "thinslice"] = doc_field(
        "synthesis", "what the diffusion model learns (thinslice: 2D, thick -> thin slices along one in-plane axis)")
    condition: Literal["none", "mask"] = doc_field(
        "none", "task synthesis: 'mask' = the image follows a tissue label map (one-hot, space-to-depth onto the "
        "latent grid, concatenated to the U-Net input; dropped with probability diffusion.cfg_dropout)")
    spatial_dims: Literal[2, 3] = doc_field(2, "2 = slice models, 3 = volume models")
    seed: int = doc_field(0, "seed of everything: init, data order, augmentation, degradations, noise")
    vae_path: str | None = doc_field(None, "stage ldm: trained VAE model folder (default OUT_DIR/vae/model)")
    ldm_path: str | None = doc_field(
        None, "stage refine: the model folder (VAE + U-Net, frozen) whose refiner is trained; a refiner it holds "
        "with the same features is the starting point (input channels it lacks, e.g. refine.context, start at zero)")
    data: DataConfig = doc_field(None, "")
    augment: AugmentConfig = doc_field(None, "")
    degrade: DegradeConfig = doc_field(None, "")
    vae: VAEConfig = doc_field(None, "")
    unet: UNetConfig = doc_field(None, "")
    diffusion: DiffusionConfig = doc_field(None, "")
    vae_train: VAETrainConfig = doc_field(None, "")
    ldm_train: LDMTrainConfig = doc_field(None, "")
    refine: RefineConfig = doc_field(None, "")
    engine: EngineConfig = doc_field(None, "")

    def __post_init__(self) -> None:
        for name, cls in (("data", DataConfig), ("augment", AugmentConfig), ("degrade", DegradeConfig),
                          ("vae", VAEConfig), ("unet", UNetConfig), ("diffusion", DiffusionConfig),
                          ("vae_train", VAETrainConfig), ("ldm_train", LDMTrainConfig), ("refine", RefineConfig),
                          ("engine", EngineConfig)):
            if getattr(self, name) is None:
                setattr(self, name, cls())
        self._check()

    @property
    def factor(self) -> int:
        """VAE down-sampling factor f (image size / latent size): ``VAEConfig.downsample_factor``."""
        return self.vae.downsample_factor

    def _check(self) -> None:
        nd = self.spatial_dims
        if self.vae.spatial_dims != nd:
            if self.vae.spatial_dims != 2:  # 2 is the default: follow the top level silently
                raise ConfigError(f"vae.spatial_dims={self.vae.spatial_dims} contradicts spatial_dims={nd}; "
                                  "set only the top-level spatial_dims")
            self.vae.spatial_dims = nd
        for section, name in ((self.vae, "vae"), (self.unet, "unet")):  # the ranges a model folder must keep to
            try:
                validate(section, name)
            except ValueError as exc:
                raise ConfigError(f"{exc} (a model folder with it would be refused too)") from None
        d = self.data
        if len(d.patch_size) != nd:
            raise ConfigError(f"data.patch_size: needs {nd} values for spatial_dims={nd}, got {list(d.patch_size)}")
        if d.resize_to is not None and len(d.resize_to) != nd:
            raise ConfigError(f"data.resize_to: needs {nd} values for spatial_dims={nd}, got {list(d.resize_to)}")
        f = self.factor
        for name, size in (("data.patch_size", d.patch_size), ("data.resize_to", d.resize_to or ())):
            if any(s % f for s in size):
                raise ConfigError(f"{name}: every value must be a multiple of the VAE factor {f} "
                                  f"(2 ** (len(vae.channels) - 1)), got {list(size)}")
        if d.resize_to is not None and any(p > r for p, r in zip(d.patch_size, d.resize_to, strict=True)):
            raise ConfigError("data.patch_size: must not exceed data.resize_to")
        # the vae / unet sections' own invariants (attention levels, GroupNorm groups, heads): VAEConfig / UNetConfig
        deg = self.degrade
        if self.task == "sr" and deg.kind not in ("downsample", "thick"):
            raise ConfigError(f"degrade.kind: task 'sr' needs 'downsample' or 'thick', got {deg.kind!r}")
        if self.task == "denoise" and deg.kind not in ("gaussian", "rician"):
            raise ConfigError(f"degrade.kind: task 'denoise' needs 'gaussian' or 'rician', got {deg.kind!r}")
        if deg.upsample == "cubic" and (self.task != "sr" or deg.kind != "downsample" or nd != 2):
            raise ConfigError("degrade.upsample: 'cubic' is for task 'sr' with degrade.kind 'downsample' and "
                              "spatial_dims 2 (torch has no tricubic interpolation)")
        if self.task == "sr" and deg.kind == "thick" and nd != 3:
            raise ConfigError("degrade.kind: 'thick' slices need spatial_dims 3")
        if self.task == "thinslice" and (deg.kind != "thick" or nd != 2 or deg.scale < 2):
            raise ConfigError("task 'thinslice': needs degrade.kind 'thick', degrade.scale >= 2 and spatial_dims 2")
        if self.task == "thinslice" and any(p % deg.scale for p in d.patch_size):
            raise ConfigError(f"data.patch_size: task 'thinslice' needs multiples of degrade.scale ({deg.scale})")
        # Conditioning the U-Net needs follows from the task: it is derived, not typed by hand.
        cond = self.in_channels * f ** nd if self.task in ("sr", "denoise", "thinslice") else 0
        if self.condition == "mask":
            if self.task != "synthesis":
                raise ConfigError(f"condition: 'mask' is for task 'synthesis', got task {self.task!r}")
            if d.mask_classes < 2:
                raise ConfigError(f"data.mask_classes: needs >= 2 (background + a tissue), got {d.mask_classes}")
            cond = d.mask_classes * f ** nd
        if self.unet.cond_channels not in (0, cond):
            raise ConfigError(f"unet.cond_channels: derived from the task ({cond}); leave it out of the config")
        self.unet.cond_channels = cond
        if self.task != "synthesis" and self.unet.num_classes:
            raise ConfigError("unet.num_classes: class conditioning is for task 'synthesis'")
        if self.task == "synthesis" and (d.class_from != "none") != (self.unet.num_classes > 0):
            raise ConfigError("data.class_from and unet.num_classes go together: set both (or neither)")
        if d.class_from == "contrast_position" and (self.unet.num_classes % len(d.contrast_names)
                                                    or self.unet.num_classes < len(d.contrast_names)):
            raise ConfigError(f"unet.num_classes: class_from 'contrast_position' needs a multiple of the "
                              f"{len(d.contrast_names)} contrasts (contrasts x position bins), got {self.unet.num_classes}")
        if d.class_from == "source" and self.unet.num_classes != len(d.train):
            raise ConfigError(f"unet.num_classes: class_from 'source' gives one class per data.train entry "
                              f"({len(d.train)}), got {self.unet.num_classes}")
        if self.refine.noise_map and (self.task != "denoise" or not self.unet.noise_level_cond):
            raise ConfigError("refine.noise_map: is for task 'denoise' with unet.noise_level_cond: true")
        if deg.rician_fraction > 0 and self.task != "denoise":
            raise ConfigError("degrade.rician_fraction: is for task 'denoise'")
        if self.refine.enabled and self.task == "synthesis":
            raise ConfigError("refine.enabled: the refiner is for tasks 'sr' and 'denoise'")
        if not 0 <= self.refine.context <= MAX_CONTEXT or (self.refine.context and nd != 2):
            raise ConfigError(f"refine.context: 0..{MAX_CONTEXT} neighbouring slices, for spatial_dims 2 only")
        if not 0.0 <= self.refine.context_dropout <= 1.0:
            raise ConfigError("refine.context_dropout: a share in [0, 1]")
        if self.stage == "refine" and not (self.ldm_path and self.refine.enabled):
            raise ConfigError("stage: 'refine' trains the refiner of a model folder: set ldm_path (a model folder "
                              "with a VAE and a U-Net) and refine.enabled: true")

    @property
    def in_channels(self) -> int:
        return self.vae.in_channels


def load_config(source: str | Path | Mapping, overrides: Iterable[str] = ()) -> TrainingConfig:
    """Load and validate a training config (YAML file path or mapping) with ``a.b=c`` overrides.

    Raises :class:`medldm.config.ConfigError` naming the key (and the nearest valid one) when it is invalid.
    """
    return load_dataclass(TrainingConfig, source, overrides)
