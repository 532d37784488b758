"""DICOM series writer on real scans: derived CT/MR series, NIfTI -> DICOM, grid changes, anonymity,
atomicity, dciodvfy validity."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import require_tool
from monai.data import MetaTensor

from medldm.io import dicom_write
from medldm.io.dicom_pixels import choose_encoding
from medldm.io.dicom_uids import new_uid, uid_root
from medldm.io.dicom_write import save_dicom_series
from medldm.io.errors import CaseError
from medldm.io.geometry import lps_to_ras, resized_affine, world_corners
from medldm.io.nifti import save_nifti
from medldm.io.reader import load_scan

ATOL_MM = 1e-4


def _digest(paths) -> dict[str, str]:
    files = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _dciodvfy_errors(files) -> list[str]:
    """Error lines dciodvfy prints for each file (an empty list = valid)."""
    tool = require_tool("dciodvfy")
    errors = []
    for f in files:
        res = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        errors += [f"{Path(f).name}: {line}" for line in (res.stdout + res.stderr).splitlines() if "Error" in line]
    return errors


def _mt(data: np.ndarray, affine: np.ndarray, **meta) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
                      affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def _ct2_regular(dicomdir_tests, dest: Path) -> Path:
    """The regular run of 77654033/CT2 (3 slices 1.25 mm apart; the 4th file lies 202.5 mm away and is
    its own case since issue 10 item 4) copied into ``dest``."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted((dicomdir_tests / "77654033" / "CT2").iterdir()):
        if float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) > 0:
            shutil.copy(f, dest / f.name)
    return dest


def _ct_sources(pydicom_files, pydicom_data, dicomdir_tests, tmp_path):
    return {
        "CT_small": pydicom_files / "CT_small.dcm",
        "693_UNCI": pydicom_data / "693_UNCI.dcm",
        "CT2-series": _ct2_regular(dicomdir_tests, tmp_path / "CT2"),
    }


@pytest.mark.parametrize("name", ["CT_small", "693_UNCI", "CT2-series"])
def test_ct_derived_series_keeps_hu_patient_and_study(name, tmp_path, pydicom_files, pydicom_data, dicomdir_tests):
    src = _ct_sources(pydicom_files, pydicom_data, dicomdir_tests, tmp_path)[name]
    before = _digest([src])
    img = load_scan(src)
    files = save_dicom_series(img, tmp_path / "out", reference=img.meta["source_files"], description="test")
    assert [f.name for f in files] == [f"IM{k + 1:05d}.dcm" for k in range(img.shape[2])]
    back = load_scan(tmp_path / "out")
    assert np.array_equal(back.numpy(), img.numpy())  # HU exactly
    assert back.meta["original_dtype"] == img.meta["original_dtype"]
    np.testing.assert_allclose(back.affine.numpy(), img.affine.numpy(), atol=ATOL_MM)

    refs = [pydicom.dcmread(f) for f in img.meta["source_files"]]
    outs = [pydicom.dcmread(f) for f in files]
    src_uids = {str(r.SOPInstanceUID) for r in refs} | {str(refs[0].SeriesInstanceUID)}
    assert len({str(o.SOPInstanceUID) for o in outs}) == len(outs)
    for k, (o, r) in enumerate(zip(outs, refs, strict=True)):
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                   "AccessionNumber", "Modality"):
            assert o.get(kw) == r.get(kw), kw
        assert str(o.SOPInstanceUID) not in src_uids and str(o.SeriesInstanceUID) not in src_uids
        assert list(o.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert o.SOPClassUID == r.SOPClassUID
        assert o.InstanceNumber == k + 1
        assert "[medldm test]" in o.SeriesDescription
        assert o.SourceImageSequence[0].ReferencedSOPInstanceUID == r.SOPInstanceUID
        assert o.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        # unchanged image + reference encoding reused: stored values identical to the source's
        assert np.array_equal(o.pixel_array.astype(np.int64), r.pixel_array.astype(np.int64))
        assert not any(e.tag.is_private for e in o)
    assert _dciodvfy_errors(files) == []
    assert _digest([src]) == before  # reference never modified


@pytest.mark.parametrize("name", ["MR_small", "MR-SIEMENS-DICOM-WithOverlays"])
def test_mr_derived_series_drops_overlays_and_private_tags(name, tmp_path, pydicom_files, pydicom_data):
    src = pydicom_files / f"{name}.dcm" if name == "MR_small" else pydicom_data / f"{name}.dcm"
    img = load_scan(src)
    files = save_dicom_series(img, tmp_path / "mr", reference=[src])
    o = pydicom.dcmread(files[0])
    assert not any(e.tag.is_private or 0x6000 <= e.tag.group <= 0x60FF for e in o)
    assert "IconImageSequence" not in o
    back = load_scan(files[0])
    assert np.array_equal(back.numpy(), img.numpy())
    assert _dciodvfy_errors(files) == []


def test_float_ct_uses_slope_with_documented_precision(tmp_path, pydicom_files):
    """A model output in float HU: stored with a rescale slope, error <= slope / 2."""
    img = load_scan(pydicom_files / "CT_small.dcm")
    noisy = img.numpy() + np.random.default_rng(0).normal(0, 7.3, img.shape).astype(np.float32)
    files = save_dicom_series(_mt(noisy, img.affine.numpy(), modality="CT"), tmp_path / "f",
                              reference=img.meta["source_files"])
    ds = pydicom.dcmread(files[0])
    slope = float(ds.RescaleSlope)
    assert slope <= (noisy.max() - noisy.min()) / 65535 * 1.001
    back = load_scan(tmp_path / "f").numpy()
    assert np.max(np.abs(back - noisy)) <= slope / 2 + 1e-3
    assert _dciodvfy_errors(files) == []


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same image in world space with axes flipped to a fixed direction (for comparing orderings)."""
    c = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(c.dataobj), c.affine


@pytest.mark.parametrize("name", ["S0_10slices.nii.gz", "aniso_vox.nii.gz"])
def test_nifti_to_dicom_to_nifti_round_trip(name, tmp_path, dipy_files):
    src = dipy_files / name
    before = _digest([src])
    img = load_scan(src)
    files = save_dicom_series(img, tmp_path / "s")
    back = load_scan(tmp_path / "s")
    assert np.array_equal(back.numpy(), img.numpy())  # integer MR values exact
    assert back.meta["original_dtype"] == img.meta["original_dtype"]  # int16 / uint16 kept
    np.testing.assert_allclose(back.affine.numpy(), img.affine.numpy(), atol=ATOL_MM)
    a, b = nib.load(src), nib.load(save_nifti(back, tmp_path / "back.nii.gz"))  # ... and on to NIfTI
    assert b.get_data_dtype() == a.get_data_dtype()
    assert np.array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj).reshape(b.shape))
    np.testing.assert_allclose(b.affine, a.affine, atol=ATOL_MM)
    assert _dciodvfy_errors(files) == []
    assert _digest([src]) == before


def test_left_handed_affine_is_written_in_ascending_slice_order(tmp_path, dipy_files):
    """A slice axis against the DICOM normal: slices reversed, same image in world space."""
    img = load_scan(dipy_files / "aniso_vox.nii.gz")
    nz = img.shape[2]
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, nz - 1
    data, aff = img.numpy()[:, :, ::-1], img.affine.numpy() @ flip
    save_dicom_series(_mt(data, aff), tmp_path / "lh")
    back = load_scan(tmp_path / "lh")
    d1, a1 = _canonical(back.numpy(), back.affine.numpy())
    d0, a0 = _canonical(data, aff)
    assert np.array_equal(d1, d0)
    np.testing.assert_allclose(a1, a0, atol=ATOL_MM)


def test_grid_change_writes_new_positions_and_spacing(tmp_path, dicomdir_tests):
    """Twice the slices and twice the in-plane resolution over the same field of view (super-resolution)."""
    src = dicomdir_tests / "98892001" / "CT5N"
    img = load_scan(src)
    x, y, z = img.shape
    sr = np.repeat(np.repeat(np.repeat(img.numpy(), 2, 0), 2, 1), 2, 2)
    new_shape = (2 * x, 2 * y, 2 * z)
    aff = resized_affine(img.affine.numpy(), (x, y, z), new_shape)
    files = save_dicom_series(_mt(sr, aff, modality="CT"), tmp_path / "g", reference=img.meta["source_files"])
    assert len(files) == 2 * z
    sp = img.meta["spacing"]
    lps = lps_to_ras(aff)
    src_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in img.meta["source_files"]]
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, float), lps[:3, 3] + k * lps[:3, 2],
                                   atol=ATOL_MM)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(sp[2] / 2, abs=1e-4)
        assert float(ds.SliceThickness) == pytest.approx(sp[2] / 2, abs=1e-4)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([sp[1] / 2, sp[0] / 2], abs=1e-6)
        assert (ds.Rows, ds.Columns) == (2 * y, 2 * x)
        # per-slice header from the nearest source slice: new slice k sits at old index (k + 0.5) / 2 - 0.5
        assert src_uids.index(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) == round((k + 0.5) / 2 - 0.5)
    back = load_scan(tmp_path / "g")
    assert np.array_equal(back.numpy(), sr)
    np.testing.assert_allclose(back.affine.numpy(), aff, atol=ATOL_MM)
    np.testing.assert_allclose(world_corners(back.affine.numpy(), back.shape),
                               world_corners(img.affine.numpy(), img.shape), atol=ATOL_MM)
    assert _dciodvfy_errors(files) == []


def test_thick_slices_from_a_written_reference(tmp_path, dipy_files):
    """Half the slices (2-slice average) of a real oblique MR, derived from its own DICOM series."""
    img = load_scan(dipy_files / "aniso_vox.nii.gz")
    ref_files = save_dicom_series(img, tmp_path / "ref")
    x, y, z = img.shape
    thick = np.rint(img.numpy().reshape(x, y, z // 2, 2).mean(-1))
    aff = resized_affine(img.affine.numpy(), (x, y, z), (x, y, z // 2))
    files = save_dicom_series(_mt(thick, aff), tmp_path / "thick", reference=tmp_path / "ref")
    ref_uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ref_files]
    lps = lps_to_ras(aff)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, float), lps[:3, 3] + k * lps[:3, 2],
                                   atol=ATOL_MM)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(2 * img.meta["spacing"][2], abs=1e-4)
        assert float(ds.SliceThickness) == pytest.approx(2 * img.meta["spacing"][2], abs=1e-4)
        assert ref_uids.index(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) in (2 * k, 2 * k + 1)
    back = load_scan(tmp_path / "thick")
    assert np.array_equal(back.numpy(), thick)
    np.testing.assert_allclose(world_corners(back.affine.numpy(), back.shape),
                               world_corners(img.affine.numpy(), img.shape), atol=ATOL_MM)
    assert _dciodvfy_errors(files) == []


def _all_strings(ds: pydicom.Dataset) -> list[str]:
    out = []
    for e in ds.iterall():
        if e.VR in ("SQ", "OB", "OW", "UN"):
            continue
        vals = e.value if isinstance(e.value, list | pydicom.multival.MultiValue) else [e.value]
        out += [str(v) for v in vals]
    return out


def test_no_reference_series_has_no_source_identifiers(tmp_path, dicomdir_tests):
    src_dir = _ct2_regular(dicomdir_tests, tmp_path / "CT2")
    img = load_scan(src_dir)
    ref = pydicom.dcmread(img.meta["source_files"][0])
    secrets = {kw: str(ref.get(kw)) for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                                               "SeriesInstanceUID", "AccessionNumber", "InstitutionName",
                                               "StudyID", "FrameOfReferenceUID", "SOPInstanceUID")
               if ref.get(kw) not in (None, "")}
    assert len(secrets) >= 5
    files = save_dicom_series(img, tmp_path / "anon")  # meta keeps modality CT but no reference
    for f in files:
        ds = pydicom.dcmread(f)
        text = "\n".join(_all_strings(ds))
        for kw, s in secrets.items():
            assert str(ds.get(kw, "")) != s, kw
            assert len(s) < 6 or s not in text, kw  # nowhere else either (short values: e.g. "2")
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    back = load_scan(tmp_path / "anon")
    assert np.array_equal(back.numpy(), img.numpy())
    assert _dciodvfy_errors(files) == []


def test_failure_mid_series_leaves_no_partial_output(tmp_path, dipy_files, monkeypatch):
    img = load_scan(dipy_files / "aniso_vox.nii.gz")
    out = tmp_path / "series"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    real, calls = dicom_write._write, []

    def failing(ds, path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        real(ds, path)

    monkeypatch.setattr(dicom_write, "_write", failing)
    with pytest.raises(OSError, match="disk full"):
        save_dicom_series(img, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # previous output untouched
    calls.clear()
    with pytest.raises(OSError):
        save_dicom_series(img, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_rejects_what_dicom_cannot_hold(tmp_path, dipy_files, dicomdir_tests):
    img = load_scan(dipy_files / "aniso_vox.nii.gz")
    sheared = img.affine.numpy().copy()
    sheared[:3, 1] += 0.3 * sheared[:3, 0]  # in-plane shear
    with pytest.raises(CaseError, match="not perpendicular"):
        save_dicom_series(_mt(img.numpy(), sheared), tmp_path / "a")
    bad = img.numpy().copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(CaseError, match="NaN"):
        save_dicom_series(_mt(bad, img.affine.numpy()), tmp_path / "b")
    with pytest.raises(CaseError, match="series"):  # MR2 holds several series
        save_dicom_series(img, tmp_path / "c", reference=dicomdir_tests / "98892003" / "MR2")
    with pytest.raises(CaseError, match="orientations"):  # MR700: one series, 7 differently oriented slices
        save_dicom_series(img, tmp_path / "d", reference=dicomdir_tests / "98892003" / "MR700")
    assert not any(tmp_path.iterdir())


def test_uid_root(monkeypatch):
    assert uid_root() == "2.25." and new_uid().startswith("2.25.")
    monkeypatch.setenv("MEDLDM_UID_ROOT", "1.2.826.0.1.3680043.10.999")
    u = new_uid()
    assert u.startswith("1.2.826.0.1.3680043.10.999.") and u.is_valid
    monkeypatch.setenv("MEDLDM_UID_ROOT", "1.02.x")
    with pytest.raises(ValueError, match="MEDLDM_UID_ROOT"):
        new_uid()


def test_encoding_choice_on_real_values(pydicom_data):
    hu = load_scan(pydicom_data / "693_UNCI.dcm").numpy()
    enc = choose_encoding(hu)
    assert enc.max_error == 0 and enc.slope == 1 and enc.signed  # HU (negative) -> int16, exact
    wide = hu * 40  # integer range wider than 16 bits: lossy, error bounded by slope / 2
    enc = choose_encoding(wide)
    assert 0 < enc.max_error <= enc.slope / 2 * 1.001
    assert enc.slope >= (wide.max() - wide.min()) / 65535
    np.testing.assert_allclose(enc.decode(enc.encode(wide)), wide, atol=enc.slope / 2 * 1.001)


@pytest.mark.parametrize("case", ["aniso_vox", "CT5N"])
def test_dcm2niix_reads_the_written_geometry(case, tmp_path, dipy_files, dicomdir_tests):
    """An independent reader (dcm2niix) sees the same image in world space as the one written."""
    tool = require_tool("dcm2niix")
    if case == "aniso_vox":  # oblique MR, no reference (Secondary Capture with geometry)
        img = load_scan(dipy_files / "aniso_vox.nii.gz")
        save_dicom_series(img, tmp_path / "s")
    else:  # derived CT series
        img = load_scan(dicomdir_tests / "98892001" / "CT5N")
        save_dicom_series(img, tmp_path / "s", reference=img.meta["source_files"])
    res = subprocess.run([tool, "-z", "y", "-f", "x", "-o", str(tmp_path), str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    theirs = nib.as_closest_canonical(nib.load(tmp_path / "x.nii.gz"))
    ours = nib.as_closest_canonical(nib.Nifti1Image(img.numpy(), img.affine.numpy()))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)  # dcm2niix stores float32
    assert np.array_equal(np.asarray(theirs.dataobj).astype(np.float32), np.asarray(ours.dataobj))


# ---------------------------------------------------------------- provenance (IHE AI Results), issue 15
PROV = {"model": "mr-denoise-2d", "model_hash": "0123456789abcdef" * 4, "task": "denoise", "steps": 2,
        "sampler": "ddim", "seed": 0}


def _contribution(ds: pydicom.Dataset) -> pydicom.Dataset:
    items = [it for it in ds.ContributingEquipmentSequence if it.Manufacturer == "medldm"]
    assert len(items) == 1
    return items[0]


@pytest.mark.parametrize("series", ["98892001/CT5N", "MR_small.dcm"])
def test_provenance_tags_on_a_derived_series(series, tmp_path, dicomdir_tests, pydicom_files):
    """Same study, new Series/SOP UIDs, DERIVED, references to every source slice, DerivationDescription with
    model/task/steps, ContributingEquipmentSequence (DCM 109102 Processing Equipment, medldm, version, model +
    hash), a research-use SeriesDescription; dciodvfy: 0 errors."""
    from medldm import __version__

    src = pydicom_files / series if series.endswith(".dcm") else dicomdir_tests / series
    img = load_scan(src)
    img.meta["provenance"] = dict(PROV)
    files = save_dicom_series(img, tmp_path / "d", reference=img.meta["source_files"],
                              description="denoise (mr-denoise-2d)")
    refs = [pydicom.dcmread(f, stop_before_pixels=True) for f in img.meta["source_files"]]
    ref_sops = {str(r.SOPInstanceUID) for r in refs}
    for o in (pydicom.dcmread(f) for f in files):
        assert o.StudyInstanceUID == refs[0].StudyInstanceUID
        assert o.SeriesInstanceUID != refs[0].SeriesInstanceUID and str(o.SOPInstanceUID) not in ref_sops
        assert "DERIVED" in list(o.ImageType)
        assert {str(i.ReferencedSOPInstanceUID) for i in o.SourceImageSequence} <= ref_sops
        assert o.ReferencedSeriesSequence[0].SeriesInstanceUID == refs[0].SeriesInstanceUID
        d = o.DerivationDescription
        assert "mr-denoise-2d" in d and "task denoise" in d and "steps 2" in d and PROV["model_hash"] in d
        it = _contribution(o)
        code = it.PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == \
            ("109102", "DCM", "Processing Equipment")
        assert it.SoftwareVersions == __version__
        assert it.ManufacturerModelName == "mr-denoise-2d sha256:" + PROV["model_hash"][:16]
        assert "[medldm denoise (mr-denoise-2d)] research use only" in o.SeriesDescription
        assert len(o.SeriesDescription) <= 64
    assert {str(i.ReferencedSOPInstanceUID) for f in files
            for i in pydicom.dcmread(f).SourceImageSequence} == ref_sops  # every source slice is referenced
    assert _dciodvfy_errors(files) == []


def test_derived_uids_are_deterministic_for_source_and_options(tmp_path, dicomdir_tests):
    """The same source series + model + options -> the same Series and SOP UIDs (a PACS re-run is detected);
    other options -> other UIDs; no provenance -> new UIDs every time."""
    from medldm.io.dicom_write import derived_series_uid

    img = load_scan(dicomdir_tests / "98892001" / "CT5N")

    def uids(name, prov):
        kw = {"provenance": prov} if prov is not None else {}
        files = save_dicom_series(img, tmp_path / name, reference=img.meta["source_files"], **kw)
        ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        return str(ds[0].SeriesInstanceUID), [str(d.SOPInstanceUID) for d in ds]

    a, b = uids("a", PROV), uids("b", dict(PROV))
    assert a == b and len(set(a[1])) == len(a[1])
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in img.meta["source_files"]]
    assert a[0] == derived_series_uid(str(src[0].SeriesInstanceUID), PROV, [d.SOPInstanceUID for d in src])
    # one part of a source series (a stack, a part split at a gap) gets its own derived series
    part = load_scan(img.meta["source_files"][:2])
    p1 = save_dicom_series(part, tmp_path / "part", reference=part.meta["source_files"], provenance=PROV)
    assert str(pydicom.dcmread(p1[0], stop_before_pixels=True).SeriesInstanceUID) != a[0]
    c = uids("c", {**PROV, "steps": 3})
    assert c[0] != a[0] and not set(c[1]) & set(a[1])
    assert uids("d", None)[0] != uids("e", None)[0]
    assert pydicom.uid.UID(a[0]).is_valid and len(a[0]) <= 64


def test_provenance_on_folder_output_without_reference_and_deidentified(tmp_path, dipy_files, dicomdir_tests):
    """NIfTI in -> DICOM out (no source series) and a de-identified derived series carry medldm's contribution
    too; dciodvfy: 0 errors."""
    img = load_scan(dipy_files / "S0_10slices.nii.gz")
    img.meta["provenance"] = dict(PROV)
    files = save_dicom_series(img, tmp_path / "n")
    o = pydicom.dcmread(files[0])
    assert "mr-denoise-2d" in o.DerivationDescription and "without a DICOM source" in o.DerivationDescription
    assert _contribution(o).ManufacturerModelName.startswith("mr-denoise-2d")
    assert "research use only" in o.SeriesDescription
    src = load_scan(dicomdir_tests / "98892001" / "CT5N")
    files2 = save_dicom_series(src, tmp_path / "deid", reference=src.meta["source_files"], provenance=PROV,
                               deidentify=True)
    o2 = pydicom.dcmread(files2[0])
    it = _contribution(o2)
    assert it.ContributionDescription == o2.DerivationDescription
    ref = pydicom.dcmread(src.meta["source_files"][0], stop_before_pixels=True)
    assert str(ref.SeriesInstanceUID) not in str(o2.DerivationDescription)
    assert _dciodvfy_errors([files[0], files2[0]]) == []


def test_derived_dwi_keeps_private_diffusion_tags_unless_deidentified(tmp_path):
    """GE keeps b-value (0043,1039) and gradient (0019,10bb-bd) in private tags only: a derived series keeps them
    (dcm2niix then reads bval/bvec back, tests/test_conformance.py); --deidentify removes them with every private tag."""
    from medldm.io.dicom_write import save_dicom_series
    from medldm.io.discover import scan_folder
    from medldm.io.reader import load_case

    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((Path(__file__).parent / "data" / "vendor" / "dcm_qa_ge_dwi").glob("i*")):
        (src / f.name).write_bytes(f.read_bytes())
    (case,) = scan_folder(src).cases
    img = load_case(case, volume=1, as_numpy=True)
    ref = pydicom.dcmread(img.meta["source_files"][0], stop_before_pixels=True)
    for deid in (False, True):
        out = save_dicom_series(img, tmp_path / f"out{deid}", reference=img.meta["source_files"], deidentify=deid)
        ds = pydicom.dcmread(out[0], stop_before_pixels=True)
        if deid:
            assert not any(e.tag.is_private for e in ds)
            continue
        assert ds.private_block(0x0043, "GEMS_PARM_01")[0x39].value == ref.private_block(0x0043, "GEMS_PARM_01")[0x39].value
        for off in (0xBB, 0xBC, 0xBD):
            assert ds.private_block(0x0019, "GEMS_ACQU_01")[off].value == ref.private_block(0x0019, "GEMS_ACQU_01")[off].value
