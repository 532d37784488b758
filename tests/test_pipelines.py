"""`medldm enhance` and the enhancement pipeline, with tiny (untrained) model folders on real scans.

The networks are random (training is tested elsewhere); what is tested here is the plumbing that must hold
for any model: geometry, units/dtype, resume, failure isolation, seams, determinism, uncertainty maps.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.io.geometry import spacing_from_affine, world_corners
from medldm.models import UNetConfig, VAEConfig, load_model, save_model_folder, to_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def make_model(path, task: str = "denoise", dims: int = 2, kind: str = "gaussian"):
    """A tiny sr/denoise model folder laid out like `medldm train`'s ldm export (VAE factor 2)."""
    torch.manual_seed(0)
    vae_cfg = VAEConfig(spatial_dims=dims, channels=(8, 16), attention_levels=(False, False), norm_num_groups=4,
                        num_res_blocks=1, latent_channels=2)
    unet_cfg = UNetConfig(channels=(16, 32), attention_levels=(False, False), num_res_blocks=1, num_head_channels=8,
                          norm_num_groups=8, cond_channels=2**dims, noise_level_cond=True)
    from medldm.models import build_denoiser, build_vae

    vae, den = build_vae(vae_cfg), build_denoiser(unet_cfg, dims, 2)
    with torch.no_grad():
        for p in list(vae.parameters()) + list(den.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    extra = {
        "stage": "ldm", "task": task, "scale_factor": 1.0, "factor": 2, "condition": "space_to_depth",
        "degrade": {"kind": kind, "scale": 2, "level_range": [0.02, 0.1], "noise_aug_range": [0.0, 0.1]},
        "noise_level_max": 0.1, "normalization": {"modality": "auto", "ct_window": "full"},
        "patch_size": [16] * dims, "slice_axis": 2,
    }
    cfg = {"task": task, "spatial_dims": dims, "vae": to_dict(vae_cfg), "unet": to_dict(unet_cfg),
           "diffusion": {"sampler": "dpmpp_2m", "sampling_steps": 2}}
    return save_model_folder(path, config=cfg, modules={"vae": vae, "denoiser": den}, extra=extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "denoise2": make_model(root / "denoise2"),
        "sr2": make_model(root / "sr2", "sr", 2, "downsample"),
        "denoise3": make_model(root / "denoise3", "denoise", 3),
        "thick3": make_model(root / "thick3", "sr", 3, "thick"),
    }


@pytest.fixture(scope="module")
def mr_nifti(tmp_path_factory, dipy_files):
    """Real MR (dipy S0_10slices) cropped to 40x36x3, stored int16 with its real affine."""
    im = nib.load(dipy_files / "S0_10slices.nii.gz")
    data = np.asarray(im.dataobj)[40:80, 44:80, 3:6, 0].astype(np.int16)
    p = tmp_path_factory.mktemp("mr") / "mr.nii.gz"
    nib.save(nib.Nifti1Image(data, im.affine), p)
    return p


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_enhance_cli_mixed_folder_geometry_resume(tmp_path, models, mr_nifti, pydicom_files):
    from medldm.cli import main
    from medldm.io import load_scan

    src = tmp_path / "in"
    (src / "ct").mkdir(parents=True)
    shutil.copy(mr_nifti, src / "mr.nii.gz")
    shutil.copy(pydicom_files / "CT_small.dcm", src / "ct" / "ct.dcm")
    (src / "broken.nii.gz").write_bytes(b"not a scan")
    before = {p: _sha(p) for p in src.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    argv = ["enhance", "-m", str(models["denoise2"]), "-i", str(src), "-o", str(out), "--samples", "2", "--quiet"]
    assert main(argv) == 1  # the broken file fails, the others are done
    report = json.loads((out / "medldm-enhance-report.json").read_text())
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    assert "broken" in next(c["message"] for c in report["cases"] if c["status"] == "failed")
    for name, out_path in (("mr", out / "mr.nii.gz"), ("ct", out / "ct")):
        inp = load_scan(src / "mr.nii.gz" if name == "mr" else src / "ct")
        res = load_scan(out_path)
        std = load_scan(out / f"{name}_std.nii.gz")
        assert res.shape == inp.shape == std.shape
        np.testing.assert_allclose(np.asarray(res.affine), np.asarray(inp.affine), atol=1e-4)
        np.testing.assert_allclose(np.asarray(std.affine), np.asarray(inp.affine), atol=1e-4)
        assert res.meta["original_dtype"] == inp.meta["original_dtype"]
        assert torch.equal(res, res.round()) and float(std.min()) >= 0 and float(std.max()) > 0
        case = next(c for c in report["cases"] if c["case"] == name)
        assert 0.0 <= case["extra"]["params"]["noise_level"] <= 1.0
        assert case["extra"]["params"]["uncertainty"]["high_fraction"] >= 0
    assert load_scan(out / "ct").meta["modality"] == "CT"
    assert before == {p: _sha(p) for p in src.rglob("*") if p.is_file()}  # inputs never modified
    assert main(argv) == 1  # resume: finished cases skipped, the broken one still reported
    report = json.loads((out / "medldm-enhance-report.json").read_text())
    assert report["counts"] == {"done": 2, "skipped": 0, "failed": 1}  # merged: the done records are kept
    assert main(["enhance", "-m", str(tmp_path / "nope"), "-i", str(src), "-o", str(out)]) == 2


def test_dicom_output_passes_dciodvfy(tmp_path, models, pydicom_files):
    from conftest import require_tool

    tool = require_tool("dciodvfy")
    from medldm.cli import main

    out = tmp_path / "ct_out"
    assert main(["enhance", "-m", str(models["denoise2"]), "-i", str(pydicom_files / "CT_small.dcm"), "-o", str(out),
                 "--quiet", "--to", "dicom"]) == 0
    files = sorted(out.rglob("*.dcm"))
    assert files
    res = subprocess.run([tool, str(files[0])], capture_output=True, text=True)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors


def test_sr_output_grid_keeps_extent(models, mr_nifti):
    from medldm.io import load_scan
    from medldm.pipelines import EnhanceOptions, Enhancer

    img = load_scan(mr_nifti)
    res = Enhancer(load_model(models["sr2"])).enhance(img, EnhanceOptions(steps=2))
    assert res.image.shape == (80, 72, 3)
    sp_in, sp_out = spacing_from_affine(np.asarray(img.affine)), spacing_from_affine(np.asarray(res.image.affine))
    np.testing.assert_allclose(sp_out, (sp_in[0] / 2, sp_in[1] / 2, sp_in[2]), rtol=1e-6)
    np.testing.assert_allclose(world_corners(np.asarray(res.image.affine), res.image.shape),
                               world_corners(np.asarray(img.affine), img.shape), atol=1e-6)
    assert res.image.meta["spacing"] == pytest.approx(sp_out) and res.std is None


def test_thick_slice_sr_3d_refines_z_only(models, dipy_files):
    from medldm.io import load_scan
    from medldm.pipelines import EnhanceOptions, Enhancer

    img = load_scan(dipy_files / "S0_10slices.nii.gz")[48:64, 48:64, :5]
    res = Enhancer(load_model(models["thick3"])).enhance(img, EnhanceOptions(steps=2))
    assert res.image.shape == (16, 16, 10)
    sp_in, sp_out = spacing_from_affine(np.asarray(img.affine)), spacing_from_affine(np.asarray(res.image.affine))
    np.testing.assert_allclose(sp_out, (sp_in[0], sp_in[1], sp_in[2] / 2), rtol=1e-6)
    np.testing.assert_allclose(world_corners(np.asarray(res.image.affine), res.image.shape),
                               world_corners(np.asarray(img.affine), img.shape), atol=1e-5)


def test_sr_dicom_series_becomes_a_finer_derived_series(tmp_path, models, pydicom_files):
    from medldm.cli import main
    from medldm.io import load_scan

    src = pydicom_files / "CT_small.dcm"
    out = tmp_path / "sr"
    assert main(["enhance", "-m", str(models["sr2"]), "-i", str(src), "-o", str(out), "--to", "dicom", "--quiet"]) == 0
    a, b = load_scan(src), load_scan(out)
    assert b.shape == (2 * a.shape[0], 2 * a.shape[1], 1) and b.meta["modality"] == "CT"
    np.testing.assert_allclose(world_corners(np.asarray(b.affine), b.shape),
                               world_corners(np.asarray(a.affine), a.shape), atol=1e-3)
    np.testing.assert_allclose(b.meta["spacing"][:2], np.asarray(a.meta["spacing"][:2]) / 2, rtol=1e-4)


def test_batch_size_and_chunking_do_not_change_results(models, mr_nifti):
    from medldm.data.intensity import fit_normalization
    from medldm.io import load_scan
    from medldm.pipelines import EnhanceOptions, Enhancer

    img = load_scan(mr_nifti)
    enh = Enhancer(load_model(models["denoise2"]))
    a = enh.enhance(img, EnhanceOptions(batch_size=1, noise_level=0.3))
    b = enh.enhance(img, EnhanceOptions(batch_size=3, noise_level=0.3))
    torch.testing.assert_close(a.image.as_tensor(), b.image.as_tensor(), atol=1.0, rtol=0)  # integer rounding
    params = fit_normalization(img, None, foreground=True)
    last = enh.enhance(img[:, :, 2:], EnhanceOptions(noise_level=0.3, normalization=params, noise_offset=2))
    full = enh.enhance(img, EnhanceOptions(noise_level=0.3, normalization=params))
    torch.testing.assert_close(last.image.as_tensor()[..., 0], full.image.as_tensor()[..., 2], atol=1.0, rtol=0)
    other_seed = enh.enhance(img, EnhanceOptions(noise_level=0.3, normalization=params, seed=1))
    assert not torch.equal(other_seed.image.as_tensor(), full.image.as_tensor())


def test_no_seams_3d_halves_and_tiles(models, dipy_files):
    """Enhancing a volume equals, within sampling noise, enhancing overlapping halves and stitching them;
    tiled latent windows agree with one window over the whole volume the same way."""
    from medldm.data.intensity import fit_normalization
    from medldm.io import load_scan
    from medldm.pipelines import EnhanceOptions, Enhancer

    img = load_scan(dipy_files / "S0_10slices.nii.gz")[40:72, 40:72, :]  # (32, 32, 10)
    enh = Enhancer(load_model(models["denoise3"]))
    o = {"samples": 3, "normalization": fit_normalization(img, None, foreground=True), "noise_level": 0.5,
         "sampler": "ddim", "steps": 3}
    full = enh.enhance(img, EnhanceOptions(**o))
    lo = enh.enhance(img[:, :, :6], EnhanceOptions(**o))
    hi = enh.enhance(img[:, :, 4:], EnhanceOptions(**o, noise_offset=2))  # latent slice 2 = image slice 4
    stitched = torch.cat([lo.image.as_tensor()[:, :, :5], hi.image.as_tensor()[:, :, 1:]], dim=2)
    noise = full.std.as_tensor().mean((0, 1))  # per-slice sampling noise
    diff = (stitched - full.image.as_tensor()).abs().mean((0, 1))
    assert (diff < 0.5 * noise).all(), (diff, noise)
    assert diff.mean() < 0.25 * noise.mean()
    tiled = enh.enhance(img, EnhanceOptions(**o, window=(8, 8, 4)))
    diff_t = (tiled.image.as_tensor() - full.image.as_tensor()).abs().mean((0, 1))
    assert (diff_t < 0.5 * noise).all() and full.image.shape == img.shape


def test_noise_estimate_on_real_slices(dipy_files):
    """The denoiser's noise input: medldm.data.noise with the Enhancer's settings (16 slices, 8 px sides)."""
    from medldm.data.noise import estimate_noise_sigma

    vol = torch.from_numpy(np.asarray(nib.load(dipy_files / "S0_10slices.nii.gz").dataobj, dtype=np.float32)[..., 0])
    vol = vol / vol.max() * 2 - 1
    base = estimate_noise_sigma(vol, max_slices=16, min_side=8)
    noisy = vol + 0.1 * torch.randn(vol.shape, generator=torch.Generator().manual_seed(0))
    est = estimate_noise_sigma(noisy, max_slices=16, min_side=8)
    assert abs(np.sqrt(max(est**2 - base**2, 0)) - 0.1) < 0.015


def test_enhancer_refuses_synthesis_models(tmp_path, models):
    from medldm.io.errors import CaseError
    from medldm.pipelines import Enhancer

    folder = tmp_path / "m"
    shutil.copytree(models["denoise2"], folder)
    ex = json.loads((folder / "extra.json").read_text())
    ex["task"] = "synthesis"
    (folder / "extra.json").write_text(json.dumps(ex))
    with pytest.raises(CaseError, match="synthesize"):
        Enhancer(load_model(folder))


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory):
    """A tiny class-conditional synthesis model folder (2 classes + learned null), 16x16 images."""
    from medldm.models import build_denoiser, build_vae

    torch.manual_seed(0)
    vae_cfg = VAEConfig(channels=(8, 16), attention_levels=(False, False), norm_num_groups=4, num_res_blocks=1,
                        latent_channels=2)
    unet_cfg = UNetConfig(channels=(16, 32), attention_levels=(False, False), num_res_blocks=1, num_head_channels=8,
                          norm_num_groups=8, num_classes=2)
    vae, den = build_vae(vae_cfg), build_denoiser(unet_cfg, 2, 2)
    with torch.no_grad():
        for p in list(vae.parameters()) + list(den.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    ct = {"modality": "CT", "method": "window", "lo": -1024.0, "hi": 3071.0, "out_range": [-1.0, 1.0],
          "original_dtype": "int16"}
    extra = {"stage": "ldm", "task": "synthesis", "scale_factor": 1.0, "factor": 2, "patch_size": [16, 16],
             "resize_to": [16, 16], "class_names": ["head", "chest"],
             "normalization": {"modality": "auto", "ct_window": "full", "examples": [ct]}}
    cfg = {"task": "synthesis", "vae": to_dict(vae_cfg), "unet": to_dict(unet_cfg),
           "diffusion": {"sampling_steps": 2, "guidance": 2.0}}
    return save_model_folder(tmp_path_factory.mktemp("syn") / "m", config=cfg, modules={"vae": vae, "denoiser": den},
                             extra=extra)


def test_synthesize_cli_provenance_resume_dicom(tmp_path, synth_model):
    import pydicom

    from medldm.cli import main
    from medldm.io import load_scan
    from medldm.models import model_hash

    out = tmp_path / "syn"
    argv = ["synthesize", "-m", str(synth_model), "-n", "2", "-o", str(out), "--condition", "class=chest", "--quiet"]
    assert main(argv) == 0
    imgs = [load_scan(out / f"synth_0000{i}.nii.gz") for i in range(2)]
    assert imgs[0].shape == (16, 16, 1) and imgs[0].meta["original_dtype"] == "int16"
    assert not torch.equal(imgs[0], imgs[1])  # seed + i
    prov = json.loads((out / "synth_00001.json").read_text())
    assert prov["synthetic"] and prov["seed"] == 1 and prov["guidance"] == 2.0
    assert prov["condition"] == {"class": 1, "class_name": "chest"} and prov["model_hash"] == model_hash(synth_model)
    assert prov["config"]["task"] == "synthesis"
    first = _sha(out / "synth_00000.nii.gz")
    assert main([*argv[:4], "3", *argv[5:]]) == 0  # resume: 2 skipped, 1 new; scan 0 untouched
    report = json.loads((out / "medldm-synthesize-report.json").read_text())
    assert report["counts"]["done"] == 3 and _sha(out / "synth_00000.nii.gz") == first
    # same seed in another folder reproduces scan 0 exactly
    assert main(["synthesize", "-m", str(synth_model), "-n", "1", "-o", str(tmp_path / "again"), "--condition",
                 "class=1", "--quiet"]) == 0
    assert torch.equal(load_scan(tmp_path / "again" / "synth_00000.nii.gz"), imgs[0])
    assert main(["synthesize", "-m", str(synth_model), "-n", "1", "-o", str(tmp_path / "x"), "--condition", "class=lung"]) == 2
    assert main(["synthesize", "-m", str(synth_model), "-n", "2", "-o", str(tmp_path / "dcm"), "--format", "dicom",
                 "--quiet"]) == 0
    uids = set()
    for i in range(2):
        ds = pydicom.dcmread(next((tmp_path / "dcm" / f"synth_0000{i}").glob("*.dcm")))
        assert "SYNTHETIC" in ds.SeriesDescription and ds.Modality == "CT"
        assert str(ds.get("PatientName", "")) in ("", "ANONYMOUS^MEDLDM") and not str(ds.get("PatientBirthDate", ""))
        uids.add(ds.SeriesInstanceUID)
    assert len(uids) == 2


def test_enhance_shards_cases_over_torchrun_ranks(tmp_path, models, mr_nifti):
    """`torchrun --nproc_per_node=2 -m medldm enhance` (gloo, CPU): every case done once, one merged report."""
    import os
    import socket
    import sys

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(mr_nifti, src / f"{name}.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "medldm", "enhance", "-m", str(models["denoise2"]), "-i", str(src), "-o", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert (out / "medldm-enhance-report.json").exists(), r.stderr[-3000:]
    report = json.loads((out / "medldm-enhance-report.json").read_text())
    assert report["counts"] == {"done": 3, "skipped": 0, "failed": 1}
    assert sorted(c["case"] for c in report["cases"]) == ["a", "b", "broken", "c"]
    assert all((out / f"{n}.nii.gz").exists() for n in "abc") and not list(out.glob("*.rank*.json"))


def test_refiner_of_the_model_folder_is_applied(tmp_path, models, mr_nifti):
    """A folder with stage 3 (`refiner.safetensors` + extra["refiner"]) is refined unless refine=False."""
    from safetensors.torch import save_file

    from medldm.io import load_scan
    from medldm.models import build_refiner
    from medldm.pipelines import EnhanceOptions, Enhancer

    folder = tmp_path / "m"
    shutil.copytree(models["denoise2"], folder)
    torch.manual_seed(1)
    ref = build_refiner(2, (4, 4, 4, 4, 8, 4), "instance")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "refiner.safetensors"))
    ex = json.loads((folder / "extra.json").read_text())
    ex["refiner"] = {"spatial_dims": 2, "features": [4, 4, 4, 4, 8, 4]}  # a folder from before norm/base were stored
    (folder / "extra.json").write_text(json.dumps(ex))
    img = load_scan(mr_nifti)
    enh = Enhancer(load_model(folder))
    on = enh.enhance(img, EnhanceOptions(noise_level=0.2))
    off = enh.enhance(img, EnhanceOptions(noise_level=0.2, refine=False))
    plain = Enhancer(load_model(models["denoise2"])).enhance(img, EnhanceOptions(noise_level=0.2))
    assert on.info["refined"] and not off.info["refined"] and not plain.info["refined"]
    assert torch.equal(off.image.as_tensor(), plain.image.as_tensor())
    assert (on.image.as_tensor() - off.image.as_tensor()).abs().mean() > 1.0
    assert on.image.shape == img.shape


def test_denoise_normalization_is_insensitive_to_zero_mean_noise(models, dipy_files):
    """Training normalizes clean scans and adds noise after; a percentile fit on a scan with zero-mean noise puts
    lo ~2.6 sigma below the clean level. The Enhancer moves lo back by 2.576 sigma (estimated) for scans with
    values below -sigma, and leaves magnitude (Rician, non-negative) scans as fitted."""
    from conftest import held_out_crop

    from medldm.data.degrade import gaussian_noise, rician_noise
    from medldm.data.intensity import fit_normalization
    from medldm.pipelines import EnhanceOptions, Enhancer

    enh = Enhancer(load_model(models["denoise2"]))
    ref = held_out_crop(dipy_files / "S0_10slices.nii.gz", 96, 4)
    clean = fit_normalization(ref, "MR", foreground=True)["lo"]
    g = gaussian_noise(ref, 0.05, 0)
    pg = enh._fit_normalization(g, np.asarray(g), np.zeros(g.shape, bool))
    assert pg["lo_fit"] < clean - 0.08  # the plain fit: about 2.3-2.6 sigma below
    assert abs(pg["lo"] - clean) < 0.4 * abs(pg["lo_fit"] - clean)  # measured: 0.034 vs 0.107
    r = rician_noise(ref.clamp(min=0), 0.05, 0)  # a magnitude image
    pr = enh._fit_normalization(r, np.asarray(r), np.zeros(r.shape, bool))
    assert "lo_shift" not in pr and pr == fit_normalization(r, enh.modality, foreground=True)
    res = enh.enhance(g, EnhanceOptions(steps=1))
    assert res.info["normalization"]["lo"] == pytest.approx(pg["lo"])
    # the level of a magnitude scan comes from the background's Rayleigh mode when that reads higher than the
    # wavelet estimate (which reads ~0.75 x sigma on Rician noise)
    from medldm.data.intensity import normalize
    from medldm.data.noise import estimate_noise_sigma, rayleigh_background_sigma

    x = torch.as_tensor(normalize(np.asarray(r, np.float32), pr)).float()
    wavelet = estimate_noise_sigma(x, max_slices=16, min_side=8) / 2 / enh.level_max
    got = enh.enhance(r, EnhanceOptions(steps=1)).info["noise_level"]
    rayleigh = rayleigh_background_sigma(np.asarray(r)) / (pr["hi"] - pr["lo"]) / enh.level_max
    assert got == pytest.approx(min(max(wavelet, rayleigh), 1.0)) and rayleigh > wavelet


def test_noise_beyond_the_training_range_is_warned(dipy_files):
    """A scan noisier than anything the denoiser trained on (here Gaussian sigma 30 % of the range; mr-denoise-2d
    trained up to 12 %) is denoised at the top of its range and says so, instead of passing as denoised."""
    from conftest import held_out_crop

    from medldm.pipelines.enhance import EnhanceOptions
    from medldm.shipped import open_model

    enh = open_model("mr-denoise-2d").runner
    img = held_out_crop(dipy_files / "S0_10slices.nii.gz", 48, 2)
    g = torch.Generator().manual_seed(3)
    loud = img + 0.3 * torch.randn(img.shape, generator=g)
    quiet = img + 0.02 * torch.randn(img.shape, generator=g)
    for x in (loud, quiet):
        x.meta["original_dtype"] = "float32"
    res = enh.enhance(loud, EnhanceOptions())
    assert res.info["noise_level"] == 1.0 and "beyond the model's training range" in res.info["warning"]
    ok = enh.enhance(quiet, EnhanceOptions())
    assert ok.info["noise_level"] < 1.0 and "beyond" not in (ok.info.get("warning") or "")
