"""``medldm synthesize`` keeps memory bounded for any ``-n`` (issue 20 item 16, issue 23 item 5): scans are written
as they are made, the case list is never built, and the run report is updated every ``--batch-size`` scans."""

from __future__ import annotations

import json

import pytest
import torch


class _Stop(Exception):
    pass


def _fast_generate(self, *, seed=0, **_):
    """The shipped model's Synthesizer with sampling replaced by a 4x4 image (the CLI's loop is what is tested)."""
    import numpy as np
    from monai.data import MetaTensor

    img = torch.full((4, 4, 1), float(seed % 7))
    meta = {"kind": "synthetic", "modality": "MR", "original_dtype": "float32", "original_ndim": 2,
            "spacing": (1.0, 1.0, 1.0), "warnings": [], "series_description": "SYNTHETIC"}
    return MetaTensor(img, affine=torch.as_tensor(np.eye(4)), meta=meta), {"guidance": 1.0, "label": None}


def test_a_huge_n_starts_writing_without_building_the_case_list(tmp_path, monkeypatch):
    import medldm.io.caseloop as caseloop
    from medldm.cli import main
    from medldm.pipelines.synthesize import Synthesizer

    monkeypatch.setattr(Synthesizer, "generate", _fast_generate)
    real = caseloop.run_cases
    sizes = []

    def spy(cases, process, **kw):
        sizes.append(len(cases))  # range(10**9) before the fix: the whole case list in one call
        if len(sizes) == 3:
            raise _Stop
        return real(cases, process, **kw)

    monkeypatch.setattr(caseloop, "run_cases", spy)
    monkeypatch.setattr("medldm.cli.synthesize.run_cases", spy)  # the name the command calls
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        main(["synthesize", "-m", "mr-synth-2d", "-n", str(10**9), "-o", str(out), "--batch-size", "2",
              "--device", "cpu", "--quiet"])
    assert sizes == [2, 2, 2]
    assert sorted(p.name for p in out.glob("synth_*.nii.gz")) == [f"synth_{i:05d}.nii.gz" for i in range(4)]
    report = json.loads((out / "medldm-synthesize-report.json").read_text())
    assert report["counts"]["done"] == 4  # the report of the batches written so far survives the interruption


def test_batches_give_the_same_scans_and_one_report(tmp_path, monkeypatch):
    from medldm.cli import main
    from medldm.io.reader import load_nifti
    from medldm.pipelines.synthesize import Synthesizer

    monkeypatch.setattr(Synthesizer, "generate", _fast_generate)
    args = ["synthesize", "-m", "mr-synth-2d", "-n", "5", "--device", "cpu", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "a"), "--batch-size", "2"]) == 0
    assert main([*args, "-o", str(tmp_path / "b"), "--batch-size", "64"]) == 0
    for i in range(5):
        a = load_nifti(str(tmp_path / "a" / f"synth_{i:05d}.nii.gz"))[0]
        b = load_nifti(str(tmp_path / "b" / f"synth_{i:05d}.nii.gz"))[0]
        assert float(a.max()) == float(b.max()) == float(i % 7)
    rep = json.loads((tmp_path / "a" / "medldm-synthesize-report.json").read_text())
    assert rep["counts"] == {"done": 5, "skipped": 0, "failed": 0} and rep["exit_status"] == 0


def test_batch_size_below_one_is_a_usage_error(tmp_path):
    from medldm.cli import main

    assert main(["synthesize", "-m", "mr-synth-2d", "-n", "2", "-o", str(tmp_path / "o"), "--batch-size", "0"]) == 2
