"""scan_folder / output_path on a realistic messy tree built from real files."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from medldm.io.discover import output_path, scan_folder
from medldm.io.errors import CaseError, UsageError
from medldm.io.reader import load_case


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def tree(tmp_path, dicomdir_tests, dipy_files, pydicom_files) -> Path:
    """study/
         sub1/t1.nii.gz, sub2/scan.nii          NIfTI cases
         ct_head/IM0..IM4 (no extension)         one CT series (CT5N)
         mr2/...                                 3 series in one folder (98892003/MR2)
         notes.txt, rt/rtstruct.dcm, rt/sr       skipped
         broken/bad.dcm                          CT file cut short (before its pixel data)
    """
    root = tmp_path / "study"
    (root / "sub1").mkdir(parents=True)
    shutil.copy(dipy_files / "S0_10slices.nii.gz", root / "sub1" / "t1.nii.gz")
    (root / "sub2").mkdir()
    shutil.copy(dipy_files / "aniso_vox.nii.gz", root / "sub2" / "scan.nii.gz")
    (root / "ct_head").mkdir()
    for i, f in enumerate(sorted((dicomdir_tests / "98892001" / "CT5N").iterdir())):
        shutil.copy(f, root / "ct_head" / f"IM{i}")
    shutil.copytree(dicomdir_tests / "98892003" / "MR2", root / "mr2")
    (root / "notes.txt").write_text("not a scan\n")
    (root / "rt").mkdir()
    shutil.copy(pydicom_files / "rtstruct.dcm", root / "rt" / "rtstruct.dcm")
    shutil.copy(pydicom_files / "test-SR.dcm", root / "rt" / "sr")
    (root / "broken").mkdir()
    good = (pydicom_files / "CT_small.dcm").read_bytes()
    (root / "broken" / "bad.dcm").write_bytes(good[:3000])
    return root


def test_cases_ids_and_skips(tree):
    before = tree_hash(tree)
    d = scan_folder(tree)
    ids = [c.id for c in d.cases]
    assert "sub1/t1" in ids and "sub2/scan" in ids and "ct_head" in ids
    mr2 = [c for c in d.cases if c.id.startswith("mr2/")]
    # MR2: 3 series (two tri-plane localizers split into one stack per orientation + one single image)
    assert len({c.series_uid for c in mr2}) == 3 and len(mr2) == 7
    assert all(re.fullmatch(r"mr2/series-2_[0-9.]+(_stack-[123])?", c.id) for c in mr2)
    assert all(re.fullmatch(r"[A-Za-z0-9._/+-]+", i) for i in ids) and len(set(ids)) == len(ids)
    ct = next(c for c in d.cases if c.id == "ct_head")
    assert ct.kind == "dicom-series" and len(ct.paths) == 5 and ct.error is None
    assert next(c for c in d.cases if c.id == "sub1/t1").kind == "nifti"
    skipped = "\n".join(d.skipped)
    assert re.search(r"rtstruct\.dcm: skipped: RTSTRUCT is not an image", skipped)
    assert re.search(r"rt/sr: skipped: SR is not an image", skipped)
    assert "notes.txt: skipped: not a NIfTI or DICOM file" in skipped
    assert [c.id for c in scan_folder(tree).cases] == ids  # stable
    assert tree_hash(tree) == before


def test_corrupt_file_is_an_error_case_and_others_load(tree):
    before = tree_hash(tree)
    d = scan_folder(tree)
    bad = [c for c in d.cases if c.error is not None]
    assert [c.id for c in bad] == ["broken/bad"]
    assert isinstance(bad[0].error, CaseError) and "bad.dcm" in bad[0].error.line()
    assert "truncated" in bad[0].error.line()
    with pytest.raises(CaseError):
        load_case(bad[0])
    loaded = {c.id: load_case(c) for c in d.cases if c.error is None}
    assert tuple(loaded["ct_head"].shape) == (16, 16, 5)
    assert tuple(loaded["sub1/t1"].shape) == (128, 128, 10)
    assert tree_hash(tree) == before


def test_series_spanning_folders_is_one_case_per_folder(tmp_path, dicomdir_tests):
    """Issue 10 item 8: grouped by folder first, then by series (the output mirrors the input)."""
    files = sorted((dicomdir_tests / "98892001" / "CT5N").iterdir())
    for i, f in enumerate(files):
        sub = tmp_path / "ct" / ("a" if i < 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f.name)
    d = scan_folder(tmp_path)
    assert [(c.id, len(c.paths)) for c in d.cases] == [("ct/a", 2), ("ct/b", 3)]
    assert all(c.error is None and "other folder" in c.warnings[0] for c in d.cases)
    assert any("found in 2 folders" in n for n in d.notes)


def test_single_file_and_series_root(dicomdir_tests, dipy_files, pydicom_files):
    d = scan_folder(dipy_files / "aniso_vox.nii.gz")
    assert [c.id for c in d.cases] == ["aniso_vox"]
    d = scan_folder(pydicom_files / "CT_small.dcm")
    assert [c.id for c in d.cases] == ["CT_small"]
    d = scan_folder(dicomdir_tests / "98892001" / "CT5N")
    assert [c.id for c in d.cases] == ["CT5N"]


def test_missing_root_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        scan_folder(tmp_path / "absent")


def test_output_path_mirrors_layout(tree, tmp_path):
    d = {c.id: c for c in scan_folder(tree).cases}
    out = tmp_path / "OUT"
    assert output_path(d["sub1/t1"], out) == out / "sub1" / "t1.nii.gz"
    assert output_path(d["ct_head"], out) == out / "ct_head"
    assert output_path(d["ct_head"], out, "nifti") == out / "ct_head.nii.gz"
    assert output_path(d["sub2/scan"], out, "dicom") == out / "sub2" / "scan"
    with pytest.raises(UsageError):
        output_path(d["ct_head"], out, "png")


def test_nifti_extension_kept(tmp_path, dipy_files):
    import nibabel as nib

    nib.save(nib.load(dipy_files / "aniso_vox.nii.gz"), tmp_path / "plain.nii")
    c = scan_folder(tmp_path).cases[0]
    assert c.id == "plain" and output_path(c, tmp_path / "o") == tmp_path / "o" / "plain.nii"


def test_load_scan_on_folder_with_several_scans_says_what_to_do(tree):
    from medldm.io.reader import load_scan

    with pytest.raises(CaseError, match=r"holds \d+ scans .* use scan_folder\(\)"):
        load_scan(tree / "mr2")


def test_mixed_sizes_split_into_stacks(tmp_path, dicomdir_tests):
    import pydicom

    files = sorted((dicomdir_tests / "98892001" / "CT5N").iterdir())
    (tmp_path / "ct").mkdir()
    for f in files:
        shutil.copy(f, tmp_path / "ct" / f.name)
    ds = pydicom.dcmread(tmp_path / "ct" / files[0].name)
    ds.PixelData = ds.pixel_array[::2, ::2].copy().tobytes()
    ds.Rows = ds.Columns = 8
    ds.save_as(tmp_path / "ct" / files[0].name)
    d = scan_folder(tmp_path)
    assert [(c.id, len(c.paths)) for c in d.cases] == [("ct/series-5_04.16302.0.6_stack-1", 4),
                                                       ("ct/series-5_04.16302.0.6_stack-2", 1)]
    assert all(load_case(c).shape[:2] in ((16, 16), (8, 8)) for c in d.cases)
