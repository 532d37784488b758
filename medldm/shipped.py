"""Pretrained model folders shipped inside the package: names, descriptions, and ``-m NAME`` resolution.

Each shipped model is an ordinary model folder (``config.yaml`` + ``*.safetensors`` + ``extra.json``, see
:mod:`medldm.models.folder`) under ``medldm/assets/models/<name>/``, trained by ``medldm train`` with the config
``configs/shipped/<name>.yaml`` on real scans from registry packages that are NOT the scans ``medldm demo``
evaluates on (docs/models.md). Beside the weights, ``card.json`` records how the model was made: the training
command, data, steps, wall time, hardware, and validation figures (training-pool validation scans, and the
held-out demo scans once measured).

``resolve_model(name_or_path) -> Path`` turns what a user gives to ``-m`` into a model folder; ``card(name)``
reads a model's card (``medldm models``). Making the shipped folders (export from a training run, validation,
held-out figures) is maintainer tooling: ``tools/shipped_models.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medldm.io.errors import CaseError

ASSETS = Path(__file__).resolve().parent / "assets" / "models"
CARD_FILE = "card.json"


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
    ShippedModel("mr-denoise-2d", "denoise", "MR denoising, 2D slice by slice (Gaussian noise; the noise level is "
                 "estimated per scan)", "configs/shipped/mr_denoise_2d.yaml"),
    ShippedModel("mr-sr2x-2d", "sr", "MR super-resolution x2 in-plane, 2D slice by slice (output grid: twice the "
                 "in-plane matrix, same physical extent)", "configs/shipped/mr_sr2x_2d.yaml"),
    ShippedModel("mr-synth-2d", "synthesis", "MR slice synthesis, unconditional, 64 x 64", "configs/shipped/mr_synth_2d.yaml"),
]}


def installed_models() -> dict[str, ShippedModel]:
    """The shipped models whose folders are present in this installation."""
    return {n: m for n, m in SHIPPED.items() if (m.path / "config.yaml").is_file()}


def resolve_model(name_or_path: str | Path) -> Path:
    """A model folder for ``-m``: an existing folder as given, else the folder of the shipped model of that name.

    A folder wins over a name, so a local folder called like a shipped model is used as the user typed it.
    Raises ``CaseError`` (one line: what is wrong, what to do) when it is neither.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
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


def enhance(model: str | Path, img, *, seed: int = 0, batch_size: int = 4):
    """Run a shipped (or any) sr/denoise model on a scan (X, Y, Z) MetaTensor with the inference pipeline
    (``medldm.pipelines.enhance``): its default sampler and steps, 2D slices processed in overlapping windows of
    twice the training size (the networks' normalization layers saw training-sized images, not 1024 x 1024
    slices). Returns the enhanced MetaTensor in the input's units (SR: on the x2 grid)."""
    from medldm.models import load_model
    from medldm.pipelines.enhance import EnhanceOptions, Enhancer

    enh = Enhancer(load_model(resolve_model(model)))
    return enh.enhance(img, EnhanceOptions(seed=seed, batch_size=batch_size, window=enh.default_window)).image


def card(name: str) -> dict:
    """The model card (``card.json``) of a shipped model; {} when absent."""
    f = SHIPPED[name].path / CARD_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def folder_bytes(path: Path) -> int:
    """Total size of the files of a model folder."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
