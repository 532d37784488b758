"""Contrast x slice-position classes for synthesis (issue 13 item 1: conditioning on "slice position along the head
axis and contrast/sequence where the training data has more than one"): class_from 'contrast_position'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medldm.config import ConfigError
from medldm.data.datasets import Item, ItemStore
from medldm.train.schema import load_config

CFG = Path(__file__).resolve().parents[1] / "configs" / "synthesis_2d_tiny.yaml"
CLASSES = ["data.class_from=contrast_position", "data.contrasts=[T1w, T2w]", "data.val_contrasts=[T2w]",
           "unet.num_classes=6"]


def test_labels_are_contrast_times_position_bin():
    """class = contrast index (first-seen order of data.contrasts) x bins + slice-position bin; the bins come from
    num_classes / contrasts, also for a store (validation) that holds only one of the contrasts."""
    items = [Item(torch.zeros(1, 8, 8), "a", source=0, position=0.1), Item(torch.zeros(1, 8, 8), "a", 0, 0.9),
             Item(torch.zeros(1, 8, 8), "b", source=1, position=0.5), Item(torch.zeros(1, 8, 8), "c", 2, 0.4)]
    store = ItemStore(items, (8, 8), 4, num_classes=6, class_from="contrast_position", contrast_of=[0, 1, 0],
                      n_contrasts=2)
    assert store.labels(np.arange(4)).tolist() == [0, 2, 4, 1]
    val = ItemStore(items[2:3], (8, 8), 4, num_classes=6, class_from="contrast_position", contrast_of=[0, 1],
                    n_contrasts=2)
    assert val.labels(np.array([0])).tolist() == [4]


def test_config_checks_and_class_names():
    cfg = load_config(CFG, CLASSES)
    assert cfg.data.contrast_names == ["T1w", "T2w"] and cfg.data.contrast_of(False) == [0, 1]
    assert cfg.data.contrast_of(True) == [1]
    assert cfg.data.class_names(6) == [f"{c}/position-{b}" for c in ("T1w", "T2w") for b in range(3)]
    bad = {
        "data.contrasts=[T1w]": "one contrast name per data.train entry",
        "data.val_contrasts=[PD]": "'PD' is not a training contrast",
        "unet.num_classes=5": "multiple of the 2 contrasts",
    }
    for override, msg in bad.items():
        with pytest.raises((ConfigError, ValueError), match=msg):
            load_config(CFG, [*CLASSES, override])
    with pytest.raises((ConfigError, ValueError), match="only for class_from 'contrast_position'"):
        load_config(CFG, ["data.contrasts=[T1w, T2w]"])


def test_contrast_model_trains_and_samples_by_name(tmp_path):
    """A tiny contrast x position model trains; its folder names the classes; ``--condition contrast=T2w
    --condition position=1`` picks class T2w/position-1, unknown names and half-given conditions are usage errors."""
    from medldm.cli import main
    from medldm.models import load_model
    from medldm.pipelines.synthesize import Synthesizer
    from medldm.train import train

    fast = ["vae_train.steps=4", "ldm_train.steps=4", "vae_train.ckpt_every=4", "ldm_train.ckpt_every=4",
            "vae_train.val_every=0", "ldm_train.val_every=0", "ldm_train.image_every=0", "vae_train.image_every=0",
            "diffusion.sampling_steps=2"]
    train(load_config(CFG, [*CLASSES, *fast]), tmp_path / "run")
    model = tmp_path / "run" / "model"
    syn = Synthesizer(load_model(model))
    assert syn.class_names == [f"{c}/position-{b}" for c in ("T1w", "T2w") for b in range(3)]
    assert syn.label_index(syn.class_name_for("T2w", "1")) == 4
    with pytest.raises(ValueError, match="give position=B too"):
        syn.class_name_for("T2w", None)
    with pytest.raises(ValueError, match="no class 'PD/position-0'"):
        syn.class_name_for("PD", 0)
    out = tmp_path / "out"
    assert main(["synthesize", "-m", str(model), "-n", "1", "-o", str(out), "--condition", "contrast=T2w",
                 "--condition", "position=1", "--quiet"]) == 0
    import json

    record = json.loads((out / "synth_00000.json").read_text())
    assert record["condition"] == {"class": 4, "class_name": "T2w/position-1"}, record
    assert main(["synthesize", "-m", str(model), "-n", "1", "-o", str(tmp_path / "o2"), "--condition",
                 "contrast=PD", "--condition", "position=0", "--quiet"]) == 2
    assert main(["synthesize", "-m", str(model), "-n", "1", "-o", str(tmp_path / "o3"), "--condition",
                 "class=0", "--condition", "position=0", "--quiet"]) == 2
