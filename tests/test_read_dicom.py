"""load_scan on real DICOM: HU, slice order, geometry, integrity warnings, multi-frame, codecs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from medldm.io.errors import CaseError
from medldm.io.geometry import lps_to_ras
from medldm.io.reader import load_scan


def tree_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for root in paths:
        for f in sorted([root] if root.is_file() else root.rglob("*")):
            if f.is_file():
                h.update(str(f.name).encode() + f.read_bytes())
    return h.hexdigest()


def ras_position(ds) -> np.ndarray:
    """Centre of the first voxel of a slice in RAS, from the header alone."""
    return (lps_to_ras(np.eye(4)) @ np.r_[np.asarray(ds.ImagePositionPatient, float), 1.0])[:3]


@pytest.fixture
def ct5n(dicomdir_tests) -> list[Path]:
    return sorted((dicomdir_tests / "98892001" / "CT5N").iterdir())


def copy_series(files, dest: Path, rename=lambda i, f: f.name) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        out.append(Path(shutil.copy(f, dest / rename(i, f))))
    return out


def test_ct_small_hu_matches_modality_lut(pydicom_files):
    f = pydicom_files / "CT_small.dcm"
    ds = pydicom.dcmread(f)
    img = load_scan(f)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert tuple(img.shape) == (128, 128, 1)
    np.testing.assert_array_equal(img[..., 0].numpy(), hu.T)  # (X=cols, Y=rows)
    assert img.dtype.is_floating_point and img.meta["original_dtype"] == "int16"
    assert img.meta["modality"] == "CT" and img.meta["original_ndim"] == 2
    assert img.meta["spacing"][2] == pytest.approx(float(ds.SliceThickness))
    # voxel (i, j) sits at IPP + i*row*dc + j*col*dr (LPS), i.e. the affine maps centres
    aff = img.affine.numpy()
    i, j = 100, 7
    row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.asarray(ds.ImagePositionPatient, float) + i * dc * row + j * dr * col
    np.testing.assert_allclose(aff @ [i, j, 0, 1], np.r_[-lps[0], -lps[1], lps[2], 1], atol=1e-6)


def test_series_sorted_along_normal_with_spacing_from_positions(ct5n):
    img = load_scan(ct5n)
    headers = [pydicom.dcmread(f) for f in ct5n]
    n = np.cross(np.asarray(headers[0].ImageOrientationPatient[:3], float),
                 np.asarray(headers[0].ImageOrientationPatient[3:], float))
    by_pos = sorted(headers, key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ n))
    assert tuple(img.shape) == (16, 16, 5)
    for k, ds in enumerate(by_pos):
        np.testing.assert_array_equal(img[..., k].numpy(), apply_modality_lut(ds.pixel_array, ds).T)
        np.testing.assert_allclose(img.affine.numpy()[:3] @ [0, 0, k, 1], ras_position(ds), atol=1e-4)
    assert img.meta["spacing"][2] == pytest.approx(2.5, abs=1e-4)
    assert img.meta["warnings"] == [] and img.meta["integrity"]["uniform_spacing"]
    assert img.meta["source_files"] == [str(p) for p in
                                        sorted(ct5n, key=lambda p: float(np.asarray(
                                            pydicom.dcmread(p).ImagePositionPatient, float) @ n))]


def test_shuffled_names_and_instance_numbers_do_not_change_volume(ct5n, tmp_path):
    ref = load_scan(ct5n)
    rng = np.random.default_rng(0)
    names = [f"x{v:03d}" for v in rng.permutation(100)[: len(ct5n)]]
    out = tmp_path / "shuffled"
    out.mkdir()
    for f, name, inst in zip(ct5n, names, rng.permutation(len(ct5n)), strict=True):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(inst) + 1
        ds.save_as(out / name)
    img = load_scan(out)
    np.testing.assert_array_equal(img.numpy(), ref.numpy())
    np.testing.assert_allclose(img.affine.numpy(), ref.affine.numpy())


def test_missing_middle_slice_is_never_stacked(ct5n, tmp_path):
    """Issue 10 item 4: the slices after a gap used to sit one step away from where they were acquired.
    A list of files with a gap is refused; the folder is split into regular parts (tests/test_dicom_faults.py)."""
    src = copy_series(ct5n, tmp_path / "in")
    zs = {f: float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in src}
    middle = sorted(src, key=zs.get)[2]
    middle.unlink()
    rest = [f for f in src if f != middle]
    before = tree_hash(tmp_path / "in")
    with pytest.raises(CaseError, match=r"missing slices: gap of 5 mm .* about 1 slice of 2\.5 mm missing"):
        load_scan(rest)
    with pytest.raises(CaseError, match=r"holds 2 scans \(series-5_04\.16302\.0\.6_part-1, .*_part-2\)"):
        load_scan(tmp_path / "in")
    assert tree_hash(tmp_path / "in") == before


def test_real_gap_in_ct2_splits_into_parts_at_true_positions(dicomdir_tests):
    from medldm.io.discover import scan_folder
    from medldm.io.reader import load_case

    d = scan_folder(dicomdir_tests / "77654033" / "CT2")
    assert [(c.id, len(c.paths)) for c in d.cases] == [("series-2_51.28319.0.2_part-1", 1),
                                                      ("series-2_51.28319.0.2_part-2", 3)]
    for c in d.cases:
        img = load_case(c)
        assert c.integrity["split"]["gaps"][0]["missing"] == 161  # 202.5 mm / 1.25 mm steps
        for k, f in enumerate(img.meta["source_files"]):
            np.testing.assert_allclose(img.affine.numpy()[:3] @ [0, 0, k, 1], ras_position(pydicom.dcmread(f)),
                                       atol=1e-3)
    assert load_case(d.cases[1]).meta["spacing"][2] == pytest.approx(1.25, abs=1e-4)


def test_gantry_tilt_gives_sheared_affine_through_actual_positions(ct5n, tmp_path):
    out = tmp_path / "tilt"
    out.mkdir()
    for f in ct5n:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.3 * z, z]  # 16.7 deg gantry tilt
        ds.save_as(out / f.name)
    img = load_scan(out)
    assert any("gantry tilt" in w for w in img.meta["warnings"])
    assert img.meta["integrity"]["tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.3)), abs=0.01)
    aff = img.affine.numpy()
    for k, f in enumerate(sorted(out.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))):
        np.testing.assert_allclose(aff[:3] @ [0, 0, k, 1], ras_position(pydicom.dcmread(f)), atol=1e-4)


def test_mixed_image_sizes_are_refused(ct5n, tmp_path):
    files = copy_series(ct5n, tmp_path / "in")
    ds = pydicom.dcmread(files[1])
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::2, ::2]).tobytes()
    ds.Rows, ds.Columns = 8, 8
    ds.save_as(files[1])
    before = tree_hash(tmp_path / "in")
    with pytest.raises(CaseError, match=r"do not form one volume: 2 stacks: 16x16 .*\(4 images\); 8x8"):
        load_scan(files)
    assert tree_hash(tmp_path / "in") == before


def test_localizer_with_three_orientations_is_refused(dicomdir_tests):
    mr2 = dicomdir_tests / "98892003" / "MR2"
    files = [mr2 / n for n in ("4950", "4981", "5011")]  # one series, axial/coronal/sagittal
    before = tree_hash(*files)
    with pytest.raises(CaseError, match="3 stacks"):
        load_scan(files)
    assert tree_hash(*files) == before


def test_oblique_slice_geometry(dicomdir_tests):
    f = dicomdir_tests / "98892003" / "MR700" / "4528"
    ds = pydicom.dcmread(f)
    img = load_scan(f)
    aff = img.affine.numpy()
    row = np.asarray(ds.ImageOrientationPatient[:3], float)
    col = np.asarray(ds.ImageOrientationPatient[3:], float)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)  # header cosines are rounded
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(aff[:3, 0], flip * row * float(ds.PixelSpacing[1]), atol=1e-6)
    np.testing.assert_allclose(aff[:3, 1], flip * col * float(ds.PixelSpacing[0]), atol=1e-6)
    np.testing.assert_allclose(aff[:3, 2], flip * np.cross(row, col) * float(ds.SliceThickness), atol=1e-6)


def test_non_image_objects_are_refused_with_reason(pydicom_files):
    for name, what in [("rtstruct.dcm", "RTSTRUCT"), ("rtplan.dcm", "RTPLAN"), ("test-SR.dcm", "SR"),
                       ("waveform_ecg.dcm", "ECG")]:
        before = tree_hash(pydicom_files / name)
        with pytest.raises(CaseError, match=f"not an image: {what}"):
            load_scan(pydicom_files / name)
        assert tree_hash(pydicom_files / name) == before


def test_truncated_pixel_data_is_a_case_error(pydicom_files):
    f = pydicom_files / "MR_truncated.dcm"
    before = tree_hash(f)
    with pytest.raises(CaseError, match="damaged or truncated") as e:
        load_scan(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    assert tree_hash(f) == before


def test_four_d_series_needs_volume(ct5n, tmp_path):
    """Two acquisitions at the same positions (e.g. two time points) in one series."""
    out = tmp_path / "4d"
    out.mkdir()
    for acq in (1, 2):
        for f in ct5n:
            ds = pydicom.dcmread(f)
            ds.SOPInstanceUID = generate_uid()
            ds.AcquisitionNumber = acq
            if acq == 2:
                ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
            ds.save_as(out / f"{acq}_{f.name}")
    before = tree_hash(out)
    with pytest.raises(CaseError, match=r"4D series: 10 images at 5 positions .* pass --volume K \(0..1\)"):
        load_scan(out)
    assert tree_hash(out) == before
    v0, v1 = load_scan(out, volume=0), load_scan(out, volume=1)
    np.testing.assert_array_equal(v1.numpy() - v0.numpy(), 7)
    np.testing.assert_array_equal(v0.numpy(), load_scan(ct5n).numpy())


def test_duplicate_file_is_dropped_with_warning(ct5n, tmp_path):
    files = copy_series(ct5n, tmp_path / "in")
    shutil.copy(files[0], tmp_path / "in" / "copy_of_first")
    img = load_scan(tmp_path / "in")
    assert img.shape[2] == 5
    assert any("duplicate image" in w for w in img.meta["warnings"])


def test_plain_multiframe_emri(pydicom_data):
    f = pydicom_data / "emri_small.dcm"
    ds = pydicom.dcmread(f)
    img = load_scan(f)
    assert tuple(img.shape) == (64, 64, 10) and img.meta["original_ndim"] == 3
    np.testing.assert_array_equal(img.numpy(), np.transpose(ds.pixel_array, (2, 1, 0)))
    assert img.meta["original_dtype"] == "uint16"
    assert img.meta["spacing"][2] == pytest.approx(float(ds.SpacingBetweenSlices))
    assert any("without patient geometry" in w for w in img.meta["warnings"])


def test_enhanced_ct_uses_functional_groups(pydicom_data):
    f = pydicom_data / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(f)
    img = load_scan(f)
    assert tuple(img.shape) == (512, 512, 2)
    pos = [np.asarray(fr.PlanePositionSequence[0].ImagePositionPatient, float)
           for fr in ds.PerFrameFunctionalGroupsSequence]
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    aff = img.affine.numpy()
    for k in range(2):  # slice k of the volume is the frame at that position
        frame = [i for i, p in enumerate(pos) if np.allclose(aff[:3] @ [0, 0, k, 1], p * [-1, -1, 1], atol=1e-4)]
        assert len(frame) == 1
        np.testing.assert_array_equal(img[..., k].numpy(), hu[frame[0]].T)
    assert img.meta["original_dtype"] == "int16" and img.meta["warnings"] == []


@pytest.mark.parametrize("compressed, reference", [("MR2_J2KI.dcm", "MR2_UNCI.dcm"), ("693_J2KR.dcm", "693_UNCR.dcm")])
def test_jpeg2000_decodes_like_uncompressed(pydicom_data, compressed, reference):
    a, b = load_scan(pydicom_data / compressed), load_scan(pydicom_data / reference)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy())


def test_missing_codec_names_the_extra(pydicom_data, monkeypatch):
    from pydicom.pixels import get_decoder

    f = pydicom_data / "MR2_J2KI.dcm"
    dec = get_decoder(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    monkeypatch.setattr(dec, "_available", {})  # as if no JPEG 2000 plugin were installed
    before = tree_hash(f)
    with pytest.raises(CaseError, match=r"no decoder is installed — install the decoders: "
                                        r"pip install 'medldm\[dicom-codecs\]'"):
        load_scan(f)
    assert tree_hash(f) == before


def test_float_rescale_keeps_float32_dtype(pydicom_data):
    img = load_scan(pydicom_data / "MR2_UNCI.dcm")  # RescaleSlope 3.774114
    assert img.meta["original_dtype"] == "float32" and img.meta["modality"] == "MR"


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_transfer_syntaxes_decode_identically(pydicom_files, name):
    ref = load_scan(pydicom_files / "MR_small.dcm")
    img = load_scan(pydicom_files / name)
    np.testing.assert_array_equal(img.numpy(), ref.numpy())
    np.testing.assert_allclose(img.affine.numpy(), ref.affine.numpy())


def test_small_orientation_difference_is_a_warning(ct5n, tmp_path):
    files = copy_series(ct5n, tmp_path / "in")
    ds = pydicom.dcmread(files[2])
    iop = [float(v) for v in ds.ImageOrientationPatient]
    iop[1] += 5e-4  # below the 1e-3 split tolerance, above the 1e-4 warning level
    ds.ImageOrientationPatient = iop
    ds.save_as(files[2])
    img = load_scan(files)
    assert img.shape[2] == 5
    assert any("inconsistent orientation" in w for w in img.meta["warnings"])
    assert img.meta["integrity"]["orientation_max_deviation"] == pytest.approx(5e-4, rel=1e-3)


def test_files_of_two_series_are_refused(ct5n, dicomdir_tests):
    files = [*ct5n, *sorted((dicomdir_tests / "77654033" / "CT2").iterdir())]
    before = tree_hash(*files)
    with pytest.raises(CaseError, match="2 different series"):
        load_scan(files)
    assert tree_hash(*files) == before


def test_colour_and_non_dicom_inputs_are_refused(pydicom_data, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    inputs = [pydicom_data / "OT-PAL-8-face.dcm", pydicom_data / "US1_UNCR.dcm", txt]
    before = tree_hash(*inputs)
    with pytest.raises(CaseError, match="colour image"):
        load_scan(inputs[0])  # palette colour
    with pytest.raises(CaseError, match="colour image"):
        load_scan(inputs[1])  # RGB ultrasound
    with pytest.raises(CaseError, match="not a DICOM file"):
        load_scan(txt)
    assert tree_hash(*inputs) == before


def test_siemens_mosaic_is_refused_not_read_as_one_slice(pydicom_files, tmp_path):
    ds = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.save_as(tmp_path / "mosaic.dcm")
    before = tree_hash(tmp_path / "mosaic.dcm")
    with pytest.raises(CaseError, match="Siemens mosaic .* dcm2niix"):
        load_scan(tmp_path / "mosaic.dcm")
    assert tree_hash(tmp_path / "mosaic.dcm") == before
