"""load_scan on real NIfTI: values, affine (nibabel's pick), 2D, 4D + volume, dtypes, bad files."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medldm.io.errors import CaseError
from medldm.io.reader import load_scan


def file_hash(f: Path) -> str:
    return hashlib.sha256(Path(f).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def example4d() -> Path:
    p = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    if not p.exists():
        pytest.skip("nibabel test data not installed")
    return p


def test_3d_values_affine_and_meta(dipy_files):
    f = dipy_files / "S0_10slices.nii.gz"
    ref = nib.load(f)
    img = load_scan(f)
    assert ref.shape == (128, 128, 10, 1)  # trailing singleton dimension is dropped
    assert tuple(img.shape) == (128, 128, 10)
    np.testing.assert_array_equal(img.numpy(), ref.get_fdata()[..., 0])
    np.testing.assert_allclose(img.affine.numpy(), ref.affine)
    m = img.meta
    assert m["kind"] == "nifti" and m["original_ndim"] == 3 and m["modality"] == "unknown"
    assert m["original_dtype"] == str(ref.get_data_dtype()) and m["filename_or_obj"] == str(f)
    np.testing.assert_allclose(m["spacing"], np.linalg.norm(ref.affine[:3, :3], axis=0))
    assert m["space"] == "RAS" and m["original_channel_dim"] == "no_channel"


def test_anisotropic_spacing(dipy_files):
    img = load_scan(dipy_files / "aniso_vox.nii.gz")
    np.testing.assert_allclose(img.meta["spacing"], nib.load(dipy_files / "aniso_vox.nii.gz").header.get_zooms()[:3])


def test_uint8_template_keeps_dtype(mni152):
    img = load_scan(mni152)
    assert tuple(img.shape) == (197, 233, 189) and img.meta["original_dtype"] == "uint8"
    assert img.meta["spacing"] == pytest.approx((1.0, 1.0, 1.0))


def test_4d_needs_volume(example4d):
    before = file_hash(example4d)
    with pytest.raises(CaseError, match=r"4D image of shape \(128, 96, 24, 2\) \(2 volumes\) — pass --volume K"):
        load_scan(example4d)
    with pytest.raises(CaseError, match="out of range"):
        load_scan(example4d, volume=2)
    img = load_scan(example4d, volume=1)
    ref = nib.load(example4d)
    np.testing.assert_array_equal(img.numpy(), ref.get_fdata()[..., 1])
    np.testing.assert_allclose(img.affine.numpy(), ref.affine)
    assert any("volume 1 selected" in w for w in img.meta["warnings"])
    assert file_hash(example4d) == before


def test_2d_nifti_becomes_x_y_1(dipy_files, tmp_path):
    sl = np.load(dipy_files / "t1_coronal_slice.npy")  # real T1 slice
    aff = np.diag([0.9, 1.1, 1.0, 1.0])
    aff[:3, 3] = [-10, 20, 5]
    nib.save(nib.Nifti1Image(sl.astype(np.int16), aff), tmp_path / "slice.nii")
    img = load_scan(tmp_path / "slice.nii")
    assert tuple(img.shape) == (*sl.shape, 1) and img.meta["original_ndim"] == 2
    np.testing.assert_array_equal(img[..., 0].numpy(), sl.astype(np.int16))
    np.testing.assert_allclose(img.affine.numpy(), aff)
    assert img.meta["original_dtype"] == "int16"


def test_scaled_nifti_reports_exact_dtype(dipy_files, tmp_path):
    data = np.asarray(nib.load(dipy_files / "S0_10slices.nii.gz").dataobj)[..., 0].astype(np.int16)
    im = nib.Nifti1Image(data, np.eye(4))
    im.header.set_slope_inter(0.5, 10.0)  # float results
    nib.save(im, tmp_path / "scaled.nii.gz")
    im2 = nib.Nifti1Image(data, np.eye(4))
    im2.header.set_slope_inter(1.0, -1024.0)  # integer results, like CT HU
    nib.save(im2, tmp_path / "hu.nii.gz")
    a, b = load_scan(tmp_path / "scaled.nii.gz"), load_scan(tmp_path / "hu.nii.gz")
    np.testing.assert_allclose(a.numpy(), data * 0.5 + 10.0)
    assert a.meta["original_dtype"] == "float32"
    np.testing.assert_array_equal(b.numpy(), data - 1024.0)
    assert b.meta["original_dtype"] == "int16"


def test_corrupt_nifti_is_a_case_error(dipy_files, tmp_path):
    bad = tmp_path / "cut.nii.gz"
    raw = (dipy_files / "S0_10slices.nii.gz").read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    before = file_hash(bad)
    with pytest.raises(CaseError, match="cut.nii.gz: .*damaged") as e:
        load_scan(bad)
    assert "\n" not in str(e.value)
    assert file_hash(bad) == before


def test_missing_path_is_a_case_error(tmp_path):
    with pytest.raises(CaseError, match="not found"):
        load_scan(tmp_path / "nope.nii.gz")


def test_volume_on_3d_is_ignored_with_warning(dipy_files, tmp_path):
    f = shutil.copy(dipy_files / "aniso_vox.nii.gz", tmp_path / "a.nii.gz")
    img = load_scan(f, volume=1)
    assert any("ignored" in w for w in img.meta["warnings"])


def test_voxel_limit_counts_the_selected_volume_of_a_4d_file(example4d, monkeypatch):
    """MEDLDM_MAX_VOXELS bounds what is allocated: one volume of a 4D file (docs/limits.md)."""
    monkeypatch.setenv("MEDLDM_MAX_VOXELS", str(128 * 96 * 24))  # one volume fits, the whole file would not
    assert tuple(load_scan(example4d, volume=1).shape) == (128, 96, 24)
    monkeypatch.setenv("MEDLDM_MAX_VOXELS", str(128 * 96 * 24 - 1))
    with pytest.raises(CaseError, match=r"294912 voxels to read \(128x96x24x2\) exceed the limit of 294911"):
        load_scan(example4d, volume=1)


def test_truncated_uncompressed_file_is_refused_before_reading(dipy_files, tmp_path):
    """A real .nii cut short: the header's size no longer fits the file."""
    import gzip

    raw = gzip.open(dipy_files / "S0_10slices.nii.gz").read()
    p = tmp_path / "cut.nii"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaseError, match=r"cut.nii: the header claims 128x128x10x1 voxels of uint16 .* but the file "
                                        r"holds only .* — the file is truncated"):
        load_scan(p)
