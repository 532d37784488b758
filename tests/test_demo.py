"""The reduced demo runs end to end on real held-out scans and its report shows real results."""

import csv
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from medldm.cli import main


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.captions, self._cap = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._cap = tag == "caption"

    def handle_data(self, data):
        if self._cap:
            self.captions.append(data)


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
    parser.feed(report.read_text())
    # every table states its convention
    assert len(parser.captions) == 2 and all("data_range R = 1" in c for c in parser.captions)
    # the panels (denoise, SR, synthesis samples) exist and hold image content (not blank)
    assert len(parser.imgs) >= 3 and "synth/samples.png" in parser.imgs
    for src in parser.imgs:
        png = np.asarray(Image.open(out / src).convert("L"), dtype=float)
        assert png.std() > 10, src
    # the methods do what they should on the real held-out scans
    den = _slice_means(out / "denoise" / "report" / "metrics.csv")
    assert den["nlm"] > den["noisy"] + 1.0
    sr = _slice_means(out / "sr" / "report" / "metrics.csv")
    assert sr["bicubic"] > sr["nearest"] and sr["bspline"] > sr["linear"]
    # the shipped models ran through the inference pipeline and were evaluated beside the baselines (their
    # quality gap is tested, as a known failure, in tests/test_shipped.py)
    assert np.isfinite(den["mr-denoise-2d"]) and np.isfinite(sr["mr-sr2x-2d"])
    assert len(list((out / "synth").glob("sample_*.nii.gz"))) == 4


def test_index_page_uses_the_shared_stylesheet(tmp_path):
    """The demo index is styled by medldm.eval.style like the evaluation and audit reports (no copy of its own)."""
    import medldm.demo
    from medldm.eval.style import CSS, PAGE_END

    page = medldm.demo.write_index(tmp_path, [], {}, 1.0).read_text()
    assert page.startswith("<!DOCTYPE html>") and f"<style>{CSS}</style>" in page and page.endswith(PAGE_END)
    assert page.count("<style>") == 1 and "<title>medldm demo</title>" in page
    assert "font-family" not in Path(medldm.demo.__file__).read_text()
