"""`medldm plan` (fingerprint -> config with reasons), `medldm plan --check` and `medldm train --dry-run`, on real
scans arranged like a hospital export (DICOM series in nested folders, NIfTI, an unreadable file, a duplicate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medldm.cli import main
from medldm.plan.decisions import make_plan
from medldm.plan.fingerprint import fingerprint
from medldm.train.schema import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory, dicomdir_tests, dipy_files) -> Path:
    """PACS-like export: PATIENT/STUDY/SERIES/files, NIfTI per subject, one damaged file, one duplicate."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(dicomdir_tests / "98892003" / "MR700", root / "PAT_98892003" / "STUDY1" / "MR700")
    shutil.copytree(dicomdir_tests / "77654033" / "CT2", root / "PAT_77654033" / "STUDY1" / "CT2")
    for sub, name in (("sub-01", "aniso_vox.nii.gz"), ("sub-02", "S0_10slices.nii.gz")):
        (root / "nifti" / sub).mkdir(parents=True)
        shutil.copy(dipy_files / name, root / "nifti" / sub / name)
    shutil.copy(dipy_files / "aniso_vox.nii.gz", root / "nifti" / "sub-01" / "aniso_vox_copy.nii.gz")  # duplicate
    (root / "nifti" / "sub-02" / "broken.nii.gz").write_bytes((dipy_files / "S0_10slices.nii.gz").read_bytes()[:3000])
    return root


def _nifti(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def mni_vol(mni152) -> np.ndarray:
    return np.asarray(nib.load(str(mni152)).dataobj, dtype=np.float32)


def test_plan_on_hospital_export(export, tmp_path, capsys):
    out = tmp_path / "PLAN.yaml"
    assert main(["plan", str(export), "--task", "denoise", "-o", str(out), "--device", "cpu",
                 "--cache", str(tmp_path / "cache.json"), "--hours", "2"]) == 0
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err  # unreadable: one line with the reason
    text = out.read_text()
    cfg = load_config(yaml.safe_load(text))  # a normal config
    assert cfg.task == "denoise" and cfg.data.val_fraction == 0.0
    for reason in ("2D slices", "validation BY SUBJECT", "memory model", "percentile", "steps from the 2 h budget"):
        assert reason in text, reason
    assert sum(ln.lstrip().startswith("#") for ln in text.splitlines()) > 15
    fp = json.loads((tmp_path / "PLAN.fingerprint.json").read_text())
    assert any("broken.nii.gz" in s for s in fp["skipped"])
    assert any(set(g) == {"nifti/sub-01/aniso_vox", "nifti/sub-01/aniso_vox_copy"} for g in fp["summary"]["duplicates"])
    subj = {s["id"]: s["subject"] for s in fp["scans"]}
    assert subj["PAT_98892003/STUDY1/MR700/" + next(i.split("/")[-1] for i in subj if "MR700" in i)].startswith("PatientID:")
    assert subj["nifti/sub-02/S0_10slices"] == "BIDS:sub-02"
    # split by subject: the two sides share no subject, the duplicate copy is left out
    split = fp["split"]
    assert split["val"] and split["train"]
    assert not set(split["val_subjects"]) & set(split["train_subjects"])
    assert not any("aniso_vox_copy" in e for e in cfg.data.train + cfg.data.val)
    assert fp["measurement"]["stages"]["vae"]["step_s"] > 0
    # second run: every record from the cache
    fp2 = fingerprint([export], cache=tmp_path / "cache.json")
    assert [s["pixel_hash"] for s in fp2["scans"]] == [s["pixel_hash"] for s in fp["scans"]]
    # the plan runs: dry run, nothing written
    run = tmp_path / "RUN"
    assert main(["train", str(out), "-o", str(run), "--dry-run", "--tiny"]) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "peak memory" in printed and "wall time" in printed
    assert not run.exists()


def test_decisions_follow_the_data(tmp_path, mni_vol, pydicom_files, dicomdir_tests):
    iso = _nifti(tmp_path / "iso" / "t1.nii.gz", mni_vol[::2, ::2, ::2], (2.0, 2.0, 2.0))
    thick = _nifti(tmp_path / "thick" / "t1.nii.gz", mni_vol[:, :, ::6], (1.0, 1.0, 6.0))
    kw = {"device": "cuda", "gpu_memory": 40.0, "measure": False}
    p_iso = make_plan(fingerprint([iso.parent], cache=None), "denoise", **kw)
    p_thick = make_plan(fingerprint([thick.parent], cache=None), "denoise", **kw)
    assert p_iso.config["spatial_dims"] == 3
    assert p_thick.config["spatial_dims"] == 2 and p_thick.config["data"]["slice_axis"] == 2
    assert "thick slices" in p_thick.reasons["spatial_dims"]
    # CT -> HU window; MR -> percentiles
    ct = tmp_path / "ct"
    shutil.copytree(dicomdir_tests / "98892001" / "CT5N", ct / "CT5N")
    shutil.copy(pydicom_files / "CT_small.dcm", ct / "CT_small.dcm")
    p_ct = make_plan(fingerprint([ct], cache=None), "denoise", **kw)
    assert p_ct.config["data"]["modality"] == "CT" and p_ct.config["data"]["ct_window"]
    assert "HU" in p_ct.reasons["data.modality"] and p_ct.config["degrade"]["kind"] == "gaussian"
    assert p_iso.config["data"]["modality"] == "MR" and "ct_window" not in p_iso.config["data"]
    # less memory -> a smaller batch or patch
    fp_thick = fingerprint([thick.parent], cache=None)
    big = make_plan(fp_thick, "denoise", device="cuda", gpu_memory=24.0, measure=False).config["data"]
    small = make_plan(fp_thick, "denoise", device="cuda", gpu_memory=1.5, measure=False).config["data"]
    assert np.prod(small["patch_size"]) * small["batch_size"] < np.prod(big["patch_size"]) * big["batch_size"]
    # thinslice has one meaning: the schema's 2D task thinslice (thick -> thin along an in-plane axis), as shipped
    p_ts = make_plan(fingerprint([iso.parent], cache=None), "thinslice", **kw)
    cfg_ts = load_config(p_ts.config)
    assert cfg_ts.task == "thinslice" and cfg_ts.spatial_dims == 2 and cfg_ts.degrade.kind == "thick"
    assert cfg_ts.refine.enabled and all(p % cfg_ts.degrade.scale == 0 for p in cfg_ts.data.patch_size)


def test_check_exit_codes(tmp_path, export, mni_vol, capsys):
    good = _nifti(tmp_path / "good" / "a.nii.gz", mni_vol[::3, ::3, ::3], (3.0, 3.0, 3.0))
    assert main(["plan", str(good.parent), "--check", "-o", str(tmp_path / "ok"), "--cache", "none"]) == 0
    assert (tmp_path / "ok.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((tmp_path / "ok.json").read_text())["blocking"] is False
    # the export: warnings (unreadable file, duplicate, mixed spacings) but nothing blocking
    assert main(["plan", str(export), "--check", "-o", str(tmp_path / "exp"), "--cache", "none"]) == 0
    kinds = {p["kind"] for p in json.loads((tmp_path / "exp.json").read_text())["problems"]}
    assert {"unreadable files", "duplicates", "mixed spacings"} <= kinds
    # a constant volume blocks
    _nifti(tmp_path / "bad" / "flat.nii.gz", np.full((32, 32, 8), 7.0))
    shutil.copy(good, tmp_path / "bad" / "a.nii.gz")
    assert main(["plan", str(tmp_path / "bad"), "--check", "-o", str(tmp_path / "bad_report"), "--cache", "none"]) == 1
    assert "empty/constant volume" in capsys.readouterr().out
    # the same scan in train and validation blocks (a config whose data.val copies a training scan)
    (tmp_path / "val").mkdir()
    shutil.copy(good, tmp_path / "val" / "a_copy.nii.gz")
    cfg = yaml.safe_load((ROOT / "configs" / "denoise_2d_tiny.yaml").read_text())
    cfg["data"]["train"], cfg["data"]["val"] = [str(good.parent)], [str(tmp_path / "val")]
    (tmp_path / "leak.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(tmp_path / "leak.yaml"), "--check", "-o", str(tmp_path / "leak"), "--cache", "none"]) == 1
    assert "same scan in train and validation" in capsys.readouterr().out


CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/shipped/*.yaml")])


@pytest.mark.parametrize("config", CONFIGS)
def test_dry_run_every_config(config, tmp_path, monkeypatch, dipy_files, capsys):
    # the shipped configs also train on runs/shipped_data (made by tools/prepare_shipped_data.py): a stand-in
    (tmp_path / "runs" / "shipped_data").mkdir(parents=True)
    shutil.copy(dipy_files / "aniso_vox.nii.gz", tmp_path / "runs" / "shipped_data" / "scan.nii.gz")
    cfg = yaml.safe_load((ROOT / config).read_text())
    for entry in [*cfg.get("data", {}).get("train", []), *cfg.get("data", {}).get("val", [])]:
        if entry.startswith("runs/shipped_data/") and entry.endswith(".nii.gz"):  # files the config names
            shutil.copy(dipy_files / "aniso_vox.nii.gz", tmp_path / entry)
    monkeypatch.chdir(tmp_path)
    args = ["train", str(ROOT / config), "-o", str(tmp_path / "RUN"), "--dry-run", "--tiny"]
    vae_path = cfg.get("vae_path")
    if vae_path:  # stage ldm on a trained VAE: the repository's, else a freshly built one (same cost per step)
        args += ["--set", f"vae_path={ROOT / vae_path if (ROOT / vae_path).is_dir() else 'null'}"]
    if "3d" in config:  # keep the 3D checks cheap on the CPU: the VAE stage (the full-resolution network) only
        args += ["--set", "stage=vae"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "nothing written" in out
    assert not (tmp_path / "RUN").exists()
