"""`medldm --help` and `medldm info` start without torch or MONAI (issue 21, "Structure": imports sit at the module
top, except the few that start-up needs inside a function, each marked ``# lazy:``). Each case runs the real entry
point (``python -m medldm``, medldm/__main__.py) in a fresh interpreter and looks at what it imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SERIES = Path(__file__).parent / "data" / "vendor" / "dcm_qa_sag_siemens_gre"  # 5 sagittal GRE slices, shipped

PROBE = """
import json, runpy, sys
sys.argv = ["medldm", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("medldm", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"rc": code, "heavy": sorted(m for m in ("torch", "monai") if m in sys.modules)}))
"""


def _run(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_nifti(tmp_path_factory) -> Path:
    import nibabel as nib

    path = tmp_path_factory.mktemp("startup") / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(48, dtype=np.int16).reshape(4, 4, 3), np.diag([0.9, 0.9, 3.0, 1.0])), path)
    return path


def test_help_imports_no_torch():
    assert _run(["--help"]) == {"rc": 0, "heavy": []}


@pytest.mark.parametrize("what", ["series", "file", "nifti"])
def test_info_imports_no_torch(what, tiny_nifti):
    path = {"series": SERIES, "file": SERIES / "1.dcm", "nifti": tiny_nifti}[what]
    assert _run(["info", str(path), "--json"]) == {"rc": 0, "heavy": []}
