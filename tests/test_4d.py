"""4D series end to end (issue 20.3 / 20.9): a real GE fMRI series (DICOM, 2 volumes of 15 slices,
tests/data/vendor/dcm_qa_nih_ge_epi) and nibabel's real 4D fMRI NIfTI go through info, convert, degrade, baseline
and enhance as they are: every volume processed, one 4D result (NIfTI with the same affine, or a derived DICOM
series that dcm2niix reads back as the same 4D grid); ``--volume K`` picks one volume."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import dcm2niix_canonical, voxel_centres

from medldm.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GE = Path(__file__).parent / "data" / "vendor" / "dcm_qa_nih_ge_epi"
EX4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def _canon(path: Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(str(path)))


@pytest.fixture(scope="module")
def ge(tmp_path_factory) -> Path:
    """The GE series alone in a folder (no LICENSE / README beside it), as dcm2niix wants it."""
    d = tmp_path_factory.mktemp("ge") / "epi"
    d.mkdir()
    for f in sorted(GE.glob("*.dcm")):
        (d / f.name).write_bytes(f.read_bytes())
    return d


def test_info_says_what_the_volumes_are(ge, capsys):
    """Before: 'FAILED ...: 4D series: 30 images at 15 positions ... pass --volume K' (exit 1)."""
    assert main(["info", str(ge), "--json"]) == 0
    (e,) = json.loads(capsys.readouterr().out)
    assert e["volumes"] == 2 and e["varies"] == "time point" and e["form"] == "classic" and e["shape"] == [64, 64, 15]


def test_convert_4d_dicom_to_one_4d_nifti_asdcm2niix_canonical(ge, tmp_path):
    ref = dcm2niix_canonical(ge, tmp_path / "ref")
    assert main(["convert", str(ge), str(tmp_path / "ours.nii.gz"), "--quiet"]) == 0
    ours = _canon(tmp_path / "ours.nii.gz")
    assert ours.shape == ref.shape == (64, 64, 15, 2)
    np.testing.assert_array_equal(ours.get_fdata(), ref.get_fdata())
    np.testing.assert_allclose(voxel_centres(ours), voxel_centres(ref), atol=0.01)


def test_enhance_4d_dicom_every_volume_into_one_4d_result(ge, tmp_path):
    """Each volume of the 4D output is what enhancing that volume alone (--volume K) gives, bit for bit; the
    derived DICOM series reads back in dcm2niix as the source's 4D grid."""
    common = ["-m", "mr-denoise-2d", "--steps", "1", "--quiet"]
    assert main(["enhance", "-i", str(ge), "-o", str(tmp_path / "all.nii.gz"), *common]) == 0
    full = nib.load(str(tmp_path / "all.nii.gz"))
    assert full.shape == (64, 64, 15, 2)
    for k in (0, 1):
        assert main(["enhance", "-i", str(ge), "-o", str(tmp_path / f"v{k}.nii.gz"), "--volume", str(k), *common]) == 0
        one = nib.load(str(tmp_path / f"v{k}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(full.dataobj)[..., k], np.asarray(one.dataobj))
        np.testing.assert_allclose(one.affine, full.affine, atol=1e-6)
    assert not np.array_equal(np.asarray(full.dataobj)[..., 0], np.asarray(full.dataobj)[..., 1])
    assert main(["enhance", "-i", str(ge), "-o", str(tmp_path / "dcm"), "--to", "dicom", *common]) == 0
    files = sorted((tmp_path / "dcm").rglob("*.dcm"))
    assert len(files) == 30
    # volume t of the derived series is made from (and references) volume t of the source
    src_uid = {int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber):
               str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ge.glob("*.dcm")}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        vol = (int(ds.InstanceNumber) - 1) // 15
        refs = {str(it.ReferencedSOPInstanceUID) for it in ds.SourceImageSequence}
        assert refs <= {src_uid[i] for i in range(1 + 15 * vol, 16 + 15 * vol)}
    back, src = dcm2niix_canonical(files[0].parent, tmp_path / "back"), dcm2niix_canonical(ge, tmp_path / "src")
    assert back.shape == src.shape == (64, 64, 15, 2)
    np.testing.assert_allclose(voxel_centres(back), voxel_centres(src), atol=0.01)
    ours = _canon(tmp_path / "all.nii.gz").get_fdata()
    assert np.abs(back.get_fdata() - ours).max() <= 0.5 + 1e-6  # the int16 DICOM holds the rounded values


def test_4d_nifti_through_degrade_baseline_enhance_keeps_the_affine(tmp_path):
    src = nib.load(str(EX4D))
    for argv, out in ((["degrade", str(EX4D), str(tmp_path / "d.nii.gz"), "--kind", "rician", "--level", "0.05"],
                       "d.nii.gz"),
                      (["baseline", "--task", "denoise", "--method", "gaussian", "-i", str(EX4D), "-o",
                        str(tmp_path / "b.nii.gz")], "b.nii.gz"),
                      (["enhance", "-m", "mr-denoise-2d", "--steps", "1", "-i", str(EX4D), "-o",
                        str(tmp_path / "e.nii.gz")], "e.nii.gz")):
        assert main([*argv, "--quiet"] if argv[0] != "degrade" else argv) == 0, argv[0]
        o = nib.load(str(tmp_path / out))
        assert o.shape == src.shape, argv[0]
        np.testing.assert_allclose(o.affine, src.affine, atol=1e-4)
        assert o.header.get_zooms()[3] == pytest.approx(src.header.get_zooms()[3])
    d = np.asarray(nib.load(str(tmp_path / "d.nii.gz")).dataobj, dtype=np.float64)
    clean = np.asarray(src.dataobj, dtype=np.float64)
    n0, n1 = d[..., 0] - clean[..., 0], d[..., 1] - clean[..., 1]
    assert not np.allclose(n0, n1)  # each volume its own noise
    assert main(["baseline", "--task", "denoise", "--method", "gaussian", "-i", str(EX4D), "-o",
                 str(tmp_path / "b1.nii.gz"), "--volume", "1", "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "b1.nii.gz")).dataobj),
                                  np.asarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj)[..., 1])


def test_4d_total_size_is_checked_before_reading_every_volume(ge, tmp_path, monkeypatch, capsys):
    """Each volume fits the voxel limit, the 4D case does not: one line naming --volume, nothing written."""
    monkeypatch.setenv("MEDLDM_MAX_VOXELS", str(64 * 64 * 15))
    assert main(["convert", str(ge), str(tmp_path / "o.nii.gz")]) == 1
    assert "process one volume at a time with --volume K" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
    assert main(["convert", str(ge), str(tmp_path / "o1.nii.gz"), "--volume", "1", "--quiet"]) == 0


def test_plan_and_training_data_take_4d_scans(tmp_path, ge):
    """Issue 20.9: the fingerprint reads a 4D scan (volume 0, with its number of volumes) instead of skipping it;
    training data has one item per volume, and the volumes of one scan stay on one side of the split."""
    import shutil

    from medldm.data.datasets import collect_scans, split_scans
    from medldm.plan.fingerprint import fingerprint

    data = tmp_path / "data"
    (data / "sub-01").mkdir(parents=True)
    shutil.copy(EX4D, data / "sub-01" / "func.nii.gz")
    shutil.copytree(ge, data / "sub-02" / "epi")
    fp = fingerprint([data], cache=None)
    assert not fp["skipped"], fp["skipped"]
    vols = sorted(s["volumes"] for s in fp["scans"])
    assert vols == [2, 2]
    refs = collect_scans([str(data)])
    assert sorted(r.id.rsplit("/", 1)[-1] for r in refs) == ["epi#vol0", "epi#vol1", "func#vol0", "func#vol1"]
    assert sorted(r.volume for r in refs) == [0, 0, 1, 1]
    for seed in range(5):
        train, val = split_scans(refs, 0.5, seed)
        assert len(train) == len(val) == 2
        assert len({r.path for r in train}) == 1 and len({r.path for r in val}) == 1  # a scan's volumes together
    from medldm.data.datasets import LoadNormalize

    item = LoadNormalize("MR")(refs[1].as_dict())
    assert tuple(item["image"].shape[:3]) in ((64, 64, 15), (128, 96, 24))


def test_evaluate_4d_volume_by_volume(tmp_path):
    """evaluate on a 4D reference and prediction: each volume is a case (id#volK)."""
    import shutil

    (tmp_path / "ref").mkdir()
    shutil.copy(EX4D, tmp_path / "ref" / "f.nii.gz")
    assert main(["degrade", str(tmp_path / "ref" / "f.nii.gz"), str(tmp_path / "pred" / "f.nii.gz"), "--kind",
                 "gaussian", "--level", "0.05"]) == 0
    assert main(["evaluate", "--ref", str(tmp_path / "ref"), "--pred", str(tmp_path / "pred"), "--data-range", "1200",
                 "-o", str(tmp_path / "rep"), "--quiet"]) == 0
    rows = (tmp_path / "rep" / "metrics.csv").read_text().splitlines()
    assert any("f#vol0" in r for r in rows) and any("f#vol1" in r for r in rows)
