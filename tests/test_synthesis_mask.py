"""Mask-conditioned synthesis (issue 13 item 2): tissue label maps medldm derives, the ``condition: mask``
training option, ``medldm synthesize --mask`` writing image/label pairs, and a tiny trained model whose samples
follow the label map better than its own unconditioned samples do."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.config import ConfigError
from medldm.data.tissue import dice_per_class, one_hot, tissue_labels
from medldm.train.schema import load_config

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "synthesis_mask_2d_tiny.yaml"
K = 4


# ------------------------------------------------------------------------------------------ derived labels
def test_tissue_labels_are_background_plus_intensity_clusters_darkest_first():
    rng = np.random.default_rng(0)
    img = np.full((40, 40), -1.0)
    img[5:35, 5:35] = 0.0 + 0.02 * rng.standard_normal((30, 30))  # dark tissue
    img[10:30, 10:30] = 0.4 + 0.02 * rng.standard_normal((20, 20))  # middle
    img[15:25, 15:25] = 0.9 + 0.02 * rng.standard_normal((10, 10))  # bright
    lab = tissue_labels(torch.from_numpy(img), K).numpy()
    assert lab.dtype == np.int64 and lab.shape == img.shape
    assert (lab[:5] == 0).all()  # background
    assert lab[7, 7] == 1 and lab[12, 12] == 2 and lab[20, 20] == 3
    assert set(np.unique(lab)) == {0, 1, 2, 3}


def test_tissue_labels_of_a_constant_image_are_background():
    assert int(tissue_labels(torch.zeros(8, 8), K).max()) == 0


def test_one_hot_refuses_labels_the_model_does_not_know():
    with pytest.raises(ValueError, match="0..3"):
        one_hot(torch.tensor([[0, 4]]), K)


def test_mni_tissue_classes_overlap_nilearn_grey_and_white_matter(mni152):
    """The derived classes mean something: on an axial MNI152 T1 slice, nilearn's WM map (p > 0.5) is matched
    best by the brightest class and its GM map by the middle one. The margins are small (Dice 0.71 vs 0.53 for
    WM, 0.57 vs 0.54 for GM) because scalp and fat fall into the same intensity classes: documented limit."""
    t1 = np.asarray(nib.load(mni152).dataobj, dtype=np.float32)[:, :, 100]
    folder = mni152.parent
    gm = np.asarray(nib.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj)[:, :, 100] > 0.5
    wm = np.asarray(nib.load(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj)[:, :, 100] > 0.5
    lab = tissue_labels(t1, K).numpy()

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert int(np.argmax([dice(lab == c, wm) for c in range(K)])) == 3
    assert int(np.argmax([dice(lab == c, gm) for c in range(K)])) == 2
    assert dice(lab == 3, wm) > 0.6


# ------------------------------------------------------------------------------------------ schema
def test_condition_mask_derives_the_condition_channels():
    cfg = load_config(TINY)
    assert cfg.condition == "mask" and cfg.data.mask_classes == K
    assert cfg.unet.cond_channels == K * cfg.factor ** 2


@pytest.mark.parametrize("overrides, match", [
    (["task=sr", "degrade.kind=downsample"], "condition: 'mask' is for task 'synthesis'"),
    (["data.mask_classes=1"], "data.mask_classes: needs >= 2"),
])
def test_condition_mask_bad_settings_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, overrides)


# ------------------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mni152):
    from medldm.train.runner import train

    out = tmp_path_factory.mktemp("mask") / "run"
    train(load_config(TINY), out)
    return out


@pytest.fixture(scope="module")
def masks(tiny):
    """Label maps of 8 training slices spread over the head, as medldm derives them (the training condition)."""
    from medldm.train.data import build_data

    store = build_data(load_config(tiny / "config.yaml"), tiny, quiet=True).train
    idx = np.linspace(0, len(store) - 1, 8).round().astype(int)
    return [tissue_labels(store.items[i].image[0], K) for i in idx], [store.items[i].image[0] for i in idx]


def test_tiny_model_folder_records_the_mask_condition(tiny):
    extra = json.loads((tiny / "model" / "extra.json").read_text())
    assert extra["task"] == "synthesis" and extra["condition"] == "mask" and extra["mask_classes"] == K
    assert "k-means" in extra["mask_method"]


def test_samples_follow_the_mask_better_than_unconditioned_samples(tiny, masks):
    """Dice (classes 1-3) between the mask and the derived segmentation of the sample, conditioned on that mask
    vs unconditioned (the same network, the no-mask condition it was trained with) with the same seeds; and the
    classes' mean intensities in conditioned samples keep the training data's order (darkest class first)."""
    from medldm.models import load_model
    from medldm.pipelines.synthesize import Synthesizer

    syn = Synthesizer(load_model(tiny / "model"))
    dc, du, ordered, real_ordered = [], [], 0, 0
    for k, (m, real) in enumerate(zip(*masks, strict=True)):
        a, info = syn.generate(seed=k, mask=m.numpy(), steps=10)
        b, _ = syn.generate(seed=k, steps=10)
        assert info["mask"] and a.shape == (*m.shape, 1)
        dc.append(np.nanmean(dice_per_class(tissue_labels(a[..., 0], K), m, K)))
        du.append(np.nanmean(dice_per_class(tissue_labels(b[..., 0], K), m, K)))
        means = [float(a[..., 0][m == c].mean()) for c in range(1, K) if (m == c).any()]
        ordered += bool(np.all(np.diff(means) > 0))
        rmeans = [float(real[m == c].mean()) for c in range(1, K) if (m == c).any()]
        real_ordered += bool(np.all(np.diff(rmeans) > 0))
    dc, du = np.asarray(dc), np.asarray(du)
    # paired: every mask is followed better, and on average by more than the spread of the unconditioned Dice
    print("mask Dice conditioned", dc.round(3), "unconditioned", du.round(3))
    assert (dc > du).mean() >= 0.75, (dc.round(3), du.round(3))
    assert dc.mean() > du.mean() + du.std(), (dc.round(3), du.round(3))
    assert real_ordered == len(dc)  # by construction of the labels
    assert ordered >= len(dc) - 2, ordered


def test_cli_writes_image_label_pairs_on_the_mask_grid(tiny, masks, tmp_path):
    from medldm.cli import main

    m = masks[0][3].numpy()[:30].astype(np.uint8)  # 30 rows: padded to the U-Net's multiple and cropped back
    affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(m[:, :, None], affine), tmp_path / "labels.nii.gz")
    out = tmp_path / "out"
    rc = main(["synthesize", "-m", str(tiny / "model"), "--mask", str(tmp_path / "labels.nii.gz"), "-n", "2",
               "-o", str(out), "--steps", "4", "--quiet"])
    assert rc == 0
    for i in range(2):
        img = nib.load(out / f"synth_{i:05d}.nii.gz")
        lab = nib.load(out / f"synth_{i:05d}_labels.nii.gz")
        assert img.shape[:2] == lab.shape[:2] == m.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        np.testing.assert_allclose(lab.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(lab.dataobj).reshape(m.shape), m)
        rec = json.loads((out / f"synth_{i:05d}.json").read_text())
        assert rec["synthetic"] is True and rec["mask"]["shape"] == list(m.shape)
        assert sum(rec["mask"]["voxels_per_label"]) == m.size
    # a rerun resumes (nothing redone); DICOM output carries no identifiers but its own
    assert main(["synthesize", "-m", str(tiny / "model"), "--mask", str(tmp_path / "labels.nii.gz"), "-n", "2",
                 "-o", str(out), "--steps", "4", "--quiet"]) == 0
    dcm_out = tmp_path / "dcm"
    assert main(["synthesize", "-m", str(tiny / "model"), "--mask", str(tmp_path / "labels.nii.gz"), "-n", "1",
                 "-o", str(dcm_out), "--steps", "4", "--format", "dicom", "--quiet"]) == 0
    import pydicom

    ds = pydicom.dcmread(next((dcm_out / "synth_00000").glob("*.dcm")))
    assert "SYNTHETIC" in str(ds.SeriesDescription)
    assert str(ds.get("PatientName", "")).upper().startswith("ANONYMOUS")  # no identifier of a real person
    assert (dcm_out / "synth_00000_labels.nii.gz").is_file()


@pytest.mark.parametrize("values, msg", [(5, "labels 0..3"), (1.5, "whole numbers")])
def test_cli_bad_mask_is_a_usage_error(tiny, tmp_path, capsys, values, msg):
    from medldm.cli import main

    m = np.zeros((32, 32, 1), np.float32)
    m[4, 4] = values
    nib.save(nib.Nifti1Image(m, np.eye(4)), tmp_path / "bad.nii.gz")
    rc = main(["synthesize", "-m", str(tiny / "model"), "--mask", str(tmp_path / "bad.nii.gz"), "-n", "1",
               "-o", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_mask_on_a_model_without_mask_condition_is_a_usage_error(tmp_path, capsys):
    from medldm.cli import main

    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    rc = main(["synthesize", "-m", "mr-synth-2d", "--mask", str(tmp_path / "m.nii.gz"), "-n", "1",
               "-o", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "not mask-conditioned" in capsys.readouterr().err
