"""NIfTI writer on real scans: header (sform/qform, units, pixdim), voxel type choice, 2D, resampled
grids, atomicity, inputs untouched."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medldm.io import nifti as nifti_mod
from medldm.io.errors import CaseError
from medldm.io.geometry import resized_affine, spacing_from_affine, world_corners
from medldm.io.nifti import save_nifti
from medldm.io.reader import load_scan
from medldm.io.writer import save_scan


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _mt(data, affine, **meta) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
                      affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


@pytest.mark.parametrize("name,dtype", [("aniso_vox.nii.gz", "int16"), ("S0_10slices.nii.gz", "uint16")])
def test_nifti_round_trip_header_and_values(name, dtype, tmp_path, dipy_files):
    src = dipy_files / name
    before = _sha(src)
    img = load_scan(src)
    out = save_nifti(img, tmp_path / "out.nii.gz")
    n = nib.load(out)
    assert n.get_data_dtype() == np.dtype(dtype)
    assert n.shape == tuple(img.shape)
    np.testing.assert_allclose(n.get_sform(), img.affine.numpy(), atol=1e-4)
    assert n.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(n.header.get_zooms()[:3], spacing_from_affine(img.affine.numpy()), rtol=1e-5)
    src_hdr = nib.load(src).header
    assert int(n.header["sform_code"]) == int(src_hdr["sform_code"])  # aligned (2) / scanner (1) kept
    affine = img.affine.numpy()
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if np.allclose(cols.T @ cols, np.eye(3), atol=1e-5):
        assert int(n.header["qform_code"]) > 0
        np.testing.assert_allclose(n.get_qform(), affine, atol=1e-4)
    else:  # S0_10slices has a sheared affine: a quaternion cannot hold it, so no (wrong) qform
        assert int(n.header["qform_code"]) == 0
    back = load_scan(out)
    assert np.array_equal(back.numpy(), img.numpy())
    assert _sha(src) == before


def test_ct_dicom_to_nifti_keeps_int16_hu_and_2d(tmp_path, pydicom_files, dicomdir_tests):
    img = load_scan(pydicom_files / "CT_small.dcm")
    assert img.meta["original_ndim"] == 2
    n = nib.load(save_nifti(img, tmp_path / "ct.nii"))
    assert n.ndim == 2 and n.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(n.dataobj), img.numpy()[:, :, 0])
    assert int(n.header["sform_code"]) == 1 and int(n.header["qform_code"]) == 1  # scanner
    series = load_scan(dicomdir_tests / "98892001" / "CT5N")
    back = load_scan(save_nifti(series, tmp_path / "ct5.nii.gz"))
    assert np.array_equal(back.numpy(), series.numpy()) and back.numpy().min() < 0  # signed HU kept
    np.testing.assert_allclose(back.affine.numpy(), series.affine.numpy(), atol=1e-4)


def test_dtype_choice_never_clips(tmp_path, dipy_files):
    img = load_scan(dipy_files / "aniso_vox.nii.gz")  # int16 MR, values 0..2149
    aff = img.affine.numpy()
    v = img.numpy()
    # model output in scanner units (non-integer, wide range): back to the source type, rounded
    n = nib.load(save_nifti(_mt(v + 0.3, aff, original_dtype="int16"), tmp_path / "a.nii.gz"))
    assert n.get_data_dtype() == np.int16 and np.array_equal(np.asarray(n.dataobj), np.rint(v + 0.3))
    # values beyond int16: float32, nothing clipped
    big = v * 20.0
    n = nib.load(save_nifti(_mt(big, aff, original_dtype="int16"), tmp_path / "b.nii.gz"))
    assert n.get_data_dtype() == np.float32 and float(np.asarray(n.dataobj).max()) == float(big.max())
    # normalised [0, 1] values: rounding would destroy them -> float32
    norm = v / v.max()
    n = nib.load(save_nifti(_mt(norm, aff, original_dtype="int16"), tmp_path / "c.nii.gz"))
    assert n.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(n.dataobj), norm.astype(np.float32))
    # an explicit type that cannot hold the values raises instead of wrapping around
    with pytest.raises(CaseError, match="do not fit uint8"):
        save_nifti(_mt(v, aff), tmp_path / "d.nii.gz", dtype="uint8")
    assert not (tmp_path / "d.nii.gz").exists()


def test_resampled_grid_keeps_field_of_view(tmp_path, dipy_files):
    """Super-resolution output: new affine from resized_affine; spacing changes, extent does not."""
    img = load_scan(dipy_files / "aniso_vox.nii.gz")
    old_shape = tuple(img.shape)
    new_shape = (old_shape[0] * 2, old_shape[1] * 2, old_shape[2] * 3)
    data = np.repeat(np.repeat(np.repeat(img.numpy(), 2, 0), 2, 1), 3, 2)
    aff = resized_affine(img.affine.numpy(), old_shape, new_shape)
    out = save_scan(_mt(data, aff, original_dtype="int16"), tmp_path / "sr.nii.gz")
    back = load_scan(out)
    assert tuple(back.shape) == new_shape
    np.testing.assert_allclose(back.meta["spacing"], np.array(img.meta["spacing"]) / [2, 2, 3], rtol=1e-5)
    np.testing.assert_allclose(world_corners(back.affine.numpy(), new_shape),
                               world_corners(img.affine.numpy(), old_shape), atol=1e-3)
    assert np.array_equal(back.numpy(), data)


def test_failed_write_leaves_destination_untouched(tmp_path, dipy_files, monkeypatch):
    img = load_scan(dipy_files / "aniso_vox.nii.gz")
    dest = tmp_path / "x.nii.gz"
    dest.write_bytes(b"previous")

    def boom(image, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(img, dest)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]  # no temporary file left


def test_choose_dtype_rules():
    v = np.array([0.0, 1.0, 2.0], np.float32)
    assert nifti_mod.choose_dtype(v, "uint8") == np.uint8
    assert nifti_mod.choose_dtype(v - 1, "uint8") == np.float32  # -1 does not fit
    assert nifti_mod.choose_dtype(v, "float64") == np.float64
    assert nifti_mod.choose_dtype(v, None) == np.float32
    assert nifti_mod.choose_dtype(v + 0.25, "int16") == np.float32  # small range: keep fractions
