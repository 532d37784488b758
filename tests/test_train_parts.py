"""Pieces of the training path: scan split, crops, pairs/conditioning, checkpoint RNG state, engine helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medldm.data.condition import add_noise, downsample_upsample, make_pair
from medldm.data.datasets import (
    ItemStore,
    ScanRef,
    collect_scans,
    load_volumes,
    make_items,
    split_scans,
    step_rng,
)
from medldm.models.conditioning import depth_to_space, space_to_depth


def test_split_is_by_scan_seeded_and_order_free():
    refs = [ScanRef(f"/data/sub{i:02d}.nii.gz", f"/data/sub{i:02d}.nii.gz") for i in range(10)]
    tr, va = split_scans(refs, 0.2, seed=3)
    assert len(va) == 2 and not {r.id for r in tr} & {r.id for r in va}
    tr2, va2 = split_scans(list(reversed(refs)), 0.2, seed=3)
    assert {r.id for r in va2} == {r.id for r in va}
    assert split_scans(refs[:1], 0.5, 0) == (refs[:1], [])


def test_items_and_aligned_crops_on_a_real_scan(dipy_files):
    refs = collect_scans([str(dipy_files / "S0_10slices.nii.gz")])
    vols = load_volumes(refs)
    assert vols[0]["norm"]["method"] == "percentile" and vols[0]["image"].shape == (128, 128, 10)
    items = make_items(vols, spatial_dims=2, slice_axis=2, patch=(48, 48), factor=8, min_foreground=0.05)
    assert 1 <= len(items) <= 10 and all(it.image.shape[1] % 8 == 0 for it in items)
    store = ItemStore(items, (48, 48), 8)
    idx, corners = store.draw(step_rng(0, 5), 6)
    assert all(c % 8 == 0 for cc in corners for c in cc)
    crops = store.crop(idx, corners)
    assert crops.shape == (6, 1, 48, 48)
    idx2, corners2 = store.draw(step_rng(0, 5), 6)  # same step -> same batch
    assert np.array_equal(idx, idx2) and corners == corners2
    vol3 = make_items(vols, spatial_dims=3, slice_axis=2, patch=(32, 32, 16), factor=4)
    assert len(vol3) == 1 and vol3[0].image.shape == (1, 128, 128, 16)  # z padded from 10 to the patch


def test_reformat_adds_the_other_planes_of_isotropic_volumes_only():
    from medldm.train.schema import DataConfig

    g = torch.Generator().manual_seed(0)
    iso = {"image": torch.rand(40, 36, 32, generator=g), "id": "iso", "source": 0, "spacing": [1.0, 1.1, 1.0]}
    thick = {"image": torch.rand(40, 36, 32, generator=g), "id": "thick", "source": 1, "spacing": [1.0, 1.0, 3.0]}
    flat = {"image": torch.rand(40, 36, 8, generator=g), "id": "flat", "source": 2, "spacing": [1.0, 1.0, 1.0]}
    kw = {"spatial_dims": 2, "slice_axis": 2, "patch": (32, 32), "factor": 4}
    plain = make_items([iso, thick, flat], **kw)
    items = make_items([iso, thick, flat], **kw, reformat=True)
    n = {k: sum(it.scan == k for it in items) for k in ("iso", "thick", "flat")}
    # iso: 32 axial + 40 planes along axis 0 + 36 along axis 1; thick (1 x 3 mm planes) and flat (8 px planes,
    # narrower than the patch) keep their axial slices only
    assert n == {"iso": 32 + 40 + 36, "thick": 32, "flat": 8} and len(plain) == 32 + 32 + 8
    along0 = [it for it in items if it.scan == "iso"][32 + 5]  # the 6th plane along axis 0 is img[5]
    assert torch.equal(along0.image[0], iso["image"][5]) and along0.image.shape == (1, 36, 32)
    with pytest.raises(ValueError, match="reformat"):
        DataConfig(train=["a"], reformat=True, class_from="slice_position")


@pytest.mark.parametrize("upsample", ["linear", "cubic"])
def test_sr_condition_is_the_same_in_training_and_inference(upsample):
    """degrade.upsample: the training pair's low-res input on the high-res grid (area down-sampling, then
    bilinear / bicubic) equals the condition inference makes of the low-res scan (one function,
    ``medldm.data.condition.scan_condition``, on the same ``upsample_grid``), slice by slice along any axis."""
    import torch.nn.functional as F

    from medldm.data.condition import scan_condition

    g = torch.Generator().manual_seed(1)
    clean = torch.rand(3, 1, 24, 16, generator=g)  # 3 slices
    train = downsample_upsample(clean, 2, "downsample", upsample=upsample)[:, 0]  # (3, 24, 16)
    low = F.avg_pool2d(clean, 2)[:, 0]  # the scan a user has: (3, 12, 8)
    from medldm.models.config import DegradeConfig

    degrade = DegradeConfig(kind="downsample", scale=2, upsample=upsample)  # the model card's typed section
    for axis in (0, 2):
        vol = low if axis == 0 else low.permute(1, 2, 0)  # slices along `axis`
        cond, shape = scan_condition(vol, "sr", degrade, axis=axis, dims=2, seed=0)
        got = cond if axis == 0 else cond.permute(2, 0, 1)
        assert tuple(shape) == tuple(cond.shape) and torch.allclose(got, train, atol=1e-6)
    assert not torch.allclose(downsample_upsample(clean, 2, upsample="cubic"), downsample_upsample(clean, 2))


def test_cubic_upsampling_is_for_2d_sr_only():
    from medldm.config import ConfigError
    from medldm.train.schema import load_config

    cfg = {"task": "sr", "spatial_dims": 2, "data": {"train": ["a"], "patch_size": [32, 32]},
           "degrade": {"kind": "downsample", "upsample": "cubic"}}
    assert load_config(cfg).degrade.upsample == "cubic"
    with pytest.raises(ConfigError, match="upsample"):
        load_config({**cfg, "spatial_dims": 3, "data": {"train": ["a"], "patch_size": [32, 32, 32]}})
    with pytest.raises(ConfigError, match="upsample"):
        load_config({**cfg, "task": "denoise", "degrade": {"kind": "gaussian", "upsample": "cubic"}})


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (2, 1, 8, 4, 12)])
def test_space_to_depth_is_lossless(shape):
    x = torch.randn(shape)
    y = space_to_depth(x, 4)
    assert y.shape[1] == shape[1] * 4 ** (len(shape) - 2) and y.shape[2:] == tuple(s // 4 for s in shape[2:])
    assert torch.equal(depth_to_space(y, 4), x)


def test_degradations_hit_their_levels():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 1, 64, 64)
    y = add_noise(x, torch.full((4,), 0.05), "gaussian", g)
    assert float(y.std()) == pytest.approx(2 * 0.05, rel=0.05)  # sigma relative to the range width 2
    const = torch.full((1, 1, 32, 32, 8), 0.3)
    assert torch.allclose(downsample_upsample(const, 2, "downsample"), const)
    ramp = torch.arange(8.0).view(1, 1, 1, 1, 8).expand(1, 1, 4, 4, 8).contiguous()
    thick = downsample_upsample(ramp, 2, "thick")
    assert torch.equal(thick[0, 0, 0, 0], torch.tensor([0.5, 0.5, 2.5, 2.5, 4.5, 4.5, 6.5, 6.5]))

    class D:
        kind, scale, level_range, noise_aug_range = "downsample", 2, (0.0, 0.1), (0.0, 0.1)

    low, level = make_pair(torch.zeros(3, 1, 16, 16), "sr", D, torch.Generator().manual_seed(1))
    assert low.shape == (3, 1, 16, 16) and bool(((level >= 0) & (level <= 1)).all())
    _, fixed = make_pair(torch.zeros(3, 1, 16, 16), "sr", D, torch.Generator(), sigma=0.05)
    assert torch.allclose(fixed, torch.full((3,), 0.5))


def test_blind_denoise_pairs_mix_gaussian_and_rician():
    """degrade.rician_fraction: that share of the samples gets Rician noise (on a zero-intensity image its
    magnitude has a Rayleigh mean s * sqrt(pi / 2) > 0, Gaussian noise a zero mean); validation (fixed sigma)
    uses degrade.kind only."""
    from medldm.train.schema import DegradeConfig

    clean = -torch.ones(64, 1, 32, 32)  # model range [-1, 1]: intensity 0
    means = {}
    for frac in (0.0, 0.5, 1.0):
        d = DegradeConfig(kind="gaussian", level_range=(0.05, 0.05), rician_fraction=frac)
        y, level = make_pair(clean, "denoise", d, torch.Generator().manual_seed(0))
        assert torch.allclose(level, torch.ones(64))
        means[frac] = ((y + 1) / 2).mean(dim=(1, 2, 3))  # per-sample mean intensity in [0, 1] units
    rayleigh = 0.05 * (np.pi / 2) ** 0.5
    assert float(means[0.0].abs().max()) < 0.005
    assert float((means[1.0] - rayleigh).abs().max()) < 0.005
    rician = means[0.5] > rayleigh / 2
    assert 16 <= int(rician.sum()) <= 48  # about half of the 64 samples
    fixed, _ = make_pair(clean, "denoise", DegradeConfig(kind="gaussian", rician_fraction=1.0),
                         torch.Generator().manual_seed(0), 0.05)
    assert float(((fixed + 1) / 2).mean()) == pytest.approx(0.0, abs=0.002)
    with pytest.raises(ValueError, match="rician_fraction"):
        DegradeConfig(rician_fraction=1.5)


def test_refiner_noise_map_is_a_third_input():
    """A refiner built with the noise map (RefinerSpec inputs [decoded, degraded, noise_level]) has 3 input
    channels and its output depends on the level; a refiner without it refuses a level."""
    from medldm.models.refiner import RefinerSpec, apply_refiner, build_from_spec

    spec = RefinerSpec(spatial_dims=2, features=(4, 4, 8, 8, 16, 4), norm="none", base="degraded",
                       inputs=("decoded", "degraded", "noise_level"))
    assert spec.noise_map and RefinerSpec(**{**spec.to_extra(), "inputs": ("decoded", "degraded"),
                                             "features": spec.features}).noise_map is False
    torch.manual_seed(0)
    net = build_from_spec(spec).eval()
    d, y = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        lo = apply_refiner(net, d, y, "degraded", 0.1)
        hi = apply_refiner(net, d, y, "degraded", torch.tensor([0.9, 0.9]))
        per = apply_refiner(net, d, y, "degraded", torch.tensor([0.1, 0.9]))
    assert float((lo - hi).abs().mean()) > 1e-5
    assert torch.allclose(per[0], lo[0]) and torch.allclose(per[1], hi[1])  # one level per sample
    two = build_from_spec(RefinerSpec(spatial_dims=2, features=spec.features, norm="none", base="degraded"))
    with pytest.raises(RuntimeError):
        apply_refiner(two, d, y, "degraded", 0.1)
    with pytest.raises(ValueError, match="inputs"):
        RefinerSpec(spatial_dims=2, features=spec.features, norm="none", base="degraded", inputs=("degraded",))


def test_sr_pre_blur_reproduces_skimage_anti_aliasing(dipy_files):
    """Pre-blur 0.5 px + area down-sampling == skimage.transform.resize(anti_aliasing=True) at x2 (the demo's and
    the issue's low-res kernel); blur sigmas are drawn per sample, sigma 0 leaves a sample unchanged."""
    from skimage.transform import resize

    from medldm.data.condition import gaussian_blur_inplane
    from medldm.io.reader import load_scan

    sl = np.asarray(load_scan(dipy_files / "S0_10slices.nii.gz"))[:, :, 5].astype(np.float64)
    sl = sl / sl.max()
    x = torch.as_tensor(sl, dtype=torch.float32)[None, None]
    ours = torch.nn.functional.avg_pool2d(gaussian_blur_inplane(x, torch.tensor([0.5])), 2)[0, 0].numpy()
    ref = resize(sl, (sl.shape[0] // 2, sl.shape[1] // 2), anti_aliasing=True, order=1)
    assert np.abs(ours - ref).max() < 1e-5
    two = torch.cat([x, x])
    out = gaussian_blur_inplane(two, torch.tensor([0.0, 0.8]))
    assert torch.equal(out[0], x[0]) and float((out[1] - x[0]).abs().mean()) > 1e-3

    class D:
        kind, scale, level_range, noise_aug_range, blur_range = "downsample", 2, (0.0, 0.1), (0.0, 0.0), (0.0, 0.8)

    low, _ = make_pair(two, "sr", D, torch.Generator(), sigma=0.0)  # validation: skimage's kernel (0.5 px)
    up = torch.nn.functional.interpolate(torch.as_tensor(ref, dtype=torch.float32)[None, None], scale_factor=2,
                                         mode="bilinear", align_corners=False)
    assert float((low[0] - up[0]).abs().max()) < 1e-5


def test_lr_schedule_warmup_then_cosine():
    from medldm.train.engine import _lr_factor

    assert _lr_factor(0, 10) == pytest.approx(0.1) and _lr_factor(50, 10, 100) == 1.0  # constant by default
    f = [_lr_factor(s, 10, 110, "cosine") for s in range(110)]
    assert f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # decays monotonically
    assert f[60] == pytest.approx(0.505, abs=1e-3) and 0.01 <= f[-1] < 0.02


def test_refiner_residual_base_and_size_independence():
    """base 'degraded' adds the residual to the degraded input; without normalization layers a crop of the output
    equals the output of the crop away from the borders (the refiner is applied to whole slices)."""
    from medldm.models.refiner import apply_refiner, build_refiner

    torch.manual_seed(0)
    net = build_refiner(2, (4, 4, 8, 8, 16, 4), "none").eval()
    d, y = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a = apply_refiner(net, d, y, "degraded") - y
        b = apply_refiner(net, d, y, "decoded") - d
        assert torch.allclose(a, b, atol=1e-6)
        big = net(torch.cat([d, y], 1))
        crop = net(torch.cat([d, y], 1)[..., 16:48, 16:48])
    assert float((big[..., 24:40, 24:40] - crop[..., 8:24, 8:24]).abs().max()) < 1e-4


def test_rng_state_round_trip():
    from medldm.train.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_prepare_channels_last_3d_and_runtime_on_cpu():
    from medldm.config import from_mapping
    from medldm.models import VAEConfig, build_vae
    from medldm.train.engine import Runtime, make_runtime, prepare
    from medldm.train.schema import EngineConfig

    rt = make_runtime(from_mapping(EngineConfig, {}))
    assert rt.device.type == "cpu" and rt.amp_dtype is None and not rt.fused_adamw and not rt.channels_last
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            make_runtime(from_mapping(EngineConfig, {"device": "cuda"}))
    cl = Runtime(device=torch.device("cpu"), amp_dtype=None, dist=rt.dist, channels_last=True)
    vae = build_vae(VAEConfig(spatial_dims=3, channels=(8, 16), attention_levels=(False, False), norm_num_groups=4,
                              latent_channels=2, num_res_blocks=1))
    net = prepare(vae, cl, ddp=False)
    x = cl.to(torch.randn(1, 1, 8, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    recon, mu, sigma = net(x)
    recon.mean().backward()
    assert recon.shape == x.shape


def test_vae_stage_with_all_optional_losses(tmp_path, dipy_files):
    """Adversarial (from adv_start), SSIM and gradient terms train together under bf16 autocast; the log widens
    when they appear."""
    from pathlib import Path

    from medldm.train import train
    from medldm.train.logging import read_log
    from medldm.train.schema import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "synthesis_2d_tiny.yaml",
                      ["stage=vae", "vae_train.steps=6", "vae_train.log_every=1", "vae_train.adv_weight=0.1",
                       "vae_train.adv_start=3", "vae_train.ssim_weight=0.2", "vae_train.grad_weight=0.5",
                       "vae_train.ema_decay=0.9", "vae_train.ckpt_every=3",
                       "engine.precision=bf16"])  # the CUDA autocast path, exercised on CPU
    train(cfg, tmp_path)
    rows = read_log(tmp_path / "vae" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "adv_d" not in rows[1] and rows[4]["adv_d"] > 0 and rows[4]["ssim"] > 0 and rows[4]["grad"] > 0
    ckpt = tmp_path / "vae" / "checkpoint"
    assert {"vae.safetensors", "vae_ema.safetensors", "discriminator.safetensors", "trainer_state.pt"} <= {
        p.name for p in ckpt.iterdir()}
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and set(state["optimizers"]) == {"vae", "discriminator"}
    from medldm.models import load_model

    assert load_model(tmp_path / "model").vae is not None  # vae-only run: OUT/model is the VAE folder


def test_collect_scans_from_folder_and_list_file(tmp_path, dipy_files, dicomdir_tests):
    """A folder mixing NIfTI and DICOM series, and a list file, become one scan ref per scan."""
    import shutil

    root = tmp_path / "data"
    (root / "nii").mkdir(parents=True)
    shutil.copy(dipy_files / "S0_10slices.nii.gz", root / "nii" / "a.nii.gz")
    shutil.copytree(dicomdir_tests / "98892001" / "CT5N", root / "dcm")
    refs = collect_scans([str(root)])
    kinds = sorted("dicom" if r.files else "nifti" for r in refs)
    assert kinds == ["dicom", "nifti"]
    dicom = next(r for r in refs if r.files)
    assert len(dicom.files) == 5
    vols = load_volumes(refs)
    assert sorted(tuple(v["image"].shape) for v in vols) == [(16, 16, 5), (128, 128, 10)]
    assert {v["norm"]["method"] for v in vols} == {"window", "percentile"}  # CT: HU window; MR: percentiles
    lst = tmp_path / "list.txt"
    lst.write_text(f"# training scans\n{dipy_files / 'aniso_vox.nii.gz'}\nnii/a.nii.gz\n")
    (tmp_path / "nii").symlink_to(root / "nii")
    assert [r.path.endswith(("aniso_vox.nii.gz", "a.nii.gz")) for r in collect_scans([str(lst)])] == [True, True]
    with pytest.raises(Exception, match="not found"):
        collect_scans([str(tmp_path / "missing")])


def test_disk_cache_parses_each_scan_once(tmp_path, dipy_files, monkeypatch):
    """PersistentDataset: a second load of the same scans reads the cache instead of the files."""
    import medldm.data.datasets as ds

    refs = collect_scans([str(dipy_files / "aniso_vox.nii.gz")])
    first = load_volumes(refs, cache="disk", cache_dir=tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())

    def boom(self, ref):  # parsing again would fail the test
        raise AssertionError("scan parsed again")

    monkeypatch.setattr(ds.LoadNormalize, "__call__", boom)
    again = load_volumes(refs, cache="disk", cache_dir=tmp_path / "cache")
    assert torch.equal(first[0]["image"], again[0]["image"]) and again[0]["norm"] == first[0]["norm"]


def test_vae_export_scale_factor_and_metrics_are_those_of_the_saved_weights(tmp_path, dipy_files):
    """With EMA on, the exported VAE is the averaged one: its stored scale_factor and validation metrics are
    recomputed exactly from the saved weights (and differ from those of the raw, last-step weights)."""
    from pathlib import Path

    from medldm.models import load_model
    from medldm.train import train
    from medldm.train.data import build_data
    from medldm.train.engine import make_runtime
    from medldm.train.schema import load_config
    from medldm.train.vae_stage import VAEStage

    cfg = load_config(Path(__file__).parents[1] / "configs" / "synthesis_2d_tiny.yaml",
                      ["stage=vae", "vae_train.steps=8", "vae_train.ema_decay=0.9", "vae_train.ckpt_every=8",
                       "vae_train.lr=0.005"])
    train(cfg, tmp_path)
    saved = load_model(tmp_path / "vae" / "model")
    stage = VAEStage(cfg, build_data(cfg, tmp_path, quiet=True), make_runtime(cfg.engine))
    ckpt = load_model(tmp_path / "vae" / "checkpoint", ema=False)  # the raw weights of the last step
    stage.vae.load_state_dict(ckpt.vae.state_dict())
    raw_scale, raw_metrics = stage.compute_scale_factor(), stage.validate(8)
    stage.ema = {}
    stage.vae.load_state_dict(saved.vae.state_dict())
    assert stage.compute_scale_factor() == pytest.approx(saved.extra["scale_factor"], rel=1e-6)
    assert stage.validate(8) == pytest.approx(saved.extra["val_metrics"], rel=1e-6)
    assert abs(raw_scale - saved.extra["scale_factor"]) > 1e-4 * raw_scale  # the test can tell them apart
    assert raw_metrics != pytest.approx(saved.extra["val_metrics"], rel=1e-4)
