"""Real vendor series through the readers (issue 20): GE jittered slice positions, group-0000 elements, degenerate
orientation, NIfTI qform/sform disagreement. Data: tests/data/vendor/* (small subsets of dcm2niix's public
validation series, licences beside them)."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import dcm2niix_canonical, voxel_centres
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from medldm.cli import main
from medldm.io.errors import CaseError
from medldm.io.reader import load_scan

VENDOR = Path(__file__).parent / "data" / "vendor"
GE_EPI = VENDOR / "dcm_qa_nih_ge_epi"
#: the steps of the GE series of issue 20 (positions rounded by the scanner; mean 7.0 mm, median 6.972 mm)
GE_STEPS = [6.958, 6.972, 7.057, 6.972, 6.958, 7.071, 6.972, 6.958, 7.057, 6.972, 6.958, 7.071, 6.972, 7.057]


def ge_volume_files() -> list[Path]:
    """Volume 1 of the GE EPI series: InstanceNumber 1-15, one slice per position."""
    return sorted(GE_EPI.glob("*.dcm"))[:15]


def jittered_ge(tmp_path: Path) -> Path:
    """The real GE volume with its slice positions moved to the rounded steps of issue 20's GE series."""
    d = tmp_path / "ge_jitter"
    d.mkdir()
    files = ge_volume_files()
    z0 = float(pydicom.dcmread(files[0], stop_before_pixels=True).ImagePositionPatient[2])
    z = z0 + np.concatenate([[0.0], np.cumsum(GE_STEPS)])
    for f, zk in zip(files, z, strict=True):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient[2] = round(float(zk), 4)
        ds.SliceLocation = round(float(zk), 4)
        ds.SpacingBetweenSlices = 7.0
        ds.save_as(d / f.name)
    return d


def test_ge_rounded_positions_read_as_one_regular_series(tmp_path):
    """Issue 20.1: positions rounded by the scanner (steps 6.958-7.071 mm) are one series on the least-squares grid,
    within the residuals of dcm2niix's grid (dcm2niix converts it without a warning)."""
    d = jittered_ge(tmp_path)
    img = load_scan(sorted(d.glob("*.dcm")))
    assert img.shape == (64, 64, 15)
    steps = np.asarray(GE_STEPS)
    k = np.arange(steps.size + 1)
    z = np.concatenate([[0.0], np.cumsum(steps)])
    slope = np.polyfit(k, z, 1)[0]
    assert abs(float(np.linalg.norm(img.affine.numpy()[:3, 2])) - slope) < 1e-4  # the least-squares step
    assert abs(slope - 7.0) < 0.02 and abs(np.median(steps) - 7.0) > 0.02  # not the median step
    ref = dcm2niix_canonical(d, tmp_path / "ref")
    ours = nib.as_closest_canonical(nib.Nifti1Image(img.numpy(), img.affine.numpy()))
    assert ours.shape == ref.shape[:3]
    np.testing.assert_array_equal(ours.get_fdata(), ref.get_fdata().reshape(ours.shape))
    # every real slice position lies within the residuals (< 0.1 mm) of the grid medldm describes; dcm2niix keeps
    # the first step (6.958 mm), so its last slice is 0.59 mm from where the scanner put it
    pos = np.sort([float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                   for f in sorted(d.glob("*.dcm"))])

    def off_grid(aff: np.ndarray) -> float:
        z = (aff @ np.array([[0, 0, i, 1.0] for i in range(15)]).T)[2]  # LPS and RAS share the z axis
        return float(np.abs(np.sort(z) - pos).max())

    fit = np.polyval(np.polyfit(np.arange(15), pos, 1), np.arange(15))
    assert off_grid(img.affine.numpy()) == pytest.approx(float(np.abs(fit - pos).max()), abs=1e-6)  # least squares
    assert off_grid(img.affine.numpy()) < 0.06
    assert off_grid(ref.affine) > 0.5
    np.testing.assert_allclose(voxel_centres(ours)[:, :2], voxel_centres(ref)[:, :2], atol=1e-3)  # in-plane


def test_real_gap_still_splits(dicomdir_tests):
    """Issue 20.1: the least-squares grid never bridges a real gap (pydicom's CT2 stays split as before)."""
    files = sorted((dicomdir_tests / "77654033" / "CT2").glob("*"))
    with pytest.raises(CaseError, match="gap|missing slices|not on a regular grid"):
        load_scan(files)


def test_slice_far_off_the_grid_is_still_refused(tmp_path):
    """A slice 20 % of the step off the fitted grid is not a rounding error: refused, never moved."""
    d = tmp_path / "off"
    d.mkdir()
    for i, f in enumerate(ge_volume_files()):
        ds = pydicom.dcmread(f)
        if i == 7:
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0  # 20 % of the 5 mm step
        ds.save_as(d / f.name)
    with pytest.raises(CaseError, match="not on a regular grid"):
        load_scan(sorted(d.glob("*.dcm")))


def with_command_set(src: Path, dst: Path) -> None:
    """Copy a DICOM file inserting Command Set elements (group 0000) after the file meta, as some DIMSE nodes store
    received instances (pydicom refuses to write them, so the bytes are spliced in)."""
    ds = pydicom.dcmread(src)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, (0002,0000) and the group length
    cmd = Dataset()
    cmd.add_new(0x00000002, "UI", str(ds.SOPClassUID))  # AffectedSOPClassUID
    cmd.add_new(0x00000100, "US", 1)  # CommandField: C-STORE-RQ
    cmd.add_new(0x00000110, "US", 7)  # MessageID
    cmd.add_new(0x00000700, "US", 0)  # Priority
    cmd.add_new(0x00000800, "US", 0x0101)  # CommandDataSetType
    cmd.add_new(0x00001000, "UI", str(ds.SOPInstanceUID))  # AffectedSOPInstanceUID
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    write_dataset(fp, cmd)
    dst.write_bytes(raw[:meta_end] + fp.getvalue() + raw[meta_end:])


def command_set_series(tmp_path: Path) -> Path:
    d = tmp_path / "with_group_0000"
    d.mkdir()
    for f in ge_volume_files():
        with_command_set(f, d / f.name)
    return d


def test_group_0000_is_dropped_on_read_and_the_derived_series_is_written(tmp_path):
    """Issue 20.2 (disk): instances carrying Command Set elements are read, enhanced and written back as a derived
    series (before: 'Command Set elements (0000,eeee) are not allowed when using dcmwrite()' after the model ran)."""
    src = command_set_series(tmp_path)
    assert any(e.tag.group == 0 for e in pydicom.dcmread(next(src.iterdir())))  # the input really carries them
    out = tmp_path / "out"
    assert main(["enhance", "-m", "mr-denoise-2d", "-i", str(src), "-o", str(out), "--to", "dicom", "--steps", "1",
                 "--quiet"]) == 0
    files = sorted(out.glob("*.dcm"))  # one series in: written into OUT itself (docs/guarantees.md)
    assert len(files) == 15
    for f in files:
        ds = pydicom.dcmread(f)
        assert not any(e.tag.group == 0 for e in ds) and "DERIVED" in list(ds.ImageType)


@pytest.mark.parametrize("iop", [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0]], ids=["all-zero", "not-perpendicular"])
def test_degenerate_orientation_is_refused(tmp_path, iop, capsys):
    """Issue 20.11: an all-zero (or non-perpendicular) ImageOrientationPatient is refused with one line, never put
    on a made-up identity grid (before: exit 0, 5 mm identity grid, the source's FrameOfReferenceUID kept)."""
    d = tmp_path / "series"
    d.mkdir()
    for f in ge_volume_files():
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = iop
        ds.save_as(d / f.name)
    with pytest.raises(CaseError, match="ImageOrientationPatient .* the slice orientation is unknown"):
        load_scan(sorted(d.glob("*.dcm")))
    assert main(["convert", str(d), str(tmp_path / "out.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert "ImageOrientationPatient" in err and "export the series again" in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_qform_sform_disagreement_is_warned(tmp_path, dipy_files, capsys):
    """Issue 20.12: a NIfTI whose qform is the sform's left/right mirror: a warning names the one used (the sform,
    as nibabel and FSL), the data lands on the sform's grid, and the output header agrees with itself."""
    src = nib.load(str(dipy_files / "aniso_vox.nii.gz"))
    aff = src.affine.copy()
    mirror = np.diag([-1.0, 1, 1, 1]) @ aff
    img = nib.Nifti1Image(np.asarray(src.dataobj), aff)
    img.set_sform(aff, code=1)
    img.set_qform(mirror, code=1)
    p = tmp_path / "disagree.nii.gz"
    nib.save(img, str(p))
    scan = load_scan(p)
    warn = [w for w in scan.meta["warnings"] if "qform and sform disagree" in w]
    assert len(warn) == 1 and "the sform is used" in warn[0]
    np.testing.assert_allclose(scan.affine.numpy(), aff, atol=1e-6)
    assert main(["info", str(p)]) == 0
    assert "qform and sform disagree" in capsys.readouterr().out
    out = tmp_path / "out.nii.gz"
    assert main(["convert", str(p), str(out)]) == 0
    o = nib.load(str(out))
    np.testing.assert_allclose(o.get_qform(), o.get_sform(), atol=1e-4)
    np.testing.assert_allclose(o.get_sform(), aff, atol=1e-4)
    # an agreeing header: no such warning
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), aff), str(tmp_path / "ok.nii.gz"))
    assert not any("disagree" in w for w in load_scan(tmp_path / "ok.nii.gz").meta["warnings"])


@pytest.mark.parametrize("value", ["5.0", "5.5", " 7 ", ""])
def test_series_number_as_scanners_write_it(tmp_path, value):
    """Issue 20.15: a SeriesNumber of "5.0" or "5.5" (or padded, or empty) never fails the DICOM output after the
    model ran (before: "5.5" gave "unexpected error ValueError" once the model had run). No whole number -> 1000."""
    d = tmp_path / "series"
    d.mkdir()
    for f in ge_volume_files()[:4]:
        ds = pydicom.dcmread(f)
        ds["SeriesNumber"].value = value
        ds.save_as(d / f.name)
    out = tmp_path / "out"
    assert main(["enhance", "-m", "mr-denoise-2d", "-i", str(d), "-o", str(out), "--to", "dicom", "--steps", "1",
                 "--quiet"]) == 0
    sn = {int(pydicom.dcmread(f, stop_before_pixels=True).SeriesNumber) for f in out.glob("*.dcm")}
    assert sn == {1000 + {"5.0": 5, "5.5": 0, " 7 ": 7, "": 0}[value]}


def test_philips_float_scaling_as_dcm2niix_and_display_on_request(monkeypatch):
    """Issue 20.8: Philips values are dcm2niix's default floating-point values (display / (RescaleSlope x
    MRScaleSlope)); MEDLDM_PHILIPS_SCALING=display gives the display values (RescaleSlope/Intercept only)."""
    files = sorted((VENDOR / "dcm_qa_philips_fmri").glob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    ss = float(ds.private_block(0x2005, "Philips MR Imaging DD 001")[0x0E].value)
    rs = float(ds.RescaleSlope)
    fp = load_scan(files, volume=0)
    assert any("floating-point values" in w for w in fp.meta["warnings"])
    monkeypatch.setenv("MEDLDM_PHILIPS_SCALING", "display")
    dv = load_scan(files, volume=0)
    assert not any("floating-point" in w for w in dv.meta["warnings"])
    np.testing.assert_allclose(fp.numpy(), dv.numpy() / (rs * ss), rtol=1e-6)
    assert abs(1 / (rs * ss) - 180.9) < 0.1  # this series: float values are 180.9 x the display values
    monkeypatch.setenv("MEDLDM_PHILIPS_SCALING", "raw")
    with pytest.raises(CaseError, match="MEDLDM_PHILIPS_SCALING"):
        load_scan(files, volume=0)


class _Served:
    """Stands in for dicomweb_client: serves the given datasets of one series (what a server returned)."""

    def __init__(self, datasets):
        self.datasets = datasets

    def iter_series(self, study, series, media_types=None):
        yield from self.datasets


@pytest.mark.filterwarnings("ignore:Expected implicit VR")  # pydicom on group 0000 in explicit-VR files
def test_dicomweb_one_unstorable_instance_fails_its_series_with_one_line(tmp_path):
    """Issue 20.2 (DICOMweb): a server returning instances with group-0000 elements is retrieved whole (they are
    dropped); an instance that cannot be written as a file at all (here a File Meta element inside the dataset,
    which pydicom refuses) made the retrieval raise `ValueError` out of the whole run. Now its series fails with
    one line naming the instance, and the other series of the same fetch are retrieved."""
    from medldm.io.dicomweb import DicomWeb, SeriesInfo, fetch

    good = [pydicom.dcmread(f) for f in sorted(command_set_series(tmp_path).glob("*.dcm"))]
    assert all(any(e.tag.group == 0 for e in ds) for ds in good)  # served with their Command Set elements
    broken = [pydicom.dcmread(f) for f in ge_volume_files()]
    broken[3].add_new(0x00020010, "UI", "1.2.840.10008.1.2.1")  # group 0002 inside the dataset
    for ds in broken:
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"

    class Server(DicomWeb):
        def __init__(self):  # no HTTP: the answers are the datasets above
            self.base, self.retries, self.backoff, self.client = "http://pacs.invalid/dicom-web", 0, 0.0, None

        def find(self, target):
            return [SeriesInfo("1.2", "broken", 15), SeriesInfo("1.2", "good", 15)]

        def retrieve_series(self, info, cache):
            self.client = _Served(broken if info.series == "broken" else good)
            return super().retrieve_series(info, cache)

    got = fetch("http://pacs.invalid/dicom-web/studies/1.2", cache=tmp_path / "cache", client=Server())
    assert [f.name for f in got.folders] == ["good"] and len(list(got.folders[0].glob("*.dcm"))) == 15
    (line,) = [e.line() for e in got.failures]
    assert "1 instance of the series cannot be stored" in line and broken[3].SOPInstanceUID in line
