"""Issue 13's goals for the shipped ``mr-synth-2d``, measured on the model as shipped. Each unmet goal is an
``xfail(strict=True)`` test whose reason holds the measured figure: when a retrained model meets a goal, its test
passes, strict xfail turns that into a failure, and the marker must go (the goal is then tracked as met).

Measures (16 samples, seeds 0-15, the model's own sampler, steps and guidance; about 10 s on one CPU core):

* smallest side of a sample (goal >= 128);
* most similar pair: the largest SSIM between two of the 16 samples, each normalized and resampled to the
  audit's comparison grid (``medldm.eval.audit_load.prepare``, 64 x 64, data range 1; goal < 0.9);
* classifier two-sample test of ``medldm audit`` (``medldm.eval.audit_stats.two_sample_test``: logistic
  regression on 36 image statistics, 5-fold cross-validation) between the samples and held-out real MR slices
  the model never saw: the axial slices of dipy's ``aniso_vox.nii.gz`` with >= 25 % foreground (12), pydicom's
  ``MR_small.dcm`` and dipy's ``t1_coronal_slice.npy`` (goal accuracy <= 0.75; 0.5 = indistinguishable).
  The issue's 1.00 was a leave-one-out classifier on thumbnails and histograms; this is the audit's test.
* conditioning on slice position with classifier-free guidance (goal: a class-conditional model);
* no sample copies a training slice: ``medldm audit``'s nearest-neighbour search (shifts up to 8 pixels, flips)
  of the 16 samples among the model's training slices (every slice of its ``data.train`` scans with >= 5 %
  foreground; the runs/shipped_data files where they exist), against the audit's absolute thresholds (SSIM 0.95,
  NCC 0.98). Met: the closest sample has NN SSIM 0.47, NCC 0.94 (479 training slices).

Measured on the shipped model retrained at 128 x 128 with contrast x slice-position classes (T1w/T2w x 4 bins,
configs/shipped/mr_synth_2d.yaml), sampled in the held-out slices' contrast (T2w, positions 0-3 in turn): smallest
side 128, most similar pair 0.61, two-sample test 1.00 (95 % CI 0.87-1.00; 13 held-out slices; sampling all 8
classes in turn instead: 0.92, CI 0.76-0.98; the T1w classes only: 0.92). The slice-position-only 128 x 128 model
before it measured 128, 0.52 and 0.96; the unconditional 64 x 64 model 64, 0.94 and 0.96 (14 slices).

A contrast x position model is sampled with the held-out contrast's classes in turn, a position model with classes
0, 1, ... in turn (their default guidance), an unconditional one without a class.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

N_SAMPLES = 16


def _pkg(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def synth():
    from medldm.models import load_model
    from medldm.pipelines.synthesize import Synthesizer
    from medldm.shipped import resolve_model

    return Synthesizer(load_model(resolve_model("mr-synth-2d")))


@pytest.fixture(scope="module")
def samples(synth) -> torch.Tensor:
    """(16, 1, 64, 64) samples on the audit's comparison grid, in [0, 1]."""
    from medldm.eval.audit_load import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for s in range(N_SAMPLES):
            img, _ = synth.generate(seed=s, label=_label(synth, s))
            out.append(prepare(img, role="synthetic", case_id=str(s), source=str(s), modality="MR", grid=64).image)
    finally:
        torch.set_num_threads(threads)
    return torch.from_numpy(np.stack(out))[:, None]


#: the contrast of the held-out real slices (dipy's aniso_vox: bright CSF; pydicom's MR_small: spin echo TE 240 ms)
HELDOUT_CONTRAST = "T2w"


def _label(synth, s: int) -> int | None:
    """Class of sample ``s``: a contrast x position model samples the held-out slices' contrast, positions in
    turn (like against like: the two-sample test compares real T2w slices with synthetic T2w slices); a position
    model its classes in turn; an unconditional model no class."""
    if not synth.num_classes:
        return None
    names = [n for n in synth.class_names if n.startswith(HELDOUT_CONTRAST + "/")]
    if names:
        return synth.class_names.index(names[s % len(names)])
    return s % synth.num_classes


def _train_entries(synth) -> list[str]:
    import yaml

    return list(yaml.safe_load((synth.bundle.path / "config.yaml").read_text())["data"]["train"])


def _heldout_real(synth) -> torch.Tensor:
    """Real MR slices the model never saw: dipy's aniso_vox axial slices, pydicom's MR_small, and dipy's T1
    coronal slice unless the model trained on it."""
    import nibabel as nib
    import pydicom

    from medldm.eval.audit_load import prepare

    dipy = _pkg("dipy") / "data" / "files"
    vol = np.asarray(nib.load(str(dipy / "aniso_vox.nii.gz")).dataobj, dtype=np.float32)
    slices = [vol[:, :, z] for z in range(vol.shape[2]) if (vol[:, :, z] > 0.1 * vol[:, :, z].max()).mean() >= 0.25]
    slices.append(pydicom.dcmread(_pkg("pydicom") / "data" / "test_files" / "MR_small.dcm").pixel_array.T)
    if not any("t1_coronal" in e for e in _train_entries(synth)):
        slices.append(np.load(dipy / "t1_coronal_slice.npy"))
    return torch.from_numpy(np.stack([
        prepare(np.asarray(s, np.float32)[:, :, None], role="holdout", case_id=str(i), source=str(i), modality="MR",
                grid=64).image for i, s in enumerate(slices)]))[:, None]


def _most_similar_pair(x: torch.Tensor) -> float:
    from medldm.metrics import ssim

    i, j = np.triu_indices(len(x), k=1)
    return float(ssim(x[i], x[j], data_range=1.0).max())


def test_smallest_side_at_least_128(synth):
    """Met since the 128 x 128 retrain (was 64)."""
    assert min(synth.size) >= 128, synth.size


def test_no_near_duplicate_pairs(samples):
    """Met since the 128 x 128 retrains: most similar pair SSIM 0.61 (was 0.94 for the unconditional 64 x 64 model)."""
    best = _most_similar_pair(samples)
    assert best < 0.9, f"most similar pair SSIM {best:.3f}"


@pytest.mark.xfail(strict=True, reason="issue 13 goal 1: classifier two-sample test of 16 T2w samples vs 13 held-out "
                                       "real T2w MR slices 1.00 accuracy (95% CI 0.87-1.00; goal <= 0.75)")
def test_two_sample_test_against_heldout_real(synth, samples):
    from medldm.eval.audit_stats import two_sample_test

    res = two_sample_test(_heldout_real(synth), samples, permutations=0)
    assert res["accuracy"] <= 0.75, res["accuracy"]


def test_conditioned_on_slice_position_with_cfg(synth):
    """Met since the retrain: contrast (T1w, T2w) x 4 slice-position bins plus the learned null class, default
    guidance 2."""
    assert synth.bundle.extra.get("class_from") == "contrast_position" and synth.num_classes == 8
    assert {n.split("/")[0] for n in synth.class_names} == {"T1w", "T2w"}
    assert synth.dcfg.guidance > 1 and synth.bundle.config["diffusion"]["cfg_dropout"] > 0


def test_measures_are_what_the_reasons_say(synth, samples):
    """The figures in the xfail reasons, re-measured, so a stale reason is noticed (the model is deterministic
    for fixed seeds; tolerances cover CPU arithmetic)."""
    from medldm.eval.audit_stats import two_sample_test

    assert min(synth.size) == 128
    assert _most_similar_pair(samples) == pytest.approx(0.61, abs=0.03)
    real = _heldout_real(synth)
    assert len(real) == 13
    assert two_sample_test(real, samples, permutations=0)["accuracy"] >= 0.85


def test_no_sample_copies_a_training_slice(synth, samples):
    """Issue 13 goal 1, met: ``medldm audit``'s memorization test finds no near-copy among the 16 samples."""
    from medldm.data.datasets import resolve_path
    from medldm.eval.audit import AuditOptions
    from medldm.eval.audit_load import prepare
    from medldm.eval.audit_match import nearest_neighbours
    from medldm.io import load_scan

    train = []
    for entry in _train_entries(synth):  # runs/shipped_data files exist only where tools/prepare_shipped_data ran
        path = resolve_path(entry)
        if not path.exists():
            continue
        vol = np.asarray(load_scan(str(path)), dtype=np.float32)
        vol = vol[..., 0] if vol.ndim == 4 else vol
        for z in range(vol.shape[2]):
            sl = vol[:, :, z]
            if (sl > sl.min() + 0.05 * (sl.max() - sl.min())).mean() >= 0.05:
                train.append(prepare(sl[:, :, None], role="train", case_id=str(z), source=entry, modality="MR",
                                     grid=64).image)
    assert len(train) > 100
    matches = nearest_neighbours(samples, torch.from_numpy(np.stack(train))[:, None], shift=8, flips=True,
                                 candidates=10)
    opt = AuditOptions()
    worst_ssim, worst_ncc = max(m.ssim for m in matches), max(m.ncc for m in matches)
    assert worst_ssim < opt.ssim_floor and worst_ncc < opt.ncc_floor, (worst_ssim, worst_ncc)
