"""Shared fixtures: real scans shipped inside registry packages (see ../shared/DATA.md).

Each fixture skips with a reason when the package that ships the file is not installed
(``pip install -e .[test]`` installs them all)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest


def in_ci() -> bool:
    """True under CI (``CI=true``, set by .ci/run): there a missing tool or data package fails instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(why: str):
    """Skip locally with the reason; fail in CI, where everything the tests need is installed."""
    if in_ci():
        pytest.fail(f"{why} (in CI a missing tool or package is a failure, not a skip)")
    pytest.skip(why)


def _pkg_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail(f"package {pkg!r} not installed (pip install -e .[test])")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    """pydicom's real test files: CT_small.dcm (128² CT), MR_small.dcm, J2K_pixelrep_mismatch.dcm, ..."""
    return _pkg_dir("pydicom") / "data" / "test_files"


@pytest.fixture(scope="session")
def dicomdir_tests(pydicom_files) -> Path:
    """Real series shrunk to 16²: 98892003/MR700 (7 oblique slices), 98892003/MR2 (3 series in one folder),
    77654033/CT2 (4 slices), 98892001/CT5N (5 slices)."""
    return pydicom_files / "dicomdirtests"


@pytest.fixture(scope="session")
def pydicom_data() -> Path:
    """pydicom-data's store: 693_UNCI.dcm (head CT 512²), MR2_UNCI.dcm (1024² MR), emri_small.dcm (10 frames)..."""
    d = _pkg_dir("data_store") / "data"
    if not d.exists():
        skip_or_fail("pydicom-data store not found")
    return d


@pytest.fixture(scope="session")
def dipy_files() -> Path:
    """dipy's real MR: S0_10slices.nii.gz, aniso_vox.nii.gz, test_piesno.nii.gz, t1_coronal_slice.npy."""
    return _pkg_dir("dipy") / "data" / "files"


@pytest.fixture(scope="session")
def mni152() -> Path:
    """MNI152 2009a T1 (197x233x189, 1 mm, uint8) from nilearn's package data (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        skip_or_fail("nilearn not installed: the MNI152 template ships inside it")
    p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not p.exists():
        skip_or_fail(f"{p} missing")
    return p


def require_tool(name: str) -> str:
    """Path of an external reference tool, or skip with the install hint."""
    path = shutil.which(name)
    if path is None:
        pkg = {"dcm2niix": "dcm2niix", "dciodvfy": "dicom3tools"}.get(name, name)
        skip_or_fail(f"{name} not installed (apt-get install {pkg}); .ci/run installs it")
    return path


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    """Tests run in parallel on a 2-core machine: one intra-op thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (small tensors on the shared 2-core test machine: threads only
    add overhead); restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def held_out_crop(path, size: int, slices: int):
    """A centre crop (size x size x slices) of a real held-out scan, scaled to [0, 1] (0.5-99.5th percentiles),
    as the demo prepares its references."""
    from medldm.data.intensity import fit_normalization, normalize
    from medldm.demo import _center_crop
    from medldm.io.reader import load_scan

    img = _center_crop(load_scan(path), size, slices)
    ref = normalize(img, fit_normalization(img, "MR", out_range=(0.0, 1.0)))
    ref.meta["original_dtype"] = "float32"
    return ref


def psnr01(a, b) -> float:
    """Mean 2D PSNR over the slices of two (X, Y, Z) images in [0, 1] (data_range 1)."""
    import numpy as np
    import torch

    from medldm.metrics import psnr

    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float32), torch.as_tensor(np.asarray(b), dtype=torch.float32)
    return float(psnr(a.permute(2, 0, 1)[:, None], b.permute(2, 0, 1)[:, None], data_range=1.0).mean())


def dcm2niix_canonical(folder, out):
    """dcm2niix's NIfTI of the series in ``folder`` (written under ``out``), as ``nib.as_closest_canonical``."""
    import subprocess

    import nibabel as nib

    exe = require_tool("dcm2niix")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-f", "%s", "-o", str(out), str(folder)], check=True, capture_output=True,
                   timeout=120)
    (ref,) = sorted(out.glob("*.nii"))
    return nib.as_closest_canonical(nib.load(ref))


def voxel_centres(img):
    """World positions of the corner voxel centres of a NIfTI image (the affine is linear, so corners suffice)."""
    import itertools

    import numpy as np

    idx = np.array(list(itertools.product(*[(0, n - 1) for n in img.shape[:3]])), float)
    return idx @ img.affine[:3, :3].T + img.affine[:3, 3]
