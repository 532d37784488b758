"""Issue 21 item 4: output/resume rules live beside the case loop (medldm.io.outputs), usable without the CLI;
a resume record accepts the option values its caller resolved (tuples, paths) and matches them on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medldm.io.errors import CaseError, UsageError
from medldm.io.outputs import Resume, check_in_out, plan_outputs, record_path, single_case


def test_resolved_option_values_round_trip_through_the_record(tmp_path):
    """Options as a caller resolves them (a tuple window, a Path, a float): the record written from them must
    match them on the next run (a tuple against the record's JSON list made every resume a mismatch)."""
    out = tmp_path / "x.nii.gz"
    src = tmp_path / "in.nii.gz"
    src.write_bytes(b"scan")
    inputs = [{"path": str(src), "rel": src.name, "size": 4, "mtime_ns": src.stat().st_mtime_ns}]
    options = {"steps": 25, "sampler": "ddim", "latent_window": (64, 64), "model": tmp_path / "model", "eta": 0.0}
    key = {"command": "enhance", "options": options, "inputs": inputs}
    first = Resume(out, key)
    assert first.check(overwrite=False) is False  # new: write it
    out.write_bytes(b"result")
    first.finish([out])
    rec = json.loads(record_path(out).read_text())
    assert rec["options"]["latent_window"] == [64, 64] and rec["options"]["model"] == str(tmp_path / "model")
    assert Resume(out, key).state() == ("done", [])
    assert Resume(out, key).check(overwrite=False) is True
    other = {**key, "options": {**options, "steps": 50}}
    st, diffs = Resume(out, other).state()
    assert st == "other" and diffs == ["steps 25 ≠ 50"]
    with pytest.raises(CaseError, match="made with other inputs/options"):
        Resume(out, other).check(overwrite=False)


def test_output_rules_work_without_the_cli(tmp_path, pydicom_files):
    import shutil

    from medldm.io.discover import scan_folder

    series = tmp_path / "ct"
    series.mkdir()
    shutil.copy(pydicom_files / "CT_small.dcm", series / "CT_small.dcm")
    with pytest.raises(UsageError, match="must not lie inside"):
        check_in_out(series, series / "out")
    found = scan_folder(series)
    assert single_case(series, tmp_path / "out", found.cases)
    targets, report, lines = plan_outputs(found, tmp_path / "out", "convert", single=True, report_name="r.json")
    assert targets == {found.cases[0].id: tmp_path / "out"} and report.name == "out.medldm-convert-report.json"
    assert lines == []


def test_cli_common_holds_no_output_rules():
    """cli/common.py: argparse helpers and printing; the rules are medldm.io.outputs' (re-exported)."""
    import medldm.cli.common as common
    import medldm.io.outputs as outputs

    src = Path(common.__file__).read_text()
    assert "class Resume" not in src and "def check_in_out" not in src and "def single_case" not in src
    assert common.Resume is outputs.Resume and common.single_case is outputs.single_case
