"""Pretrained model folders shipped inside the package: names, descriptions, and ``-m NAME`` resolution.

Each shipped model is an ordinary model folder (``config.yaml`` + ``*.safetensors`` + ``extra.json``, see
:mod:`medldm.models.folder`) under ``medldm/assets/models/<name>/``, trained by ``medldm train`` with the config
``configs/shipped/<name>.yaml`` on real scans from registry packages that are NOT the scans ``medldm demo``
evaluates on (docs/models.md). Beside the weights, ``card.json`` records how the model was made: the training
command, data, steps, wall time, hardware, and validation figures (training-pool validation scans, and the
held-out demo scans once measured).

``resolve_model(name_or_path) -> Path`` turns what a user gives to ``-m`` (or ``medldm.load_model``) into a model
folder: a model folder, a training run's folder (``RUN_DIR`` -> ``RUN_DIR/model``) or a shipped name;
``open_model(name_or_path, kind, device) -> OpenedModel`` is the one way every entry point opens a model (``medldm
enhance`` / ``synthesize`` / ``listen``, ``enhance`` below, the demo): resolve, load (each file read once, hashed
as read), the runner of its task; ``card(name)`` reads a model's card (``medldm models``); ``enhance(name_or_path,
img, **options)`` runs an sr/denoise model on a MetaTensor, a thin call to what ``medldm enhance`` runs, with the
same defaults.
Making the shipped folders (export from a training run, validation, held-out figures) is maintainer tooling:
``tools/shipped_models.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medldm.io.errors import CaseError

ASSETS = Path(__file__).resolve().parent / "assets" / "models"
CARD_FILE = "card.json"
RUN_MODEL = "model"  # the final model folder inside a training run's folder (medldm train -o RUN_DIR)


@dataclass(frozen=True)
class ShippedModel:
    name: str
    task: str  # "denoise" | "sr" | "synthesis" (the model folder's extra.json["task"])
    description: str
    config: str  # training config, relative to the repository root

    @property
    def path(self) -> Path:
        return ASSETS / self.name


SHIPPED: dict[str, ShippedModel] = {m.name: m for m in [
    ShippedModel("mr-denoise-2d", "denoise", "MR denoising, 2D slice by slice, blind: Gaussian or Rician (magnitude) "
                 "noise, the level estimated per scan", "configs/shipped/mr_denoise_2d.yaml"),
    ShippedModel("mr-denoise-25d", "denoise", "MR denoising with 3D context (2.5D): mr-denoise-2d's diffusion "
                 "output refined with the two noisy slices on each side; blind, Gaussian or Rician",
                 "configs/shipped/mr_denoise_25d.yaml"),
    ShippedModel("mr-sr2x-2d", "sr", "MR super-resolution x2 in-plane, 2D slice by slice (output grid: twice the "
                 "in-plane matrix, same physical extent)", "configs/shipped/mr_sr2x_2d.yaml"),
    ShippedModel("mr-synth-2d", "synthesis", "MR slice synthesis, 128 x 128, conditioned on contrast (T1w, T2w) x "
                 "slice position (4 bins along the slice axis; classes T1w/position-0 .. T2w/position-3), "
                 "classifier-free guidance", "configs/shipped/mr_synth_2d.yaml"),
    ShippedModel("mr-synth-mask-2d", "synthesis", "MR slice synthesis, 128 x 128, following a tissue label map "
                 "(background + 3 intensity classes): image/label pairs with `medldm synthesize --mask`",
                 "configs/shipped/mr_synth_mask_2d.yaml"),
    ShippedModel("mr-thinslice-4x", "thinslice", "MR thick -> thin slices, x4 through-plane (box slice profile; "
                 "output grid: 4 x the slices, same physical extent; 2D model on the sagittal and coronal "
                 "reformats, fused)", "configs/shipped/mr_thinslice_4x.yaml"),
]}


def installed_models() -> dict[str, ShippedModel]:
    """The shipped models whose folders are present in this installation."""
    return {n: m for n, m in SHIPPED.items() if (m.path / "config.yaml").is_file()}


def resolve_model(name_or_path: str | Path) -> Path:
    """A model folder for ``-m`` / ``medldm.load_model``: a model folder as given; the run folder that
    ``medldm train -o RUN_DIR`` wrote (resolved to ``RUN_DIR/model``); else the folder of the shipped model of
    that name.

    A folder wins over a name, so a local folder called like a shipped model is used as the user typed it.
    Raises ``CaseError`` (one line: what is wrong, what to do) when it is none of these.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return _model_folder(p)
    name = str(name_or_path)
    if name in SHIPPED:
        folder = SHIPPED[name].path
        if not (folder / "config.yaml").is_file():
            raise CaseError(name, "shipped model is missing from this installation",
                            "reinstall medldm (pip install .), or train it: medldm train " + SHIPPED[name].config)
        return folder
    known = ", ".join(SHIPPED)
    raise CaseError(name, "no such model folder or shipped model name",
                    f"give a folder written by `medldm train`, or one of: {known} (see `medldm models`)")


def _model_folder(folder: Path) -> Path:
    """``folder`` if it is a model folder, ``folder/model`` if it is a training run's folder.

    A run folder (``medldm train -o RUN_DIR``) holds the resolved *training* config as ``config.yaml`` but no
    weights, and its final model folder as ``model/``; a model folder holds ``config.yaml`` and ``*.safetensors``.
    """
    has_weights = any(folder.glob("*.safetensors"))
    if not has_weights and (folder / RUN_MODEL / "config.yaml").is_file():
        return folder / RUN_MODEL
    if not has_weights:
        stages = [folder / s / RUN_MODEL for s in ("refine", "ldm", "vae") if (folder / s / RUN_MODEL / "config.yaml").is_file()]
        if stages:  # a run stopped before its final model was published
            resume = (f"`medldm train {folder / 'config.yaml'} -o {folder} --resume`" if (folder / "config.yaml").is_file()
                      else "`medldm train CONFIG -o RUN_DIR --resume`")
            raise CaseError(folder, f"training run without its final {RUN_MODEL}/ folder (written when `medldm train` "
                                    "finishes)", f"finish the run with {resume}, or point -m at a stage's model: "
                                                 f"{', '.join(map(str, stages))}")
    if (folder / "config.yaml").is_file():
        return folder  # a model folder: medldm.models.load_model checks the rest
    raise CaseError(folder, f"not a model folder: neither config.yaml nor {RUN_MODEL}/config.yaml is in it",
                    "give the folder `medldm train -o RUN_DIR` wrote (RUN_DIR or RUN_DIR/model), a model folder, "
                    "or a shipped model name (see `medldm models`)")


@dataclass
class OpenedModel:
    """A model opened for a command: its folder, the loaded bundle (``bundle.card``: the model card) and the
    runner of its task (``Enhancer`` / ``ThinSliceEnhancer`` / ``Synthesizer``; ``runner.resolve(opts)`` fills in
    the model's defaults)."""

    path: Path
    bundle: Any  # medldm.models.folder.ModelBundle
    runner: Any

    @property
    def name(self) -> str:
        """What outputs name the model by: the shipped name, or the model folder's name."""
        return self.path.name

    @property
    def card(self):
        return self.bundle.card

    @property
    def hash(self) -> str:
        """SHA-256 of config.yaml and the weights (``model_hash``), computed while they were read."""
        return self.bundle.hash


def open_model(name_or_path: str | Path, kind: Literal["enhance", "synthesize"] = "enhance",
               device: str = "cpu") -> OpenedModel:
    """``-m MODEL`` -> an :class:`OpenedModel`: ``resolve_model`` (shipped name, model folder or run folder),
    ``load_model`` (checked, each file read once and hashed as read), the runner of its task on ``device``
    (``medldm.pipelines.factory.make_runner``). Raises ``CaseError`` (one line) for every fault of the folder
    and for a model whose task does not fit ``kind``."""
    # lazy: keeps medldm --help and `medldm models` free of torch
    from medldm.models import load_model
    from medldm.pipelines.factory import make_runner

    path = resolve_model(name_or_path)
    bundle = load_model(path)
    return OpenedModel(path=path, bundle=bundle, runner=make_runner(bundle, kind, device=device))


def enhance(model: str | Path, img, **options):
    """Enhance a scan (X, Y, Z) MetaTensor with an sr/denoise model: a shipped name, a model folder or a run folder.

    A thin call to what ``medldm enhance`` and ``medldm demo`` run: ``open_model(model).runner.enhance(img,
    EnhanceOptions(**options))`` (``medldm.pipelines.enhance``), with the same defaults: the model's sampler and
    steps, 2D slices and 3D volumes in overlapping latent windows of twice the training size, the pipeline's batch
    size, seed 0; ``options`` are ``EnhanceOptions`` fields (``seed``, ``steps``, ``device`` ...). Returns the
    enhanced MetaTensor in the input's units (SR: on the x2 grid)."""
    # lazy: as in open_model
    from medldm.pipelines.enhance import EnhanceOptions

    opts = EnhanceOptions(**options)
    return open_model(model, "enhance", device=opts.device).runner.enhance(img, opts).image


def card(name: str) -> dict:
    """The model card (``card.json``) of a shipped model; {} when absent."""
    f = SHIPPED[name].path / CARD_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def folder_bytes(path: Path) -> int:
    """Total size of the files of a model folder."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
