"""`medldm audit` on real scans: MNI152 and dipy S0 slices as training data, their copies (exact,
noised, shifted) and unrelated real scans (dipy PIESNO diffusion MR, pydicom MR_small) as "synthetic"
samples; diversity and the realism two-sample test on MNI152 slices."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medldm.cli import main
from medldm.eval.audit_load import prepare, stack
from medldm.eval.audit_match import nearest_neighbours
from medldm.eval.audit_stats import diversity, ms_ssim_scales, two_sample_test

MNI_TRAIN = list(range(50, 140, 10))  # axial slices of the MNI152 template used as "training" images
S0_TRAIN = [0, 2, 4, 6, 8]


def _save(arr: np.ndarray, affine: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine), str(path))


def _slice(vol: np.ndarray, z: int) -> np.ndarray:
    return vol[:, :, z:z + 1]


@pytest.fixture(scope="module")
def volumes(mni152, dipy_files):
    out = {}
    for name, path in (("mni", mni152), ("s0", dipy_files / "S0_10slices.nii.gz"),
                       ("piesno", dipy_files / "test_piesno.nii.gz")):
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        out[name] = (arr.reshape(arr.shape[:3]), img.affine)  # S0_10slices is stored 4D (128, 128, 10, 1)
    return out


@pytest.fixture(scope="module")
def audit2d(volumes, pydicom_files, tmp_path_factory):
    """Folders train/ holdout/ synthetic/ of 2D slices (X, Y, 1) and the audit run over them."""
    root = tmp_path_factory.mktemp("audit")
    (mni, a_mni), (s0, a_s0), (pie, a_pie) = volumes["mni"], volumes["s0"], volumes["piesno"]
    for z in MNI_TRAIN:
        _save(_slice(mni, z), a_mni, root / "train" / f"mni_z{z:03d}.nii.gz")
    for z in S0_TRAIN:
        _save(_slice(s0, z), a_s0, root / "train" / f"s0_z{z}.nii.gz")
    # held-out: other slices (5 mm / one slice away from the training ones) and other scans
    for z in range(55, 135, 10):
        _save(_slice(mni, z), a_mni, root / "holdout" / f"mni_z{z:03d}.nii.gz")
    for z in (1, 5, 9):
        _save(_slice(s0, z), a_s0, root / "holdout" / f"s0_z{z}.nii.gz")
    rng = np.random.default_rng(0)
    syn = root / "synthetic"
    _save(_slice(mni, 90), a_mni, syn / "copy_mni90.nii.gz")
    base = _slice(mni, 110)
    _save(base + rng.normal(0, 0.03 * base.max(), base.shape), a_mni, syn / "noised_mni110.nii.gz")
    _save(np.roll(_slice(s0, 4), (2, -4), axis=(0, 1)), a_s0, syn / "shifted_s0_4.nii")
    _save(_slice(pie, 7), a_pie, syn / "unrelated_piesno7.nii.gz")
    (syn / "dicom").mkdir()
    shutil.copy(pydicom_files / "MR_small.dcm", syn / "dicom" / "mr_small.dcm")  # unrelated real MR (DICOM)
    _save(_slice(s0, 6)[::-1], a_s0, syn / "flipped_s0_6.nii.gz")  # a left-right mirrored copy
    (syn / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = root / "report"
    status = main(["audit", "--synthetic", str(syn), "--train", str(root / "train"), "--holdout",
                   str(root / "holdout"), "-o", str(out), "--grid", "64", "--permutations", "20", "--quiet"])
    return root, out, status


def _rows(report) -> dict[str, dict]:
    audit = json.loads((report / "audit.json").read_text())
    return {r["id"]: r for r in audit["synthetic"]}


def test_memorization_flags_copies_not_unrelated(audit2d):
    root, report, status = audit2d
    assert status == 1  # the broken file fails (one line), everything else is audited
    audit = json.loads((report / "audit.json").read_text())
    assert len(audit["failed"]) == 1 and "broken" in audit["failed"][0]
    assert audit["counts"] == {"synthetic": 6, "train": 14, "holdout": 11, "failed": 1}
    rows = _rows(report)
    thr = audit["memorization"]["thresholds"]
    assert thr["source"].startswith("held-out") and thr["ssim"] >= 0.95 and thr["ncc"] >= 0.98
    assert rows["copy_mni90"]["flagged"] and rows["copy_mni90"]["nn_ssim_train"] == "mni_z090"
    assert rows["copy_mni90"]["nn_ssim"] > 0.999 and rows["copy_mni90"]["shift"] == [0, 0]
    assert rows["noised_mni110"]["flagged"] and rows["noised_mni110"]["nn_ncc_train"] == "mni_z110"
    assert rows["shifted_s0_4"]["flagged"] and rows["shifted_s0_4"]["nn_ssim_train"] == "s0_z4"
    assert rows["shifted_s0_4"]["shift"] != [0, 0]
    assert rows["flipped_s0_6"]["flagged"] and rows["flipped_s0_6"]["flipped"]
    for unrelated in ("unrelated_piesno7", "dicom"):
        assert not rows[unrelated]["flagged"], rows[unrelated]
        assert rows[unrelated]["nn_ssim"] < thr["ssim"] and rows[unrelated]["nn_ncc"] < thr["ncc"]
    # held-out scans are the reference: at most 1 % of them above the thresholds by construction
    assert all(not r["flagged"] for r in audit["holdout"])
    assert max(r["nn_ssim"] for r in audit["holdout"]) < rows["shifted_s0_4"]["nn_ssim"]
    # the CSV holds the same table
    with open(report / "audit.csv", newline="") as f:
        table = {r["id"]: r for r in csv.DictReader(f) if r["role"] == "synthetic"}
    assert {k: v["flagged"] == "True" for k, v in table.items()} == {k: r["flagged"] for k, r in rows.items()}
    run_report = json.loads((report / "run_report.json").read_text())
    assert run_report["counts"]["failed"] == 1


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.stack = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack[-3:], tag)
        self.stack.pop()


def test_html_and_pair_panels(audit2d):
    _, report, _ = audit2d
    html = (report / "audit.html").read_text()
    parser = _Collect()
    parser.feed(html)
    assert not parser.stack and parser.tables >= 5
    audit = json.loads((report / "audit.json").read_text())
    panels = {p["id"]: p for p in audit["panels"]}
    flagged = [r["id"] for r in audit["synthetic"] if r["flagged"]]
    assert set(flagged) <= set(panels) and all(panels[i]["png"] in parser.imgs for i in flagged)
    assert "0.95" in html and "held-out" in html
    from medldm.eval.style import CSS

    assert html.count("<style>") == 1 and f"<style>{CSS}</style>" in html  # the one shared stylesheet
    # the exact copy: synthetic and training tiles identical, difference tile black, image not blank
    p = panels["copy_mni90"]
    im = np.asarray(Image.open(report / p["png"]).convert("RGB")).astype(int)
    tiles = {t["kind"]: im[t["box"][1]:t["box"][3], t["box"][0]:t["box"][2]] for t in p["tiles"]}
    assert np.array_equal(tiles["synthetic"], tiles["training"])
    assert tiles["synthetic"].std() > 30 and tiles["synthetic"].max() > 200  # a brain, not a blank tile
    assert tiles["difference"].max() == 0
    # the noised copy: its difference tile shows the noise, the synthetic tile differs from the training one
    q = panels["noised_mni110"]
    im = np.asarray(Image.open(report / q["png"]).convert("RGB")).astype(int)
    tiles = {t["kind"]: im[t["box"][1]:t["box"][3], t["box"][0]:t["box"][2]] for t in q["tiles"]}
    assert tiles["difference"].mean() > 5 and not np.array_equal(tiles["synthetic"], tiles["training"])
    assert np.corrcoef(tiles["synthetic"][..., 0].ravel(), tiles["training"][..., 0].ravel())[0, 1] > 0.9


def test_usage_errors(tmp_path, audit2d):
    root, _, _ = audit2d
    assert main(["audit", "--synthetic", str(tmp_path / "missing"), "--train", str(root / "train"),
                 "-o", str(tmp_path / "r")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["audit", "--synthetic", str(tmp_path / "empty"), "--train", str(root / "train"),
                 "-o", str(tmp_path / "r")]) == 2
    assert main(["audit", "--synthetic", str(root / "synthetic"), "-o", str(tmp_path / "r")]) == 2
    assert main(["audit", "--synthetic", str(root / "synthetic"), "--train", str(root / "train"),
                 "-o", str(tmp_path / "r"), "--ct-window", "nonsense"]) == 2


def test_no_holdout_uses_absolute_thresholds_3d(volumes, tmp_path):
    """3D volumes, no --holdout: the exact copy of a training volume is flagged, an unrelated one is not."""
    (mni, a_mni), (s0, a_s0), (pie, a_pie) = volumes["mni"], volumes["s0"], volumes["piesno"]
    _save(mni[::2, ::2, ::2], a_mni @ np.diag([2, 2, 2, 1]), tmp_path / "train" / "mni.nii.gz")
    _save(s0, a_s0, tmp_path / "train" / "s0.nii.gz")
    _save(s0, a_s0, tmp_path / "syn" / "copy_s0.nii.gz")
    _save(pie, a_pie, tmp_path / "syn" / "piesno.nii.gz")
    _save(_slice(mni, 90), a_mni, tmp_path / "syn" / "a_2d_slice.nii.gz")  # 2D among 3D: fails, one line
    status = main(["audit", "--synthetic", str(tmp_path / "syn"), "--train", str(tmp_path / "train"),
                   "-o", str(tmp_path / "r"), "--grid", "32", "--permutations", "0", "--quiet"])
    assert status == 1
    audit = json.loads((tmp_path / "r" / "audit.json").read_text())
    assert audit["dims"] == 3 and audit["grid"] == [32, 32, 32]
    assert any("2D image in a 3D audit" in f for f in audit["failed"])
    thr = audit["memorization"]["thresholds"]
    assert thr["source"].startswith("absolute") and thr["ssim"] == 0.95 and thr["ncc"] == 0.98
    rows = {r["id"]: r for r in audit["synthetic"]}
    assert rows["copy_s0"]["flagged"] and rows["copy_s0"]["nn_ssim_train"] == "s0"
    assert not rows["piesno"]["flagged"]
    assert "absolute" in (tmp_path / "r" / "audit.html").read_text()
    assert audit["realism"]["skipped"]  # 2 synthetic volumes: too few for the classifier test


def _mni_slices(volumes, zs, grid=64) -> torch.Tensor:
    mni, aff = volumes["mni"]
    from monai.data import MetaTensor

    return stack([prepare(MetaTensor(torch.from_numpy(_slice(mni, z).copy()), affine=torch.from_numpy(aff)), role="x", case_id=str(z), source=str(z), modality="MR",
                          grid=grid) for z in zs])


def test_diversity(volumes):
    same = _mni_slices(volumes, [90] * 5)
    varied = _mni_slices(volumes, [40, 70, 90, 110, 140])
    d_same, d_var = diversity(same), diversity(varied)
    assert d_same["mean"] == pytest.approx(1.0, abs=1e-5) and d_same["n_pairs"] == 10
    assert d_var["mean"] < 0.6 and d_var["mean"] < d_same["mean"] - 0.3
    assert d_same["metric"].startswith("MS-SSIM (3 scales)")  # 64 px: 5 scales do not fit
    assert ms_ssim_scales(200) == 5 and ms_ssim_scales(20) == 1
    tiny = diversity(_mni_slices(volumes, [80, 100, 120], grid=16))
    assert tiny["metric"].startswith("SSIM") and tiny["n_pairs"] == 3  # falls back, says so


def test_realism_two_sample_test(volumes):
    zs = np.random.default_rng(3).permutation(np.arange(30, 160, 2))
    a, b = _mni_slices(volumes, zs[0::2]), _mni_slices(volumes, zs[1::2])
    same = two_sample_test(a, b, permutations=50, seed=0)
    assert same["accuracy"] < 0.75 and same["p_permutation"] > 0.05 and same["ci95"][0] < 0.5
    noisy = (b + 0.2 * torch.from_numpy(np.random.default_rng(1).normal(size=b.shape).astype(np.float32))).clamp(0, 1)
    diff = two_sample_test(a, noisy, permutations=50, seed=0)
    assert diff["accuracy"] > 0.9 and diff["p_permutation"] < 0.05 and diff["p_binomial"] < 1e-6
    assert diff["n_per_class"] == len(b) == 32


def test_nearest_neighbour_api_shift_and_candidates(volumes):
    """A copy shifted by 2 grid voxels is found at that shift; preselection keeps the true neighbour."""
    train = _mni_slices(volumes, list(range(40, 150, 5)))
    q = torch.roll(train[7:8], shifts=(2, -1), dims=(2, 3))
    (m,) = nearest_neighbours(q, train, shift=2, flips=False, candidates=3)
    assert m.ssim_index == 7 and m.ncc_index == 7 and m.shift == (2, -1) and m.ssim > 0.97


def test_modality_resolution():
    """NIfTI scans (unknown modality) take the one modality of the DICOM scans; a mix stays as stored."""
    from medldm.eval.audit_load import resolve_modalities

    got, note = resolve_modalities({"a": "CT", "b": "unknown", "c": "CT"})
    assert got == {"a": "CT", "b": "CT", "c": "CT"} and "treated as CT" in note
    got, note = resolve_modalities({"a": "CT", "b": "unknown", "c": "MR"})
    assert got["b"] == "unknown" and "several modalities" in note
    assert resolve_modalities({"a": "CT", "b": "unknown"}, forced="mr")[0] == {"a": "MR", "b": "MR"}


def test_fft_ncc_surface_equals_direct_crops(volumes):
    """The FFT NCC surface equals the Pearson correlation of explicitly cropped windows (2D and 3D)."""
    import itertools

    from medldm.eval.audit_match import _crop_int, _ncc, _ncc_surface

    mni, _ = volumes["mni"]
    for q, r, m in ((torch.from_numpy(mni[40:80, 50:86, 90:93].transpose(2, 0, 1).copy()),
                     torch.from_numpy(mni[44:84, 48:84, 100:103].transpose(2, 0, 1).copy()), 3),
                    (torch.from_numpy(mni[None, 40:60, 50:66, 80:92].copy()),
                     torch.from_numpy(mni[None, 42:62, 52:68, 82:94].copy()), 2)):
        cand = torch.zeros((len(q), 1), dtype=torch.long)
        surf = _ncc_surface(q, r, cand, m, 2**20)
        nd = q.ndim - 1
        for qi in range(len(q)):
            for oi, off in enumerate(itertools.product(range(-m, m + 1), repeat=nd)):
                direct = _ncc(_crop_int(q[qi], off, m), _crop_int(r[0], (0,) * nd, m))
                assert float(surf[qi, 0, oi]) == pytest.approx(direct, abs=1e-9)


def test_thresholds_follow_the_holdout_distribution():
    """Held-out NN similarities above the floors raise the thresholds; without held-out scans the floors rule."""
    from medldm.eval.audit import AuditOptions, thresholds

    opt = AuditOptions()
    hold_ssim = [0.60, 0.70, 0.97, 0.80]
    hold_ncc = [0.90, 0.95, 0.993, 0.96]
    t = thresholds(hold_ssim, hold_ncc, opt)
    assert t["ssim"] == pytest.approx(np.percentile(hold_ssim, 99)) and 0.96 < t["ssim"] <= 0.97
    assert t["ncc"] == pytest.approx(np.percentile(hold_ncc, 99)) and t["ncc"] > 0.99
    low = thresholds([0.5, 0.6], [0.8, 0.9], opt)
    assert (low["ssim"], low["ncc"]) == (0.95, 0.98) and low["source"].startswith("held-out")
    none = thresholds([], [], AuditOptions(ssim_floor=0.9, ncc_floor=0.97))
    assert (none["ssim"], none["ncc"]) == (0.9, 0.97) and "absolute" in none["source"]


# ------------------------------------------------------------------------------------------ utility (--utility)
def _utility_slices(mni152, zs, perm=None):
    """MNI152 axial slices on the utility grid with their derived tissue labels (``perm`` relabels the classes)."""
    from medldm.data.tissue import tissue_labels
    from medldm.eval.audit_utility import Slice, _resize, unit_range

    vol = unit_range(np.asarray(nib.load(str(mni152)).dataobj, dtype=np.float32))
    out = []
    for z in zs:
        img, _ = _resize(vol[:, :, z], None, 64)
        lab = tissue_labels(img, 4).numpy()
        out.append(Slice(img, np.asarray(perm)[lab] if perm is not None else lab, f"z{z}"))
    return out


def test_utility_test_sees_help_and_harm(mni152):
    """Three real training slices, six held-out ones. Extra pairs that are correct (more real slices with their
    labels) must score above pairs whose labels are wrong (classes swapped); the wrong ones hurt, with a 95 %
    interval below 0. Measured: +0.09 [+0.08, +0.11] and -0.68 [-0.73, -0.56] at 150 steps."""
    from medldm.eval.audit_utility import UtilityOptions, utility_test

    torch.set_num_threads(1)
    real = _utility_slices(mni152, (60, 90, 120))
    hold = _utility_slices(mni152, (55, 75, 95, 105, 115, 125))
    good = _utility_slices(mni152, range(62, 136, 8))
    bad = _utility_slices(mni152, range(62, 136, 8), perm=[0, 3, 1, 2])
    opt = UtilityOptions(steps=80, resamples=500, seeds=2, doses=(1.0,))
    g = utility_test(real, good, hold, 4, opt)
    b = utility_test(real, bad, hold, 4, opt)
    for r in (g, b):
        assert {"real", "real_plus_synthetic", "synthetic_only", "difference", "tstr_vs_real", "verdict"} <= set(r)
        lo, hi = r["difference"]["ci95"]
        assert lo <= r["difference"]["mean"] <= hi
        assert r["difference"]["resampled"] == "held-out subjects and training seeds" and r["difference"]["n"] == 6
        assert r["difference"]["seeds"] == 2 and set(r["protocols"]) == {
            "real_plus_synthetic_1x", "synthetic_then_real", "synthetic_only"}
        assert r["synthetic_then_real"]["difference"]["ci95"] is not None
        assert r["difference"]["mean"] == pytest.approx(r["real_plus_synthetic"]["mean_dice"] - r["real"]["mean_dice"])
    assert g["real"]["mean_dice"] == pytest.approx(b["real"]["mean_dice"])  # same seed, same real-only model
    assert g["difference"]["mean"] > b["difference"]["mean"] + 0.2
    assert b["difference"]["ci95"][1] < 0 and b["verdict"] == "hurt"
    assert g["synthetic_only"]["mean_dice"] > b["synthetic_only"]["mean_dice"]


def test_audit_cli_utility_report(mni152, tmp_path):
    """``medldm audit --utility``: synthetic image/label pairs (``*_labels.nii.gz`` beside each scan, as
    ``medldm synthesize --mask`` writes them) are audited as scans without their label maps, and the report
    holds the utility figures (JSON) and section (HTML)."""
    img = nib.load(str(mni152))
    vol, aff = np.asarray(img.dataobj, dtype=np.float32), img.affine
    from medldm.data.tissue import tissue_labels

    for z in (60, 100):
        _save(_slice(vol, z), aff, tmp_path / "train" / f"t{z}.nii.gz")
    for z in (70, 90, 110):
        _save(_slice(vol, z), aff, tmp_path / "holdout" / f"h{z}.nii.gz")
    _save(_slice(vol, 120), aff, tmp_path / "holdout" / "subj" / "a.nii.gz")  # 2D slices of one subject in a
    _save(_slice(vol, 125), aff, tmp_path / "holdout" / "subj" / "b.nii.gz")  # subfolder: one subject
    for z in (65, 80, 95, 120):
        sl = _slice(vol, z)
        _save(sl, aff, tmp_path / "syn" / f"synth_{z:05d}.nii.gz")
        _save(tissue_labels(sl[:, :, 0], 4).numpy()[:, :, None], aff, tmp_path / "syn" / f"synth_{z:05d}_labels.nii.gz")
    out = tmp_path / "report"
    rc = main(["audit", "--synthetic", str(tmp_path / "syn"), "--train", str(tmp_path / "train"), "--holdout",
               str(tmp_path / "holdout"), "-o", str(out), "--utility", "--utility-steps", "20", "--permutations", "0",
               "--grid", "32", "--utility-seeds", "1", "--quiet"])
    assert rc == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["counts"]["synthetic"] == 4  # the label maps are not synthetic scans
    assert audit["realism"]["feature_frechet"]["distance"] >= 0
    u = audit["utility"]
    assert u["classes"] == 4 and u["real"]["n_train_slices"] == 2 and u["n_holdout_slices"] == 5
    assert u["n_holdout_subjects"] == 4
    assert u["real_plus_synthetic"]["n_train_slices"] == 4 and "derived" in u["real_labels"]  # 1x: 2 of the 4
    assert u["real_plus_synthetic_4x"]["n_train_slices"] == 6 and u["real_plus_synthetic_4x"]["dose_reached"] == 2
    assert u["real_plus_synthetic_0.5x"]["n_train_slices"] == 3
    for name in u["protocols"]:  # every protocol with its subject-level interval (3 scans + 1 subfolder)
        d = u[name]["difference"]
        assert d["resampled"] == "held-out subjects" and d["n"] == 4 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    html = (out / "audit.html").read_text()
    assert "Utility: did the synthetic pairs help?" in html and "Verdict" in html
    assert "synthetic, then fine-tuned on real" in html and "real + synthetic, 2x" in html


def test_utility_interval_resamples_subjects_not_slices():
    """Ten slices of one subject do not count as ten subjects: subject A (10 slices, +0.3) and subject B (2 slices,
    -0.1) give the mean of the two subjects (+0.1) and an interval spanning both (a slice bootstrap gave
    +0.23 [+0.17, +0.30], excluding 0)."""
    from medldm.eval.audit_utility import UtilityOptions, _ci

    diff = np.array([0.3] * 10 + [-0.1] * 2)
    d = _ci(diff[None], ["A"] * 10 + ["B"] * 2, UtilityOptions(resamples=500))
    assert d["mean"] == pytest.approx(0.1) and d["n"] == 2 and d["resampled"] == "held-out subjects"
    assert d["ci95"][0] <= -0.09 and d["ci95"][1] >= 0.29
    seeds = _ci(np.array([[0.3] * 10 + [-0.1] * 2, [0.1] * 10 + [-0.3] * 2]), ["A"] * 10 + ["B"] * 2,
                UtilityOptions(resamples=500))
    assert seeds["seeds"] == 2 and seeds["resampled"] == "held-out subjects and training seeds"
    assert seeds["ci95"][0] <= -0.29  # the seed that did worse is in the interval
    one = _ci(diff[None], ["A"] * 12, UtilityOptions(resamples=50))
    assert one["ci95"] is None and "one held-out subject" in one["resampled"]


def test_audit_utility_needs_holdout_and_pairs(mni152, tmp_path, capsys):
    img = nib.load(str(mni152))
    vol, aff = np.asarray(img.dataobj, dtype=np.float32), img.affine
    _save(_slice(vol, 60), aff, tmp_path / "train" / "t.nii.gz")
    _save(_slice(vol, 70), aff, tmp_path / "syn" / "s.nii.gz")
    rc = main(["audit", "--synthetic", str(tmp_path / "syn"), "--train", str(tmp_path / "train"), "-o",
               str(tmp_path / "r"), "--utility", "--quiet"])
    assert rc == 2 and "--utility needs --holdout" in capsys.readouterr().err
    _save(_slice(vol, 80), aff, tmp_path / "hold" / "h.nii.gz")
    rc = main(["audit", "--synthetic", str(tmp_path / "syn"), "--train", str(tmp_path / "train"), "--holdout",
               str(tmp_path / "hold"), "-o", str(tmp_path / "r2"), "--utility", "--permutations", "0", "--quiet"])
    assert rc == 2 and "no image/label pairs" in capsys.readouterr().err


def test_feature_frechet_distance_orders_sets_by_realism(volumes):
    """Offline realism distance (Fréchet on the 36 audit statistics): other MNI slices are closer to MNI slices
    than the same slices blurred, which are closer than pure noise; the real-halves reference is reported."""
    from medldm.eval.audit_stats import feature_distance

    real = _mni_slices(volumes, list(range(40, 150, 6)))
    other = _mni_slices(volumes, list(range(43, 150, 6)))
    blurred = torch.nn.functional.avg_pool2d(other, 5, stride=1, padding=2)
    noise = torch.rand(other.shape, generator=torch.Generator().manual_seed(0))
    d = [feature_distance(real, x)["distance"] for x in (other, blurred, noise)]
    assert d[0] < d[1] < d[2], d
    ref = feature_distance(real, other)
    assert ref["real_halves_reference"] > 0 and ref["n_real"] == len(real)
    assert "skipped" in feature_distance(real[:3], other)


# ------------------------------------------------------------------------------ radiomics (Fréchet Radiomics Distance)
def test_radiomics_frd_orders_sets_and_names_the_features(volumes):
    """FRD (frd-score, pyradiomics features) of real MNI slices vs other real slices is far below FRD vs the same
    slices blurred or vs noise (measured 6.7 vs 20.4 and 18.8; real halves 7.2); the reference splits the real set by subject (two slices per "subject" here,
    never on both sides); the breakdown of the blurred set puts texture first, and its effects are larger than the
    real halves' ones."""
    import importlib.util

    from conftest import skip_or_fail

    if importlib.util.find_spec("frd_score") is None or importlib.util.find_spec("radiomics") is None:
        skip_or_fail("frd-score / pyradiomics not installed (make install does it; docs/audit.md, 'Radiomics')")
    from medldm.eval.audit_frd import radiomics_frd, subject_halves

    zs = list(range(50, 130, 10))
    real = [x[0].numpy() for x in _mni_slices(volumes, zs)]
    subjects = [f"s{i // 2}" for i in range(len(zs))]
    a, b = subject_halves(subjects, 0)
    assert {subjects[i] for i in a}.isdisjoint({subjects[i] for i in b}) and len(a) == len(b) == 4
    other = [x[0].numpy() for x in _mni_slices(volumes, [55, 75, 95, 115])]
    blurred = [x[0].numpy() for x in torch.nn.functional.avg_pool2d(_mni_slices(volumes, [55, 75, 95, 115]), 5,
                                                                     stride=1, padding=2)]
    noise = [np.random.default_rng(i).random((64, 64)).astype(np.float32) for i in range(4)]
    r_other = radiomics_frd(real, subjects, other)
    r_blur = radiomics_frd(real, subjects, blurred)
    r_noise = radiomics_frd(real, subjects, noise)
    assert r_other["frd"] < min(r_blur["frd"], r_noise["frd"]) - 5, (r_other["frd"], r_blur["frd"], r_noise["frd"])
    assert r_blur["real_halves_reference"] is not None and r_blur["reference_subjects"] == [2, 2]
    assert r_blur["n_features"] > 100
    top = r_blur["features"][0]
    assert abs(top["effect"]) > 3 * abs(top["real_halves_effect"])
    g = r_blur["groups"]
    assert {"intensity", "texture"} <= set(g)  # FRD v1's features hold no shape class
    assert g["texture"]["median_abs_effect"] > g["texture"]["real_halves_median_abs_effect"]
    assert "skipped" in radiomics_frd(real[:3], subjects[:3], other)
