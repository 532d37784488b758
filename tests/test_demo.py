"""The reduced demo runs end to end on real held-out scans and its report shows real results."""

import csv
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medldm.demo as demo
from medldm.cli import main

ROOT = Path(__file__).parents[1]


class _Collect(HTMLParser):
    """<img> sources, <caption> texts and <figcaption> texts (the text of its tags joined) of a page."""

    def __init__(self):
        super().__init__()
        self.imgs, self.captions, self.figcaptions, self._cap, self._fig = [], [], [], False, None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._cap = tag == "caption"
        if tag == "figcaption":
            self._fig = []

    def handle_endtag(self, tag):
        if tag == "figcaption" and self._fig is not None:
            self.figcaptions.append("".join(self._fig))
            self._fig = None

    def handle_data(self, data):
        if self._cap:
            self.captions.append(data)
        if self._fig is not None:
            self._fig.append(data)


def _slice_means(path: Path) -> dict[str, float]:
    vals: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["level"] == "slice":
                vals.setdefault(r["method"], []).append(float(r["psnr"]))
    return {m: float(np.mean(v)) for m, v in vals.items()}


def test_quick_demo_end_to_end(tmp_path, mni152):  # mni152: skips when the data extra is absent
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--quick"]) == 0
    report = out / "report.html"
    parser = _Collect()
    page = report.read_text()
    parser.feed(page)
    # every table states its convention
    tables = [c for c in parser.captions if "Fréchet" not in c and "separate synthetic" not in c]
    assert len(tables) == 4 and all("data_range R = 1" in c for c in tables)
    assert "Rician noise" in tables[1] and "Every method blind" in page
    assert "Thick -> thin slices x4" in tables[3] and "along array axis 1" in tables[3]
    # the samples' realism breakdown (issue 23): FRD with the real-halves reference, features that give them away
    assert "Realism by radiomics" in page and any("Fréchet Radiomics Distance" in c for c in parser.captions)
    assert "wavelet" in page and "real halves" in page
    # the panels (denoise, SR, thick -> thin, synthesis samples) exist and hold image content (not blank)
    assert len(parser.imgs) >= 4 and "synth/samples.png" in parser.imgs
    assert any(src.startswith("thin/report/panels/") for src in parser.imgs)
    for src in parser.imgs:
        png = np.asarray(Image.open(out / src).convert("L"), dtype=float)
        assert png.std() > 10, src
    # the methods do what they should on the real held-out scans
    den = _slice_means(out / "denoise" / "report" / "metrics.csv")
    assert den["nlm"] > den["noisy"] + 1.0
    assert den["bm3d"] > den["noisy"] + 1.0  # bm3d is in the test extra, so the demo's optional baseline ran
    # the 3D baselines (bm4d, antspyx: test extra) on both noises; Rician: bias-corrected BM4D, ANTs' Rician model
    ric = _slice_means(out / "denoise-rician" / "report" / "metrics.csv")
    # measured on these small crops (blind): BM4D 31.52 vs noisy 25.99 dB (Gaussian); on Rician 5 % ANTs (Rician
    # model) 26.17 vs 25.41, while the bias-corrected BM3D/BM4D (25.06 / 25.13) fall below the input: the blind Rician
    # sigma (the enhancer's estimate) reads high on 96 x 96 crops and they over-correct; ANTs' Gaussian model is
    # below the input (24.15) — both open in docs/models.md
    assert den["bm4d"] > den["noisy"] + 3.0 and ric["ants"] > ric["noisy"] + 0.3, (den, ric)
    for m in ("bm4d", "ants"):
        assert f"<tr><td>{m}</td>" in page
    assert np.isfinite(ric["mr-denoise-2d"])
    sr = _slice_means(out / "sr" / "report" / "metrics.csv")
    assert sr["bicubic"] > sr["nearest"] and sr["bspline"] > sr["linear"]
    # the shipped models ran through the inference pipeline and were evaluated beside the baselines (their
    # quality gap is tested, as a known failure, in tests/test_shipped.py)
    assert np.isfinite(den["mr-denoise-2d"]) and np.isfinite(sr["mr-sr2x-2d"])
    assert len(list((out / "synth").glob("sample_*.nii.gz"))) == 4
    _check_thin_row(out, page)
    _check_synthesis_caption(parser)
    if demo._models((demo.MASK_MODEL,)):  # the shipped mask model, once installed, gives the mask -> image example
        assert "mask/panel.png" in parser.imgs and "Mask -&gt; image" in page
    else:  # skipped like the synthesis samples without their model (the code path: test_mask_example_*)
        assert "mask/panel.png" not in parser.imgs and "Mask -&gt; image" not in page
        assert not (out / "mask").exists()


def _check_thin_row(out: Path, page: str) -> None:
    """Thick -> thin x4: the interpolation baselines and the shipped model on the four reformatted held-out scans
    (the demo's three and dipy's piesno), evaluated per slice along axis 1, the model on the reference's grid."""
    thin = out / "thin"
    with open(thin / "report" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    slices = [r for r in rows if r["level"] == "slice"]
    assert {r["method"] for r in slices} == {"linear", "bicubic", "bspline", "mr-thinslice-4x"}
    assert {r["case"] for r in slices} == {"mr-brain-s0", "mr-abdomen", "mr-shoulder", "dipy-piesno"}
    assert {r["axis"] for r in slices} == {"1"}
    for m in ("linear", "bicubic", "bspline", "mr-thinslice-4x"):  # one row each in the report's table
        assert f"<tr><td>{m}</td>" in page
    # the report says what was done: box profile, reformatted scans, the axis evaluated
    for said in ("the mean of 4 adjacent thin slices along Z (box slice profile", "stored as (X, S, Y)",
                 "dipy-piesno (dipy's test_piesno.nii.gz", "per 2D slice along array axis 1", "--quick: centre crops"):
        assert said in page, said
    means = _slice_means(thin / "report" / "metrics.csv")
    assert means["bicubic"] > means["linear"] and np.isfinite(means["mr-thinslice-4x"])
    for ref_path in sorted((thin / "ref").glob("*.nii.gz")):
        ref, thick = nib.load(ref_path), nib.load(thin / "thick" / ref_path.name)
        model, cubic = nib.load(thin / "mr-thinslice-4x" / ref_path.name), nib.load(thin / "bicubic" / ref_path.name)
        assert ref.shape[0] <= 96 and ref.shape[2] <= 96 and ref.shape[2] % 4 == 0  # --quick: small crops
        assert thick.shape == (*ref.shape[:2], ref.shape[2] // 4)
        assert model.shape == ref.shape and np.array_equal(model.affine, ref.affine), ref_path.name
        assert not np.array_equal(np.asarray(model.dataobj), np.asarray(cubic.dataobj))  # the model changed it


def _check_synthesis_caption(parser: _Collect) -> None:
    """The synthesis grid says each sample's slice-position class (names from the model folder when recorded)."""
    from medldm.shipped import SHIPPED

    extra = json.loads((SHIPPED[demo.SYNTH_MODEL].path / "extra.json").read_text())
    names = extra.get("class_names") or [f"position-{k}" for k in range(4)]
    cap = next(c for c in parser.figcaptions if "sample i" in c)
    for i in range(4):
        assert f"{i + 1}: {names[i % len(names)]}" in cap, cap
    assert "slice-position bins along the head axis" in cap


def test_reformat_keeps_every_voxel_at_its_world_position():
    import torch
    from monai.data import MetaTensor

    rng = np.random.default_rng(0)
    arr = rng.standard_normal((5, 6, 7)).astype(np.float32)
    aff = np.array([[0.0, 1.2, 0.1, -3.0], [0.9, 0.0, 0.2, 4.0], [0.0, 0.3, 5.0, 7.0], [0, 0, 0, 1]])
    img = MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(aff))
    for perm in (demo.REFORMAT_SLICES, demo.REFORMAT_PIESNO):
        ref = demo.reformat(img, perm)
        new_aff = np.asarray(ref.affine, dtype=np.float64)
        assert ref.shape == tuple(arr.shape[p] for p in perm)
        for idx in [(0, 0, 0), (4, 5, 6), (1, 2, 3)]:
            new_idx = tuple(idx[p] for p in perm)
            assert float(ref[new_idx]) == arr[idx]
            assert np.allclose(new_aff @ [*new_idx, 1], aff @ [*idx, 1])


def test_eval_heldout_script_uses_the_demo_protocol():
    """One copy of the thick -> thin protocol: the held-out script of mr-thinslice-4x imports the demo's."""
    src = (ROOT / "docs" / "training_logs" / "mr-thinslice-4x" / "eval_heldout.py").read_text()
    assert "prepare_thinslice_references(" in src and ".transpose(" not in src and "fit_normalization" not in src


def test_class_names_come_from_the_model_folder():
    syn = SimpleNamespace(class_names=["T1/position-0", "T1/position-1", "EPI/position-0", "EPI/position-1"],
                          bundle=SimpleNamespace(extra={"class_from": "contrast_position"}))
    assert [demo.class_name(syn, k) for k in range(4)] == syn.class_names
    bare = SimpleNamespace(class_names=[], bundle=SimpleNamespace(extra={"class_from": "slice_position"}))
    assert demo.class_name(bare, 2) == "position-2"
    assert demo.class_name(SimpleNamespace(class_names=[], bundle=SimpleNamespace(extra={})), 2) == "class 2"
    html = demo._synthesis_html({"model": "m", "file": "synth/samples.png", "n": 3, "seed": 5, "steps": 4,
                                 "classes": 4, "labels": [demo.class_name(syn, k % 4) for k in range(3)],
                                 "size": [8, 8], "seconds": 1.0})
    assert "1: T1/position-0; 2: T1/position-1; 3: EPI/position-0" in html and "per contrast" in html


# ------------------------------------------------------------------------------------------ mask -> image
@pytest.fixture(scope="module")
def tiny_mask_model(tmp_path_factory, mni152):
    """configs/synthesis_mask_2d_tiny.yaml trained (well under a minute): a stand-in for mr-synth-mask-2d."""
    from medldm.train.runner import train
    from medldm.train.schema import load_config

    out = tmp_path_factory.mktemp("mask") / "run"
    train(load_config(ROOT / "configs" / "synthesis_mask_2d_tiny.yaml"), out)
    return out / "model"


def test_mask_example_skipped_without_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_models", lambda names: {})
    assert demo.run_mask_synthesis(tmp_path, seed=0) is None
    assert not (tmp_path / "mask").exists()


def test_mask_example_with_an_installed_model(tmp_path, monkeypatch, tiny_mask_model, dipy_files):
    """With the mask model installed (here the tiny one in its place): the label map medldm derives from the middle
    slice of the held-out brain scan, images generated from it that `medldm synthesize --mask` reproduces bit for
    bit, and the panel label map | images | real slice in the report."""
    from medldm.data.tissue import tissue_labels
    from medldm.samples import sample_path

    monkeypatch.setattr(demo, "_models", lambda names: {n: tiny_mask_model for n in names if n == demo.MASK_MODEL})
    out = tmp_path / "demo"
    info = demo.run_mask_synthesis(out, seed=3, n=2)
    assert info["model"] == demo.MASK_MODEL and info["scan"] == demo.MASK_SAMPLE and info["size"] == [32, 32]
    lab_nii, real_nii = nib.load(out / "mask" / "labels.nii.gz"), nib.load(out / "mask" / "real.nii.gz")
    labels, real = np.asarray(lab_nii.dataobj), np.asarray(real_nii.dataobj, dtype=np.float32)
    assert labels.shape == (32, 32) and set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.array_equal(labels, tissue_labels(real, 4).numpy())  # derived from the real slice shown
    # the real slice is slice k of the held-out brain scan (128 x 128, resized to the model's 32 x 32)
    raw = np.asarray(nib.load(sample_path(demo.MASK_SAMPLE)).dataobj, dtype=np.float64)
    k = info["slice"]
    block = raw[:, :, k].reshape(32, 4, 32, 4).mean(axis=(1, 3))
    corr = [np.corrcoef(raw[:, :, j].reshape(32, 4, 32, 4).mean(axis=(1, 3)).ravel(), real.ravel())[0, 1]
            for j in range(raw.shape[2])]
    assert k == raw.shape[2] // 2 and int(np.argmax(corr)) == k and np.corrcoef(block.ravel(), real.ravel())[0, 1] > 0.95
    # the label map's affine covers the scan's slice k: its corner voxel centres land inside that slice's extent
    raw_aff = nib.load(sample_path(demo.MASK_SAMPLE)).affine
    centre_raw = raw_aff @ [63.5, 63.5, k, 1]
    assert np.allclose(lab_nii.affine @ [15.5, 15.5, 0, 1], centre_raw, atol=1e-3)
    assert np.allclose(np.linalg.norm(lab_nii.affine[:3, :2], axis=0), 4 * np.linalg.norm(raw_aff[:3, :2], axis=0))
    imgs = [nib.load(out / "mask" / f"synth_{i:05d}.nii.gz") for i in range(2)]
    for im in imgs:
        assert im.shape == (32, 32) and np.array_equal(im.affine, lab_nii.affine)
    assert not np.array_equal(np.asarray(imgs[0].dataobj), np.asarray(imgs[1].dataobj))  # seeds 3 and 4
    # the CLI on the saved label map makes the same images
    cli = tmp_path / "cli"
    assert main(["synthesize", "-m", str(tiny_mask_model), "--mask", str(out / "mask" / "labels.nii.gz"), "-n", "2",
                 "--seed", "3", "-o", str(cli), "--device", "cpu", "--quiet"]) == 0
    for i, im in enumerate(imgs):
        assert np.array_equal(np.asarray(nib.load(cli / f"synth_{i:05d}.nii.gz").dataobj), np.asarray(im.dataobj))
    # the panel: label map | 2 images | real slice, 32-pixel tiles enlarged x4 with 4-pixel gaps
    png = np.asarray(Image.open(out / info["file"]).convert("L"), dtype=float)
    assert png.shape == (128, 4 * (4 * 32 + 3 * 4))
    tiles = [png[:, 4 * 36 * t: 4 * (36 * t + 32)] for t in range(4)]
    assert all(t.std() > 10 for t in tiles)
    assert len(np.unique(tiles[0])) == 4  # the label map: its 4 classes as 4 gray levels
    page = demo.write_index(out, [], {}, 1.0, None, info).read_text()
    parser = _Collect()
    parser.feed(page)
    assert parser.imgs == ["mask/panel.png"]
    cap = parser.figcaptions[0]
    assert f"slice {k} of the held-out {demo.MASK_SAMPLE}" in cap and "label map" in cap
    assert "medldm synthesize -m mr-synth-mask-2d --mask mask/labels.nii.gz -n 2 --seed 3" in cap


def test_index_page_uses_the_shared_stylesheet(tmp_path):
    """The demo index is styled by medldm.eval.style like the evaluation and audit reports (no copy of its own)."""
    import medldm.demo
    from medldm.eval.style import CSS, PAGE_END

    page = medldm.demo.write_index(tmp_path, [], {}, 1.0).read_text()
    assert page.startswith("<!DOCTYPE html>") and f"<style>{CSS}</style>" in page and page.endswith(PAGE_END)
    assert page.count("<style>") == 1 and "<title>medldm demo</title>" in page
    assert "font-family" not in Path(medldm.demo.__file__).read_text()
