"""The model card (issue 21 item 1; issue 20 item 14): one typed contract for a model folder, read once.

Shipped folders (written before the card existed) load through ``migrate``; unknown top-level keys of config.yaml
or extra.json are a usage error naming the nearest valid key; every entry point reads the same card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from medldm.cli import main
from medldm.models.card import CardError, ModelCard, migrate, read_card
from medldm.shipped import SHIPPED, resolve_model


def _files(name: str) -> tuple[dict, dict]:
    folder = resolve_model(name)
    return yaml.safe_load((folder / "config.yaml").read_text()), json.loads((folder / "extra.json").read_text())


def _copy(tmp_path: Path, name: str = "mr-denoise-2d") -> Path:
    dst = tmp_path / name
    shutil.copytree(resolve_model(name), dst)
    return dst


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_cards_parse_and_round_trip(name):
    config, extra = _files(name)
    card = read_card(config, extra)
    assert card.task == SHIPPED[name].task
    assert card.factor == card.vae.downsample_factor == 2 ** (len(config["vae"]["channels"]) - 1)
    assert (card.refiner is not None) == (name in ("mr-denoise-2d", "mr-denoise-25d", "mr-sr2x-2d", "mr-thinslice-4x"))
    assert (card.degrade is None) == (card.task == "synthesis")
    # what a training stage writes today reads back to the same card
    again = read_card(config, json.loads(json.dumps(card.to_extra())))
    assert again == card


def test_wrong_type_in_extra_names_file_and_key(tmp_path, capsys):
    folder = _copy(tmp_path)
    data = json.loads((folder / "extra.json").read_text())
    data["degrade"]["scale"] = "two"
    (folder / "extra.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"extra\.json: degrade\.scale"):
        import medldm

        medldm.load_model(folder)


def test_migrate_is_the_one_place_for_old_layouts():
    config, extra = _files("mr-sr2x-2d")
    nested = {k: v for k, v in config.items() if k not in ("vae", "unet", "diffusion")}
    nested["model"] = {k: config[k] for k in ("vae", "unet", "diffusion")}
    old = {**{k: v for k, v in extra.items() if k not in ("condition", "factor")}, "mask_classes": None,
           "refiner": {k: v for k, v in extra["refiner"].items() if k not in ("norm", "base")} | {"apply": "x.y"}}
    cfg2, ex2 = migrate(nested, old)
    assert cfg2["vae"] == config["vae"] and "model" not in cfg2
    assert ex2["condition"] == "space_to_depth" and "mask_classes" not in ex2
    assert ex2["refiner"]["norm"] == "instance" and ex2["refiner"]["base"] == "decoded" and "apply" not in ex2["refiner"]
    card = read_card(nested, old)
    assert card.factor == 2 and card.condition == "space_to_depth" and card.refiner.norm == "instance"


def test_card_error_carries_file_and_key():
    config, extra = _files("mr-synth-2d")
    with pytest.raises(CardError) as e:
        read_card({**config, "vae": [1, 2]}, extra)
    assert (e.value.file, e.value.key) == ("config.yaml", "vae") and "not a mapping" in str(e.value)
    assert ModelCard().diffusion.sampling_steps >= 1


def _small_scan(tmp_path: Path) -> Path:
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from medldm.io.nifti import save_nifti

    arr = np.random.default_rng(0).normal(100, 10, (24, 24, 2)).astype(np.float32)
    src = tmp_path / "in.nii.gz"
    save_nifti(MetaTensor(torch.from_numpy(arr), affine=torch.eye(4, dtype=torch.float64),
                          meta={"original_dtype": "float32"}), src)
    return src


def test_resume_record_stores_resolved_options(tmp_path, capsys):
    """Issue 21 item 3: the record stored the raw `--steps` (None) instead of the value used, so a rerun with the
    model's default spelled out (`--steps 2`) was refused as "made with other options"."""
    src, out = _small_scan(tmp_path), tmp_path / "out.nii.gz"
    base = ["enhance", "-m", "mr-denoise-2d", "-i", str(src), "-o", str(out), "--device", "cpu", "--quiet"]
    assert main(base) == 0
    rec = json.loads(out.with_name("out.nii.gz.medldm.json").read_text())
    opts = rec["key"]["options"] if "key" in rec else rec["options"]
    assert (opts["steps"], opts["sampler"]) == (2, "euler_flow")  # mr-denoise-2d's defaults, not None
    before = out.stat().st_mtime_ns
    assert main([*base, "--steps", "2", "--sampler", "euler_flow"]) == 0  # the same run: skipped, not refused
    assert out.stat().st_mtime_ns == before
    capsys.readouterr()
    assert main([*base, "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_open_model_reads_each_file_once(monkeypatch):
    """Issue 21 item 4: opening a model read the weights twice (safetensors load, then model_hash); now every
    file of the folder is read once, hashed as read, and the weights loaded from those bytes."""
    from medldm.models import folder, model_hash
    from medldm.shipped import open_model

    reads: list[str] = []
    real_read, real_hash = Path.read_bytes, folder._hash_file
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read(self))
    monkeypatch.setattr(folder, "_hash_file", lambda h, f: reads.append(f.name) or real_hash(h, f))
    monkeypatch.setattr(folder, "model_hash", lambda *a: pytest.fail("model_hash re-reads the folder"))
    model = open_model("mr-sr2x-2d")
    monkeypatch.undo()
    names = sorted(["config.yaml", *(p.name for p in model.path.glob("*.safetensors"))])
    assert sorted(reads) == names  # each exactly once
    assert model.hash == model_hash(model.path) and model.runner.task == "sr"


def test_sampler_names_come_from_one_registry():
    from medldm.cli import build_parser
    from medldm.diffusion.samplers import SAMPLERS
    from medldm.models.config import SAMPLER_NAMES

    assert tuple(SAMPLERS) == SAMPLER_NAMES
    parser, _ = build_parser()
    for cmd in ("enhance", "synthesize", "listen"):
        sub = parser._subparsers._group_actions[0].choices[cmd]
        (action,) = [a for a in sub._actions if "--sampler" in a.option_strings]
        assert tuple(action.choices) == SAMPLER_NAMES
