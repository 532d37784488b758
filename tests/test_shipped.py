"""Shipped models: found by name, loaded without code execution, and they improve degraded held-out real scans.

The held-out scans are the demo's (dipy's S0_10slices brain b0, pydicom-data's abdomen MR), which no shipped
model was trained on (docs/models.md). Crops keep CPU time low.
"""

import json

import numpy as np
import pytest
import torch
from conftest import held_out_crop, psnr01

import medldm
from medldm.cli import main
from medldm.io.errors import CaseError
from medldm.shipped import SHIPPED, installed_models, resolve_model


def _require(name: str):
    if name not in installed_models():
        pytest.fail(f"shipped model {name} missing from medldm/assets/models (train + export it: docs/models.md)")
    return resolve_model(name)


def _enhance(name, img):
    from medldm.shipped import enhance

    return enhance(name, img, seed=0)


def test_resolve_model_names_and_folders(tmp_path):
    for name in SHIPPED:
        folder = _require(name)
        assert (folder / "config.yaml").is_file() and folder.name == name
        assert sum(f.stat().st_size for f in folder.iterdir()) < 8e6, "keep shipped folders small"
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.yaml").write_text("vae: {}\n")
    assert resolve_model(model) == model  # a model folder is used as given (the loader checks the rest)
    with pytest.raises(CaseError, match="medldm models"):
        resolve_model("mr-no-such-model")
    with pytest.raises(CaseError, match=r"not a model folder: neither config\.yaml nor model/config\.yaml is in it "
                                        r"— give the folder `medldm train -o RUN_DIR` wrote"):
        resolve_model(tmp_path)  # a folder that is neither a model nor a run


def _fake_run(tmp_path, name: str = "mr-denoise-2d"):
    """A folder as ``medldm train -o RUN`` leaves it: the resolved training config, stage folders, and the final
    model folder RUN/model (here a copy of a shipped model)."""
    import shutil

    run = tmp_path / "RUN"
    src = _require(name)
    shutil.copytree(src, run / "model")
    shutil.copytree(src, run / "ldm" / "model")
    shutil.copy(src / "config.yaml", run / "config.yaml")  # a run folder has a config.yaml too, but no weights
    (run / "summary.json").write_text("{}")
    return run


def test_run_folder_resolves_to_its_model(tmp_path):
    """``medldm.load_model(RUN_DIR)`` and ``-m RUN_DIR`` accept the folder ``medldm train -o RUN_DIR`` wrote."""
    run = _fake_run(tmp_path)
    assert resolve_model(run) == run / "model"
    assert resolve_model(run / "model") == run / "model"
    bundle, ref = medldm.load_model(run), medldm.load_model("mr-denoise-2d")
    assert bundle.extra["task"] == "denoise"
    for (k, a), (_, b) in zip(bundle.denoiser.state_dict().items(), ref.denoiser.state_dict().items(), strict=True):
        assert torch.equal(a, b), k

    from medldm.shipped import open_model

    assert open_model(run).path == run / "model"  # what `medldm enhance -m RUN_DIR` loads

    import shutil

    shutil.rmtree(run / "model")  # a run stopped before its final model: say so, and name the stage's model
    with pytest.raises(CaseError, match=r"training run without its final model/ folder .* --resume.*ldm/model"):
        resolve_model(run)
    with pytest.raises(CaseError, match="training run without its final model/ folder"):
        medldm.load_model(run)


def test_cli_enhance_accepts_a_run_folder(tmp_path, dipy_files):
    import nibabel as nib

    run = _fake_run(tmp_path)
    img = nib.load(dipy_files / "S0_10slices.nii.gz")
    crop = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32)[40:72, 40:72, 4:5, 0], img.affine)
    src, out = tmp_path / "in.nii.gz", tmp_path / "out.nii.gz"
    nib.save(crop, src)
    assert main(["enhance", "-m", str(run), "-i", str(src), "-o", str(out), "--steps", "1", "--quiet"]) == 0
    assert nib.load(out).shape == crop.shape
    (tmp_path / "empty").mkdir()
    assert main(["enhance", "-m", str(tmp_path / "empty"), "-i", str(src), "-o", str(tmp_path / "x.nii.gz"),
                 "--quiet"]) == 2  # a folder that is neither a model nor a run: usage error


@pytest.mark.parametrize("name", [n for n, m in SHIPPED.items() if m.task != "synthesis"])
def test_models_load_by_name(name):
    bundle = medldm.load_model(resolve_model(name))
    assert bundle.vae is not None and bundle.denoiser is not None
    assert bundle.extra["task"] == SHIPPED[name].task


def test_denoise_improves_held_out_scan(dipy_files):
    from medldm.data.degrade import gaussian_noise

    ref = held_out_crop(dipy_files / "S0_10slices.nii.gz", 64, 2)
    noisy = gaussian_noise(ref, 0.05, 0)
    out = _enhance("mr-denoise-2d", noisy)
    before, after = psnr01(noisy, ref), psnr01(out, ref)
    assert after > before + 2.0, (before, after)


def test_sr_improves_held_out_scan(pydicom_data):
    from medldm.data.degrade import downsample
    from medldm.eval.baselines import upsample_scan

    ref = held_out_crop(pydicom_data / "MR-SIEMENS-DICOM-WithOverlays.dcm", 128, 1)
    low = downsample(ref, 2, method="gaussian")
    out = _enhance("mr-sr2x-2d", low)
    linear = psnr01(upsample_scan(low, 2, "linear"), ref)
    after = psnr01(out, ref)
    assert after > linear + 0.5, (linear, after)


def test_enhance_by_name_keeps_geometry(dipy_files, pydicom_data):
    """Runs by name through the inference pipeline: denoise keeps the grid, SR doubles it (same extent)."""
    from medldm.data.degrade import downsample, gaussian_noise

    ref = held_out_crop(dipy_files / "S0_10slices.nii.gz", 32, 1)
    out = _enhance("mr-denoise-2d", gaussian_noise(ref, 0.05, 0))
    assert tuple(out.shape) == tuple(ref.shape) and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(ref.affine), atol=1e-6)
    ref = held_out_crop(pydicom_data / "MR-SIEMENS-DICOM-WithOverlays.dcm", 32, 1)
    out = _enhance("mr-sr2x-2d", downsample(ref, 2, method="gaussian"))
    assert tuple(out.shape) == tuple(ref.shape) and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(ref.affine), atol=1e-6)  # x2 grid, same extent


def test_synthesis_samples_by_name():
    from medldm.pipelines.synthesize import Synthesizer

    syn = Synthesizer(medldm.load_model(_require("mr-synth-2d")))
    a, _ = syn.generate(seed=0, steps=10)
    b, _ = syn.generate(seed=1, steps=10)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == (*syn.size, 1) and np.isfinite(a).all()
    assert a.std() > 0.05 * (a.max() - a.min())  # an image, not a constant
    assert np.abs(a - b).mean() > 0.01 * (a.max() - a.min())  # seeds give different samples


def test_models_command_lists_them(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name, m in SHIPPED.items():
        assert name in text and f"[{m.task}]" in text
    assert " MB " in text and "training data:" in text
    # synthesis models say how to condition them: class names from the folder, or the label map they take
    assert "--condition class=NAME  (classes: T1w/position-0," in text
    assert "synthesize -m mr-synth-mask-2d --mask LABELS.nii.gz" in text and "values 0..3" in text
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert set(cards) == set(SHIPPED) and all(c["installed"] for c in cards.values())


def test_enhance_warns_outside_the_training_domain(pydicom_files, dipy_files):
    """The MR denoiser flags a CT scan as outside its training domain, and an MR scan not."""
    import medldm
    from medldm.io.reader import load_scan
    from medldm.pipelines.enhance import EnhanceOptions, Enhancer
    from medldm.shipped import resolve_model

    enh = Enhancer(medldm.load_model(resolve_model("mr-denoise-2d")))
    opts = EnhanceOptions(steps=1)
    ct = load_scan(pydicom_files / "CT_small.dcm")
    assert "outside its training domain" in enh.enhance(ct[:64, :64], opts).info.get("warning", "")
    mr = load_scan(dipy_files / "aniso_vox.nii.gz")
    assert "outside its training domain" not in enh.enhance(mr[:, :, 10:12], opts).info.get("warning", "")


def _tool(name: str):
    """Import a maintainer script of tools/ (not part of the package) as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"tools_{name}", Path(__file__).parents[1] / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_maintainer_export_and_heldout(tmp_path, monkeypatch):
    """tools/shipped_models.py (maintainers only): ``export`` copies a run's model folder (only the shipped files,
    float weights as float16, scan paths as pkg://) and writes its card; ``heldout`` stores a demo run's figures in
    the card. Into a temporary assets folder, so the installed models are untouched."""
    import yaml
    from safetensors.torch import load_file, save_file

    import medldm.shipped as shipped

    tool = _tool("shipped_models")
    monkeypatch.setattr(shipped, "ASSETS", tmp_path / "assets")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "vae").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": {"train": ["pkg://dipy/data/a.nii.gz"], "val": ["pkg://dipy/data/b.nii.gz"], "batch_size": 2,
                 "patch_size": [32, 32]},
        "vae_train": {"steps": 3}, "ldm_train": {"steps": 4}, "refine": {"enabled": False}}))
    (run / "model" / "config.yaml").write_text("spatial_dims: 2\n")
    (run / "model" / "extra.json").write_text(json.dumps({"task": "denoise",
                                                          "scans": ["/x/lib/site-packages/dipy/data/a.nii.gz"]}))
    save_file({"w": torch.ones(2, 3), "i": torch.arange(3)}, str(run / "model" / "vae.safetensors"))
    (run / "model" / "notes.txt").write_text("not shipped")
    (run / "vae" / "val_log.csv").write_text("step,psnr\n1,20\n3,25.5\n")

    dest = tool.export(run, "mr-denoise-2d", wall_s=12.0, hardware="test CPU")
    assert dest == tmp_path / "assets" / "mr-denoise-2d"
    assert sorted(p.name for p in dest.iterdir()) == ["card.json", "config.yaml", "extra.json", "vae.safetensors"]
    w = load_file(str(dest / "vae.safetensors"))
    assert w["w"].dtype == torch.float16 and w["i"].dtype == torch.int64
    assert '"pkg://dipy/data/a.nii.gz"' in (dest / "extra.json").read_text()
    c = shipped.card("mr-denoise-2d")
    assert c["steps"] == {"vae": 3, "ldm": 4} and c["wall_s"] == 12.0 and c["hardware"] == "test CPU"
    assert c["validation"] == {"vae": {"step": 3.0, "psnr": 25.5}}
    assert set(shipped.installed_models()) == {"mr-denoise-2d"}

    report = tmp_path / "demo" / "denoise" / "report"
    report.mkdir(parents=True)
    rows = ["method,case,level,psnr,ssim", "noisy,a,slice,20,0.5", "noisy,a,slice,22,0.7", "noisy,b,slice,24,0.6",
            "mr-denoise-2d,a,slice,30,0.9", "mr-denoise-2d,b,slice,32,0.8", "mr-denoise-2d,a,volume,99,0.1"]
    (report / "metrics.csv").write_text("\n".join(rows) + "\n")
    table = tool.record_heldout(tmp_path / "demo")["mr-denoise-2d"]
    assert table["noisy"]["psnr"] == pytest.approx((21 + 24) / 2)  # mean over scans of the per-scan slice means
    assert table["mr-denoise-2d"] == pytest.approx({"psnr": 31.0, "ssim": 0.85})
    held = shipped.card("mr-denoise-2d")["heldout"]
    assert held["scans"] == ["a", "b"] and held["methods"] == table
