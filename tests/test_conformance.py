"""Conformance on real vendor series from dcm2niix's public validation data (issue 20), 4D: GE classic EPI and
DWI, Siemens mosaics (axial 6 deg oblique, sagittal), Siemens classic sagittal DWI, Siemens XA enhanced multi-frame
(one file per volume), Philips classic EPI (oblique) and DTI, and Toshiba classic DTI (30 deg oblique); and one 3D
Siemens classic sagittal series. Small subsets under tests/data/vendor/ with their licences. For each:

* ``medldm info`` describes it (volumes, form);
* ``medldm convert`` agrees with dcm2niix: the same 4D shape, the world grid within 0.01 mm, every volume's
  values equal (Philips: dcm2niix's floating-point values, correlation >= 0.999, same scale);
* ``medldm enhance -m mr-denoise-2d --to dicom`` writes a derived series that dcm2niix reads back as the same 4D
  grid (and the same bval / bvec for the DWI / DTI), with no negative magnitude, and in which dciodvfy finds no error the
  source lacks.

Not here yet: a Canon enhanced file (dcm_qa_enh's is not in the mirrored snapshot). b-values and gradients that GE,
Siemens and Philips keep in private tags are carried into the derived series (``DIFFUSION_PRIVATE``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import dcm2niix_canonical, require_tool, voxel_centres

from medldm.cli import main

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.external]
VENDOR = Path(__file__).parent / "data" / "vendor"
#: name -> (folder, volumes, form, shape of one volume)
SERIES = {
    "ge_classic_epi": ("dcm_qa_nih_ge_epi", 2, "classic", (64, 64, 15)),
    "siemens_mosaic_axial_oblique": ("dcm_qa_siemens_mosaic_axasc35", 2, "Siemens mosaic", (64, 64, 35)),
    "siemens_mosaic_sagittal": ("dcm_qa_siemens_mosaic_sagasc35", 2, "Siemens mosaic", (64, 64, 35)),
    "siemens_xa_enhanced_per_volume": ("dcm_qa_enh_siemens_xa10", 4, "enhanced multi-frame", (64, 64, 6)),
    "philips_classic_epi_oblique": ("dcm_qa_philips_fmri", 3, "classic", (64, 64, 9)),
    "toshiba_classic_dti": ("dcm_qa_toshiba_dti", 3, "classic", (64, 64, 8)),
    "siemens_classic_sagittal_3d": ("dcm_qa_sag_siemens_gre", 1, "classic", (42, 64, 5)),
    "ge_classic_dwi": ("dcm_qa_ge_dwi", 3, "classic", (256, 256, 2)),
    "siemens_classic_dwi_sagittal": ("dcm_qa_sag_dwi_sag", 3, "classic", (82, 82, 2)),
    "philips_classic_dti": ("dcm_qa_philips_dti", 3, "classic", (80, 80, 3)),
}
#: dcm2niix stores Philips floating-point values as int16 with a NIfTI scale slope: equal within that quantisation
INEXACT = {"philips_classic_epi_oblique", "philips_classic_dti"}
#: diffusion series: dcm2niix writes bval / bvec for the source, and must read the same from the derived series
DWI = {"toshiba_classic_dti", "ge_classic_dwi", "siemens_classic_dwi_sagittal", "philips_classic_dti"}


def _series(tmp_path: Path, name: str) -> Path:
    """The series' DICOM files alone in a folder (as dcm2niix wants them)."""
    d = tmp_path / name
    d.mkdir()
    for f in (VENDOR / SERIES[name][0]).iterdir():
        if f.name not in ("LICENSE", "README.md"):
            shutil.copy(f, d / f.name)
    return d


def _bvals(out: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """dcm2niix's bval / bvec of the series it converted into ``out`` (None when it wrote none)."""
    b = sorted(out.glob("*.bval"))
    if not b:
        return None
    return np.loadtxt(b[0]), np.loadtxt(sorted(out.glob("*.bvec"))[0])


def _dciodvfy_errors(files) -> set[str]:
    tool = require_tool("dciodvfy")
    errs = set()
    for f in files:
        res = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        errs |= {ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")}
    return errs


@pytest.mark.parametrize("name", sorted(SERIES))
def test_info_convert_enhance_asdcm2niix_canonical(name, tmp_path, capsys):
    folder, n_vol, form, shape = SERIES[name]
    src = _series(tmp_path, name)
    capsys.readouterr()
    assert main(["info", str(src), "--json"]) == 0
    (e,) = json.loads(capsys.readouterr().out)
    assert e["volumes"] == n_vol and e["form"] == form and sorted(e["shape"]) == sorted(shape)

    ref = dcm2niix_canonical(src, tmp_path / "ref")
    assert main(["convert", str(src), str(tmp_path / "ours.nii.gz"), "--quiet"]) == 0
    ours = nib.as_closest_canonical(nib.load(str(tmp_path / "ours.nii.gz")))
    assert ours.shape == ref.shape and (ours.shape[3] if ours.ndim == 4 else 1) == n_vol
    assert np.abs(voxel_centres(ours) - voxel_centres(ref)).max() < 0.01
    if name in INEXACT:
        a, b = ours.get_fdata(), ref.get_fdata()
        for t in range(n_vol):
            assert np.corrcoef(a[..., t].ravel(), b[..., t].ravel())[0, 1] >= 0.999
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()  # same scale: floating-point values, not display
    else:
        np.testing.assert_array_equal(ours.get_fdata(), ref.get_fdata())

    out = tmp_path / "enh"
    assert main(["enhance", "-m", "mr-denoise-2d", "-i", str(src), "-o", str(out), "--to", "dicom", "--steps", "1",
                 "--quiet"]) == 0
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == min(shape) * n_vol
    back = dcm2niix_canonical(files[0].parent, tmp_path / "back")
    assert back.shape == ref.shape
    src_b, back_b = _bvals(tmp_path / "ref"), _bvals(tmp_path / "back")
    assert (src_b is not None) == (name in DWI)
    if src_b is not None:  # before DIFFUSION_PRIVATE: none back from the derived GE / Siemens DWI  # diffusion: dcm2niix finds the same b-values and gradient directions in the derived series
        assert back_b is not None
        np.testing.assert_allclose(back_b[0], src_b[0])
        np.testing.assert_allclose(back_b[1], src_b[1], atol=1e-4)
    assert np.abs(voxel_centres(back) - voxel_centres(ref)).max() < 0.01
    assert float(back.get_fdata().min()) >= 0.0  # magnitude MR is never negative
    src_files = [f for f in src.iterdir() if f.is_file()]
    new = _dciodvfy_errors(files[:: min(shape)]) - _dciodvfy_errors(src_files)
    assert not new, new
