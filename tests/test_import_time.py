"""Commands that need no network stay free of torch and MONAI (issue 11, "Import time"): `medldm info` and
`medldm convert` read scans with numpy only, and every `--help` builds the parser without importing torch.
Checked in a fresh interpreter by what got imported, not by timing (docs/benchmarks.md has the timings)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

HEAVY = ("torch", "monai")


def _imports_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return {"rc": ..., "heavy": [heavy modules imported]}."""
    probe = (f"import sys, json\n{code}\n"
             f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_info_on_a_nifti_does_not_import_torch(dipy_files):
    nii = dipy_files / "S0_10slices.nii.gz"
    got = _imports_after(
        "from medldm.cli import main\n"
        f"rc = main(['info', {str(nii)!r}, '--json'])\n"
        "assert rc == 0, rc\n")
    assert got["heavy"] == []


def test_info_on_a_dicom_series_does_not_import_torch(dicomdir_tests):
    got = _imports_after(
        "from medldm.cli import main\n"
        f"assert main(['info', {str(dicomdir_tests / '98892001' / 'CT5N')!r}, '--json']) == 0\n")
    assert got["heavy"] == []


@pytest.mark.parametrize("out_name", ["x.nii.gz", "series"])
def test_convert_does_not_import_torch(tmp_path, dipy_files, out_name):
    shutil.copy(dipy_files / "S0_10slices.nii.gz", tmp_path / "in.nii.gz")
    got = _imports_after(
        "from medldm.cli import main\n"
        f"assert main(['convert', {str(tmp_path / 'in.nii.gz')!r}, {str(tmp_path / out_name)!r}, '--quiet']) == 0\n")
    assert got["heavy"] == []
    assert (tmp_path / out_name).exists()


def test_every_help_does_not_import_torch():
    got = _imports_after(
        "from medldm.cli import COMMANDS, main\n"
        "for name in COMMANDS:\n"
        "    assert main([name, '--help']) == 0, name\n")
    assert got["heavy"] == []


def test_read_case_matches_load_case(dipy_files):
    """The numpy path carries the same voxels, affine and meta as the MetaTensor path."""
    import numpy as np

    from medldm.io.discover import scan_folder
    from medldm.io.reader import load_case, read_case

    case = scan_folder(dipy_files / "S0_10slices.nii.gz").cases[0]
    data, affine, meta = read_case(case)
    img = load_case(case)
    assert data.dtype == np.float32 and affine.dtype == np.float64
    np.testing.assert_array_equal(data, img.numpy())
    np.testing.assert_array_equal(affine, np.asarray(img.affine))
    assert set(meta) <= set(img.meta)
    for k, v in meta.items():
        np.testing.assert_equal(img.meta[k], v, err_msg=k)
    arr = load_case(case, as_numpy=True)
    np.testing.assert_array_equal(np.asarray(arr), data)
    assert arr.meta.keys() == meta.keys() and arr.shape == data.shape
