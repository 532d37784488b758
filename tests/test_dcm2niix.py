"""Agreement with dcm2niix (the reference DICOM->NIfTI converter) on real series and images:
same shape and voxel values and the same voxel-centre positions (within 1e-3 mm) after
``nibabel.as_closest_canonical`` on both sides.

Not compared: series with gaps (dcm2niix keeps the first step, medldm the median step), images
without patient geometry (both conventions are arbitrary) and single slices with a gantry tilt
(dcm2niix reshapes the in-plane axes).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import require_tool

from medldm.io.reader import load_scan

pytestmark = pytest.mark.external

DD = ("pydicom_files", "dicomdirtests")
CASES = {
    "CT5N": (*DD, "98892001/CT5N/*"),
    "CT_small": ("pydicom_files", "", "CT_small.dcm"),
    "MR_small": ("pydicom_files", "", "MR_small.dcm"),
    "eCT_enhanced": ("pydicom_data", "", "eCT_Supplemental.dcm"),
    "head_CT_512": ("pydicom_data", "", "693_UNCI.dcm"),
    "shoulder_MR_1024": ("pydicom_data", "", "MR2_UNCI.dcm"),  # float rescale slope
    **{f"MR700_oblique_{n}": (*DD, f"98892003/MR700/{n}") for n in ("4467", "4528", "4648")},
    **{f"MR2_{n}": (*DD, f"98892003/MR2/{n}") for n in ("4950", "4981", "5011", "15970")},
}


def _files(request, fixture: str, sub: str, pattern: str) -> list[Path]:
    base = request.getfixturevalue(fixture) / sub if sub else request.getfixturevalue(fixture)
    return sorted(p for p in base.glob(pattern) if p.is_file())


def _voxel_centres(img: nib.Nifti1Image) -> np.ndarray:
    """World positions of the corner voxel centres (the affine is linear, so corners suffice)."""
    sh = img.shape[:3]
    idx = np.array(list(itertools.product(*[(0, n - 1) for n in sh])), float)
    return idx @ img.affine[:3, :3].T + img.affine[:3, 3]


@pytest.mark.parametrize("name", sorted(CASES))
def test_agrees_with_dcm2niix(name, request, tmp_path):
    exe = require_tool("dcm2niix")
    files = _files(request, *CASES[name])
    assert files, f"no files for {name}"
    series_dir = tmp_path / "in"  # the series alone in a folder, as dcm2niix expects
    series_dir.mkdir()
    for f in files:
        shutil.copy(f, series_dir / f.name)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([exe, "-z", "n", "-f", "%s", "-o", str(out), str(series_dir)], check=True,
                   capture_output=True, timeout=120)
    (ref_path,) = sorted(out.glob("*.nii"))
    ref = nib.as_closest_canonical(nib.load(ref_path))
    img = load_scan(files if len(files) > 1 else files[0])
    ours = nib.as_closest_canonical(nib.Nifti1Image(img.numpy(), img.affine.numpy()))

    a = ref.get_fdata(dtype=np.float64)
    a = a.reshape(a.shape[:3]) if a.ndim == 4 and a.shape[3] == 1 else a
    b = ours.get_fdata(dtype=np.float64)
    assert a.shape == b.shape
    # dcm2niix may store rescaled values in float32: compare as floats
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))
    np.testing.assert_allclose(_voxel_centres(ours), _voxel_centres(ref), atol=1e-3)
    if img.shape[2] > 1:  # a volume: the whole affine, slice step included
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
