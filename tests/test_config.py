"""Config loading: validation errors name the key (and the nearest valid one), overrides, shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from medldm.config import ConfigError, apply_overrides, doc_field, to_mapping
from medldm.train.schema import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"patch_sise": [32, 32]}})
    msg = str(e.value)
    assert "data.patch_sise" in msg and "did you mean 'data.patch_size'" in msg


def test_unknown_top_level_key_and_section_key():
    with pytest.raises(ConfigError, match=r"vae_trian: unknown key; did you mean 'vae_train'"):
        load_config({"vae_trian": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"vae\.latent_channel: unknown key; did you mean 'vae\.latent_channels'"):
        load_config({"vae": {"latent_channel": 3}})


@pytest.mark.parametrize(("data", "needle"), [
    ({"data": {"batch_size": "eight"}}, "data.batch_size: expected int"),
    ({"vae_train": {"lr": "fast"}}, "vae_train.lr: expected float"),
    ({"augment": {"enabled": 1}}, "augment.enabled: expected bool"),
    ({"vae": {"channels": [16, "a"]}}, "vae.channels[1]: expected int"),
    ({"data": {"train": "scans/"}}, "data.train: expected list[str]"),
    ({"stage": "vea"}, "did you mean 'vae'"),
    ({"spatial_dims": 4}, "spatial_dims: expected one of 2, 3"),
])
def test_wrong_types_name_key_and_type(data, needle):
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert needle in str(e.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="multiple of the VAE factor 4"):
        load_config({"data": {"patch_size": [30, 30]}})
    with pytest.raises(ConfigError, match="needs 3 values"):
        load_config({"spatial_dims": 3, "data": {"patch_size": [32, 32]}})
    with pytest.raises(ConfigError, match="task 'sr' needs 'downsample' or 'thick'"):
        load_config({"task": "sr", "degrade": {"kind": "gaussian"}})
    with pytest.raises(ConfigError, match="diffusion"):
        load_config({"diffusion": {"schedule": "flow", "prediction": "eps"}})


def test_overrides_are_yaml_parsed_and_checked():
    cfg = load_config({}, ["vae_train.steps=7", "vae.channels=[16, 32]", "vae.attention_levels=[false, false]",
                           "vae.norm_num_groups=8", "data.patch_size=[16,16]", "vae_train.lr=3e-4",
                           "augment.enabled=false"])
    assert cfg.vae_train.steps == 7 and cfg.vae.channels == (16, 32) and cfg.factor == 2
    assert cfg.vae_train.lr == pytest.approx(3e-4) and cfg.augment.enabled is False
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config({}, ["vae_train.steps"])
    with pytest.raises(ConfigError, match="ldm_train.stepz: unknown key; did you mean 'ldm_train.steps'"):
        load_config({}, ["ldm_train.stepz=3"])
    d = apply_overrides({"a": {"b": 1}}, ["a.c=x", "d=[1, 2]"])
    assert d == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_derived_conditioning_channels():
    cfg = load_config({"task": "sr", "degrade": {"kind": "downsample"}, "unet": {"noise_level_cond": True}})
    assert cfg.unet.cond_channels == cfg.in_channels * cfg.factor ** 2
    cfg3 = load_config({"task": "denoise", "spatial_dims": 3, "data": {"patch_size": [32, 32, 32]}})
    assert cfg3.unet.cond_channels == cfg3.factor ** 3 and cfg3.vae.spatial_dims == 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    again = load_config(yaml.safe_load(yaml.safe_dump(to_mapping(cfg))))
    assert to_mapping(again) == to_mapping(cfg)


ROOT = Path(__file__).parents[1]
SAVED_CONFIGS = sorted([*(ROOT / "configs" / "shipped").glob("*.yaml"), *(ROOT / "medldm" / "assets" / "models").glob("*/config.yaml"),
                        *(ROOT / "docs" / "training_logs").glob("*/resolved_config.yaml")])


@pytest.mark.parametrize("path", SAVED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_model_configs_still_load(path):
    """The shipped models' training configs and the resolved configs saved in their folders (written before the
    stage sections shared a base) load unchanged: same keys, same values."""
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    out = to_mapping(cfg)
    for sec in ("vae_train", "ldm_train", "refine"):
        for key, value in (raw.get(sec) or {}).items():
            assert out[sec][key] == (list(value) if isinstance(value, tuple) else value), f"{sec}.{key}"


def test_stage_sections_share_the_optimisation_base():
    from medldm.train.schema import (
        LDMTrainConfig,
        RefineConfig,
        StageTrainConfig,
        TrainingConfig,
        VAETrainConfig,
    )

    base = [f.name for f in dataclasses.fields(StageTrainConfig)]
    for cls in (VAETrainConfig, LDMTrainConfig, RefineConfig):
        assert issubclass(cls, StageTrainConfig)
        assert [f.name for f in dataclasses.fields(cls)][:len(base)] == base  # the shared keys come first
    # each stage keeps its own defaults where they differ
    cfg = TrainingConfig()
    assert (cfg.vae_train.steps, cfg.ldm_train.steps, cfg.refine.steps) == (2000, 5000, 2000)
    assert (cfg.vae_train.lr, cfg.ldm_train.lr, cfg.refine.lr) == (1e-4, 1e-4, 2e-4)
    assert (cfg.vae_train.ema_decay, cfg.ldm_train.ema_decay, cfg.refine.ema_decay) == (0.0, 0.999, 0.0)
    assert (cfg.vae_train.warmup_steps, cfg.refine.warmup_steps) == (100, 50)
    assert cfg.vae_train.val_max_items == 16 and cfg.ldm_train.val_sampling_steps == 20


@pytest.mark.parametrize(("override", "needle"), [
    ("vae_train.steps=0", "vae_train.steps: must be >= 1, got 0"),
    ("ldm_train.grad_accum=0", "ldm_train.grad_accum: must be >= 1, got 0"),
    ("refine.log_every=0", "refine.log_every: must be >= 1, got 0"),
    ("refine.ckpt_every=-1", "refine.ckpt_every: must be >= 1, got -1"),
    ("vae_train.warmup_steps=-5", "vae_train.warmup_steps: must be >= 0 (0 = off), got -5"),
    ("ldm_train.lr=0", "ldm_train.lr: must be a finite number > 0, got 0.0"),
    ("ldm_train.ema_decay=1.0", "ldm_train.ema_decay: must be in [0, 1) (0 = off), got 1.0"),
    ("vae_train.grad_clip=-1", "vae_train.grad_clip: must be a finite number >= 0, got -1.0"),
    ("ldm_train.lr_schedule=cosin", "ldm_train.lr_schedule: expected one of 'constant', 'cosine', got 'cosin'; "
                                    "did you mean 'cosine'?"),
    ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
    ("data.val_fraction=1.0", "data.val_fraction: must be in [0, 1), got 1.0"),
    ("data.slice_axis=3", "data.slice_axis: expected one of 0, 1, 2, got 3"),
    ("degrade.scale=0", "degrade.scale: must be >= 1, got 0"),
])
def test_section_invariants_name_the_key(override, needle):
    """Each invariant is checked once, by the section that owns it, and the message names the key."""
    with pytest.raises(ConfigError) as e:
        load_config({}, [override])
    assert str(e.value) == needle


def test_shipped_config_set_is_complete():
    names = {p.name for p in CONFIGS}
    for task in ("synthesis", "sr", "denoise"):
        for nd in ("2d", "3d"):
            assert f"{task}_{nd}.yaml" in names
        assert any("tiny" in n and n.startswith(task) for n in names)


def _tool(name: str):
    """Import a maintainer script of tools/ (not part of the package) as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_reference_matches_schema():
    from medldm.train.schema import TrainingConfig

    gen = _tool("gen_config_docs")
    doc = gen.DOC.read_text()
    assert gen.BEGIN in doc and gen.END in doc, "docs/training.md lacks the generated schema block"
    block = doc.split(gen.BEGIN, 1)[1].split(gen.END, 1)[0].strip()
    assert block == gen.schema_markdown(TrainingConfig).strip(), (
        "docs/training.md is out of date: run `python tools/gen_config_docs.py`")
    assert gen.render(doc) == doc


@dataclasses.dataclass
class _Inner:
    count: int = doc_field(1, "a count")


@dataclasses.dataclass
class _Outer:
    name: str = doc_field("x", "a name")
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_generic_loader_knows_no_schema(tmp_path):
    """medldm.config validates any dataclass tree and imports no training code (no config <-> schema cycle)."""
    import subprocess
    import sys

    from medldm.config import load_dataclass

    f = tmp_path / "c.yaml"
    f.write_text("name: y\ninner: {count: 2}\n")
    assert load_dataclass(_Outer, f, ["inner.count=3"]) == _Outer("y", _Inner(3))
    with pytest.raises(ConfigError, match=r"inner\.cuont: unknown key; did you mean 'inner\.count'"):
        load_dataclass(_Outer, {"inner": {"cuont": 1}})
    code = "import sys, medldm.config; print(sorted(m for m in sys.modules if m.startswith('medldm.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "medldm.train" not in out, out


def test_cli_reports_config_errors_as_usage_errors(tmp_path, capsys):
    from medldm.cli import main

    cfg = Path(__file__).parents[1] / "configs" / "sr_2d_tiny.yaml"
    assert main(["train", str(cfg), "-o", str(tmp_path / "o"), "--set", "data.patch_sise=[32,32]"]) == 2
    assert "did you mean 'data.patch_size'" in capsys.readouterr().err
    assert main(["train", str(cfg), "-o", str(tmp_path / "o"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["task"] == "sr" and printed["unet"]["cond_channels"] == 4
    assert not (tmp_path / "o").exists()


def test_model_range_and_ct_window_tables_agree():
    """One model range width for the metrics; the evaluation and normalization CT window tables agree on the
    names they share, and the one deliberate difference (subdural) is named apart (``ct-subdural`` vs ``subdural``)."""
    from medldm.data.intensity import CT_WINDOWS, MODEL_RANGE
    from medldm.metrics.ranges import MODEL_DATA_RANGE, WINDOWS

    assert MODEL_DATA_RANGE == MODEL_RANGE[1] - MODEL_RANGE[0]
    for name, window in CT_WINDOWS.items():
        if f"ct-{name}" in WINDOWS and name != "subdural":
            assert WINDOWS[f"ct-{name}"] == window, name
    assert WINDOWS["ct-subdural"] == (-20.0, 180.0)  # W200 L80, narrower than the normalization window
