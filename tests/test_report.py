"""report.html and the PNG panels of `medldm evaluate`, on MNI152 crops: the HTML parses, names the
convention in every table caption, references PNGs that exist, and the panels show the images."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medldm.cli import main
from medldm.eval.panels import choose_slices, display_plane, to_hot
from medldm.eval.stats import summarize

SL = (slice(30, 160), slice(40, 200), slice(60, 100))  # 130 x 160 x 40 voxels of 1 mm


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.captions, self.tables = [], [], 0
        self._cap = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables += 1
        elif tag == "caption":
            self._cap = []

    def handle_endtag(self, tag):
        if tag == "caption":
            self.captions.append("".join(self._cap))
            self._cap = None

    def handle_data(self, data):
        if self._cap is not None:
            self._cap.append(data)


@pytest.fixture(scope="module")
def report(mni152, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    img = nib.load(str(mni152))
    ref = np.asarray(img.dataobj, dtype=np.float32)[SL]
    aff = img.affine.copy()
    aff[:3, 3] += aff[:3, :3] @ [s.start for s in SL]
    noisy = ref + np.random.default_rng(2).normal(0, 10, ref.shape).astype(np.float32)
    for name, arr in (("ref", ref), ("same", ref), ("noisy", noisy)):
        (root / name).mkdir()
        nib.save(nib.Nifti1Image(arr, aff), str(root / name / "brain.nii"))
    out = root / "rep"
    rc = main(["evaluate", "--pred", str(root / "noisy"), "--pred", f"same={root / 'same'}", "--ref", str(root / "ref"),
               "--window=20,200", "-o", str(out), "--slices-per-case", "3", "--quiet"])
    assert rc == 0
    return out, ref


def test_html_parses_states_convention_and_references_existing_pngs(report):
    out, _ = report
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()
    assert page.tables >= 6 and len(page.captions) == page.tables
    for cap in page.captions:  # the convention in EVERY table caption
        assert "window [20, 200]" in cap and "R = 180" in cap, cap
    assert len(page.imgs) == 3
    for src in page.imgs:
        assert src.startswith("panels/") and (out / src).is_file()
        assert Image.open(out / src).format == "PNG"
    assert "http" not in (out / "report.html").read_text()  # self-contained but for the PNGs
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_panel_slices_central_and_evenly_spaced(report):
    out, ref = report
    panels = json.loads((out / "panels.json").read_text())["panels"]
    assert [p["slice"] for p in panels] == choose_slices(ref.shape[2], 3) == [10, 19, 29]
    assert choose_slices(ref.shape[2], 3)[1] == (ref.shape[2] - 1) // 2
    assert choose_slices(40, 4) == [8, 19, 23, 31] and choose_slices(40, 1) == [19]
    occupied = np.zeros(40, bool)
    occupied[20:31] = True  # e.g. a mask: slices chosen inside it
    assert choose_slices(40, 3, occupied) == [22, 25, 28]


def _tile(out, panel, i) -> np.ndarray:
    im = np.asarray(Image.open(out / panel["file"]).convert("RGB"), dtype=np.float64)
    x0, y0, x1, y1 = panel["tiles"][i]["box"]
    return im[y0:y1, x0:x1]


def test_panels_show_the_images(report):
    out, ref = report
    panels = json.loads((out / "panels.json").read_text())["panels"]
    p = panels[1]
    assert [t["label"] for t in p["tiles"]] == ["reference", "noisy", "same", "|noisy - ref|", "|same - ref|"]
    assert p["window"] == [20.0, 200.0] and p["orientation"] == {"left": "R", "top": "A"}
    # reference tile vs the reference slice, shown radiologically (RAS array: flip both axes), resampled
    expected = ref[:, :, p["slice"]].T[::-1, ::-1]
    tile = _tile(out, p, 0)[..., 0]
    assert tile.shape == (256, 208)  # 160 x 130 mm, longer side 256 px, square pixels
    small = np.asarray(Image.fromarray(tile.astype(np.uint8)).resize(expected.shape[::-1], Image.Resampling.BOX),
                       dtype=np.float64)
    shown = np.clip((expected - 20) / 180, 0, 1) * 255
    assert np.corrcoef(small.ravel(), shown.ravel())[0, 1] > 0.99
    assert np.abs(small - shown).mean() < 3  # same window: grey levels match, not just correlate
    assert np.corrcoef(small.ravel(), shown[::-1].ravel())[0, 1] < 0.8  # orientation matters
    # prediction tiles: identical method == reference tile; noisy one close but not equal
    assert np.array_equal(_tile(out, p, 2), _tile(out, p, 0))
    assert 0 < np.abs(_tile(out, p, 1) - _tile(out, p, 0)).mean() < 30
    # |difference|: black for the identical prediction, bright for the noisy one
    assert _tile(out, p, 4).max() == 0
    diff = np.asarray(Image.fromarray(_tile(out, p, 3).astype(np.uint8)).resize(expected.shape[::-1],
                                                                                 Image.Resampling.BOX), np.float64)
    value = diff.sum(axis=-1) / (3 * 255) * p["dmax"]  # hot colormap decoded back to |difference|
    brain, air = expected > 60, expected == 0  # air is clipped to the window's 20 in both images
    assert 5 < value[brain].mean() < 11  # E|N(0, 10)| = 8.0
    assert value[air].mean() < 0.25 * value[brain].mean()
    # one difference scale per case
    assert len({q["dmax"] for q in panels}) == 1


def test_hot_colormap_and_display_plane_orientation(mni152):
    rgb = to_hot(np.array([[0.0, 1.0, 2.0, 3.0, 9.0]]), 3.0)[0]
    assert rgb[0].tolist() == [0, 0, 0] and rgb[3].tolist() == [255, 255, 255] and rgb[4].tolist() == [255, 255, 255]
    assert rgb[1].tolist() == [255, 0, 0]
    img = nib.load(str(mni152))
    vol = np.asarray(img.dataobj, dtype=np.float32)[::4, ::4, ::4]
    aff = img.affine @ np.diag([4.0, 4.0, 4.0, 1.0])
    plane, spacing, letters = display_plane(vol, aff, 2, 20)
    assert np.array_equal(plane, vol[:, :, 20].T[::-1, ::-1]) and spacing == (4.0, 4.0) and letters == ("R", "A")
    # the same data stored LPS (x, y flipped, as read from DICOM) displays identically
    lps = vol[::-1, ::-1]
    aff_lps = aff @ np.array([[-1, 0, 0, vol.shape[0] - 1], [0, -1, 0, vol.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert np.array_equal(display_plane(lps, aff_lps, 2, 20)[0], plane)
    # coronal (axis 1): superior at the top, patient right on the left
    cor, _, letters = display_plane(vol, aff, 1, 30)
    assert np.array_equal(cor, vol[:, 30, :].T[::-1, ::-1]) and letters == ("R", "S")
    sag, _, letters = display_plane(vol, aff, 0, 25)  # sagittal: anterior on the left
    assert np.array_equal(sag, vol[25].T[::-1, ::-1]) and letters == ("A", "S")


def test_summarize_t_and_bootstrap():
    from scipy import stats

    v = [30.1, 31.5, 29.8, 32.2, 30.9]
    s = summarize(v)
    half = stats.t.ppf(0.975, 4) * np.std(v, ddof=1) / math.sqrt(5)
    assert s["n"] == 5 and s["mean"] == pytest.approx(np.mean(v))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((np.mean(v) - half, np.mean(v) + half))
    b = summarize(v, ci="bootstrap")
    assert b == summarize(v, ci="bootstrap") and min(v) <= b["ci_low"] < b["mean"] < b["ci_high"] <= max(v)
    one = summarize([float("nan"), 3.0])
    assert one["n"] == 1 and one["n_missing"] == 1 and one["mean"] == 3.0 and math.isnan(one["ci_low"])
