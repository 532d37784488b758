"""Output safety on real scans (issue 10, items 1, 2, 3, 7, 11, 12, 15, 16): nothing medldm did not write is
deleted or replaced, outputs respect the umask, resume keys on inputs and options, write errors are one line
naming the input, kill -9 leftovers are cleaned. See docs/guarantees.md."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medldm.cli import main
from medldm.io import atomic, dicom_write
from medldm.io.atomic import atomic_dir, atomic_file, clean_stale
from medldm.io.reader import load_scan
from medldm.io.writer import save_scan


def _digest(root: Path) -> dict[str, str]:
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def scan(tmp_path, dipy_files) -> Path:
    """A real MR NIfTI (dipy aniso_vox, 58x58x24 int16) in its own folder."""
    p = tmp_path / "p" / "aniso_vox.nii.gz"
    p.parent.mkdir()
    shutil.copy(dipy_files / "aniso_vox.nii.gz", p)
    return p


@pytest.fixture()
def series(tmp_path, dicomdir_tests) -> Path:
    """A real 5-slice CT series folder (pydicom's dicomdirtests 98892001/CT5N)."""
    p = tmp_path / "s" / "CT5N"
    shutil.copytree(dicomdir_tests / "98892001" / "CT5N", p)
    return p


@pytest.fixture()
def cases(tmp_path, pydicom_files, dipy_files) -> Path:
    """IN/ct/CT_small.dcm (a one-slice CT series) and IN/S0_10slices.nii.gz (real MR)."""
    src = tmp_path / "in"
    (src / "ct").mkdir(parents=True)
    shutil.copy(pydicom_files / "CT_small.dcm", src / "ct" / "CT_small.dcm")
    shutil.copy(dipy_files / "S0_10slices.nii.gz", src / "S0_10slices.nii.gz")
    return src


def _user_folder(path: Path) -> dict[str, str]:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("x\n")
    return _digest(path)


# ------------------------------------------------------------------------- 1. OUT wiped
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_single_scan_never_replaces_an_existing_folder_of_user_files(tmp_path, scan, capsys, overwrite):
    keep = tmp_path / "out" / "keep"
    before = _user_folder(keep)
    assert main(["convert", str(scan), str(keep), "--quiet", *overwrite]) == 2
    assert "never replaced" in capsys.readouterr().err
    assert main(["degrade", str(scan), str(keep), "--kind", "gaussian", "--level", "0.05", "--seed", "1", "--quiet",
                 *overwrite]) == 2
    assert main(["baseline", "--task", "denoise", "--method", "gaussian", "-i", str(scan), "-o", str(keep),
                 "--quiet", *overwrite]) == 2
    err = capsys.readouterr().err
    assert err.count("never replaced") == 2 and "Traceback" not in err
    assert _digest(keep) == before and sorted(os.listdir(keep.parent)) == ["keep"]


def test_out_that_is_a_regular_file_stays_a_file(tmp_path, scan, cases, capsys):
    f = tmp_path / "result"
    f.write_text("my notes\n")
    assert main(["convert", str(scan), str(f), "--quiet"]) == 2
    assert main(["degrade", str(cases), str(f), "--kind", "gaussian", "--level", "0.05", "--seed", "1",
                 "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert f.is_file() and f.read_text() == "my notes\n"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_folder_mode_case_target_of_user_files_is_never_replaced(tmp_path, cases, capsys, overwrite):
    out = tmp_path / "out"
    before = _user_folder(out / "ct")  # where the CT series' degraded copy would go
    assert main(["degrade", str(cases), str(out), "--kind", "gaussian", "--level", "0.05", "--seed", "1",
                 "--quiet", *overwrite]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED {cases / 'ct' / 'CT_small.dcm'}: ")
    assert ("did not write" in failed[0] or "has no medldm record" in failed[0]) and "Traceback" not in failed[0]
    assert _digest(out / "ct") == before
    assert load_scan(out / "S0_10slices.nii.gz").shape[:3] == (128, 128, 10)  # the other case is done
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_empty_existing_folder_is_filled(tmp_path, scan):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["convert", str(scan), str(out), "--quiet"]) == 0
    assert load_scan(out).shape == (58, 58, 24)


# ------------------------------------------------------------------------- 2. the input deleted
def test_out_containing_the_input_is_a_usage_error(tmp_path, scan, series, pydicom_files, capsys):
    before = _digest(tmp_path)
    p = scan.parent
    assert main(["convert", str(scan), str(p), "--quiet"]) == 2  # OUT is the folder holding IN
    assert main(["degrade", str(scan), str(p), "--kind", "gaussian", "--level", "0.05", "--quiet"]) == 2
    assert main(["convert", str(series), str(series.parent), "--quiet"]) == 2  # series folder inside OUT
    assert main(["convert", str(series), str(tmp_path), "--quiet"]) == 2
    assert main(["baseline", "--task", "denoise", "--method", "gaussian", "-i", str(scan), "-o", str(p),
                 "--quiet"]) == 2
    dcm = series / sorted(os.listdir(series))[0]
    assert main(["convert", str(dcm), str(series / "derived.nii.gz"), "--quiet"]) == 2  # inside the series folder
    assert main(["convert", str(scan), str(scan), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 7 and "Traceback" not in err and "contains IN" in err
    assert _digest(tmp_path) == before  # every input still there with the same bytes
    # writing beside the input (a sibling file or folder) is fine
    assert main(["convert", str(scan), str(p / "aniso.dcm.d"), "--quiet"]) == 0
    assert main(["convert", str(scan), str(p / "copy.nii.gz"), "--quiet"]) == 0
    assert _digest(scan) == {scan.name: before[str(scan.relative_to(tmp_path))]}


def test_out_dot(tmp_path, scan, cases, monkeypatch, capsys):
    work = tmp_path / "work"
    before = _user_folder(work)
    monkeypatch.chdir(work)
    assert main(["convert", str(scan), ".", "--quiet"]) == 2  # a folder of user files: never replaced
    assert "never replaced" in capsys.readouterr().err and _digest(work) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["convert", str(cases), ".", "--quiet"]) == 0  # many scans into the current folder
    assert load_scan(empty / "S0_10slices").shape[:3] == (128, 128, 10)
    assert (empty / "medldm-convert-report.json").is_file()
    monkeypatch.chdir(cases)
    assert main(["convert", str(cases), ".", "--quiet"]) == 2  # OUT . is IN


# ------------------------------------------------------------------------- 3. permissions
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_respect_the_umask(tmp_path, scan, series, cases, mask):
    old = os.umask(mask)
    try:
        assert main(["convert", str(scan), str(tmp_path / "dcm"), "--quiet"]) == 0
        assert main(["convert", str(series), str(tmp_path / "ct.nii.gz"), "--quiet"]) == 0
        assert main(["degrade", str(cases), str(tmp_path / "deg"), "--kind", "gaussian", "--level", "0.05",
                     "--seed", "1", "--quiet"]) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "ct.nii.gz", tmp_path / "ct.nii.gz.medldm.json", tmp_path / "dcm.medldm.json",
             *(tmp_path / "dcm").iterdir(), *(p for p in (tmp_path / "deg").rglob("*") if p.is_file())]
    folders = [tmp_path / "dcm", tmp_path / "deg", tmp_path / "deg" / "ct"]
    assert len(files) > 30
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    for d in folders:
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask, d


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "config.yaml").write_text("a: 1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


# ------------------------------------------------------------------------- 7. stale resume
def test_resume_keys_on_inputs_and_options(tmp_path, cases, capsys):
    out = tmp_path / "out"
    argv = ["convert", str(cases), str(out), "--quiet"]
    assert main(argv) == 0
    rec = json.loads((out / "S0_10slices.medldm.json").read_text())
    assert rec["command"] == "convert" and rec["inputs"][0]["path"] == str((cases / "S0_10slices.nii.gz").resolve())
    assert rec["inputs"][0]["size"] == (cases / "S0_10slices.nii.gz").stat().st_size
    digest = _digest(out / "S0_10slices")
    assert main(argv) == 0  # same inputs, same options: skipped, untouched
    assert _digest(out / "S0_10slices") == digest
    report = json.loads((out / "medldm-convert-report.json").read_text())
    assert {c["case"]: c["inputs"] for c in report["cases"]} == {
        "S0_10slices": [str(cases / "S0_10slices.nii.gz")], "ct": [str(cases / "ct" / "CT_small.dcm")]}
    # another option that changes the result: refused per case, outputs untouched
    capsys.readouterr()
    assert main([*argv, "--description", "other"]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED {cases / 'S0_10slices.nii.gz'}: ")
    assert "was made with other inputs/options (description" in failed[0]
    assert failed[0].endswith("use --overwrite, or another OUT") and _digest(out / "S0_10slices") == digest
    # a changed input: refused too
    os.utime(cases / "S0_10slices.nii.gz", ns=(1, 1))
    assert main(argv) == 1
    assert "the input files changed" in capsys.readouterr().err
    # --overwrite replaces only that output
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and load_scan(out / "S0_10slices").shape[:3] == (128, 128, 10)
    assert main(argv) == 0


def test_output_without_record_is_not_taken_as_done(tmp_path, scan, capsys):
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"someone else's file")
    assert main(["convert", str(scan), str(out), "--quiet"]) == 1
    assert "has no medldm record" in capsys.readouterr().err and out.read_bytes() == b"someone else's file"
    assert main(["convert", str(scan), str(out), "--quiet", "--overwrite"]) == 0
    assert load_scan(out).shape == (58, 58, 24)


def test_degrade_resume_keys_on_seed_and_input(tmp_path, cases, capsys):
    out = tmp_path / "out"
    argv = ["degrade", str(cases), str(out), "--kind", "gaussian", "--level", "0.05", "--seed", "3", "--quiet"]
    assert main(argv) == 0
    side = json.loads((out / "S0_10slices.degradation.json").read_text())
    assert side["resume"]["inputs"][0]["rel"] == "S0_10slices.nii.gz" and side["seed"] == 3
    assert main(argv) == 0 and json.loads((out / "medldm-degrade-report.json").read_text())["counts"]["skipped"] == 0
    assert main([*argv[:-2], "4", "--quiet"]) == 1
    assert "(seed 3 ≠ 4)" in capsys.readouterr().err


def test_baseline_and_enhance_resume_keys(tmp_path, scan, capsys):
    out = tmp_path / "b.nii.gz"
    base = ["baseline", "--task", "denoise", "--method", "gaussian", "-i", str(scan), "-o", str(out), "--quiet"]
    assert main(base) == 0
    first = _digest(out)
    assert main(base) == 0 and _digest(out) == first
    assert main([*base, "--filter-sigma", "2"]) == 1
    assert "filter_sigma 1.0 ≠ 2.0" in capsys.readouterr().err and _digest(out) == first
    assert main([*base, "--filter-sigma", "2", "--overwrite"]) == 0 and _digest(out) != first
    # the single-scan run report lies beside OUT, named after it, and records the input
    rep = json.loads((tmp_path / "b.nii.gz.medldm-baseline-report.json").read_text())
    assert rep["cases"][0]["inputs"] == [str(scan)]
    assert not (tmp_path / "medldm-baseline-report.json").exists()


def test_enhance_resume_keys_on_model_options(tmp_path, dipy_files, capsys, one_torch_thread):
    im = nib.load(dipy_files / "S0_10slices.nii.gz")
    src = tmp_path / "in" / "mr.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(im.dataobj)[40:72, 40:72, 4:5, 0].astype(np.int16), im.affine), src)
    out = tmp_path / "out" / "mr.nii.gz"
    argv = ["enhance", "-m", "mr-denoise-2d", "-i", str(src), "-o", str(out), "--steps", "2", "--device", "cpu",
            "--no-refine", "--quiet"]
    assert main(argv) == 0
    rec = json.loads((tmp_path / "out" / "mr.nii.gz.medldm.json").read_text())
    assert len(rec["options"]["model_hash"]) == 64 and rec["options"]["seed"] == 0
    assert (tmp_path / "out" / "mr.nii.gz.medldm-enhance-report.json").is_file()
    assert not (tmp_path / "medldm-enhance-report.json").exists()
    first = _digest(out)
    assert main([*argv, "--seed", "1"]) == 1
    assert "(seed 0 ≠ 1)" in capsys.readouterr().err and _digest(out) == first
    assert main(argv) == 0 and _digest(out) == first


# ------------------------------------------------------------------------- 11/12. write errors, read-only OUT
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_one_line_naming_the_input(tmp_path, cases, scan, monkeypatch, capsys):
    real = dicom_write._write

    def full(ds, path):
        real(ds, path)  # pydicom's real writer, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dicom_write, "_write", full)
    monkeypatch.setattr(nib, "save", _enospc)
    out = tmp_path / "out"
    assert main(["convert", str(cases), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and "Traceback" not in err
    assert any(line.startswith(f"FAILED {cases / 'S0_10slices.nii.gz'}: cannot write") for line in failed)
    assert any(line.startswith(f"FAILED {cases / 'ct' / 'CT_small.dcm'}: cannot write") for line in failed)
    assert all("no space left on the output disk — free space there" in line for line in failed)
    report = json.loads((out / "medldm-convert-report.json").read_text())
    assert all("Traceback" in c["extra"]["traceback"] for c in report["cases"])
    assert sorted(os.listdir(out)) == ["medldm-convert-report.json"]  # no partial output, no temporary
    assert main(["convert", str(scan), str(tmp_path / "one"), "--quiet"]) == 1
    assert "no space left" in capsys.readouterr().err and not (tmp_path / "one").exists()


def _deny(monkeypatch, folder: Path) -> None:
    """Make ``folder`` unwritable: chmod 0o555, or (root ignores modes) an EACCES answer from os.access."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access

        def access(path, mode, *a, **k):
            if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
                return False
            return real(path, mode, *a, **k)

        monkeypatch.setattr(os, "access", access)


def test_read_only_out_is_a_usage_error(tmp_path, cases, scan, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny(monkeypatch, ro)
    try:
        assert main(["convert", str(cases), str(ro), "--quiet"]) == 2
        assert main(["convert", str(scan), str(ro / "x.nii.gz"), "--quiet"]) == 2
        assert main(["degrade", str(cases), str(ro / "sub"), "--kind", "gaussian", "--level", "0.1"]) == 2
        err = capsys.readouterr().err
        assert err.count("no permission to write in") == 3 and "Traceback" not in err
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_permission_denied_while_writing_is_one_line(tmp_path, cases, monkeypatch, capsys):
    real = atomic.atomic_file

    def denied(dest, *a, **k):
        if str(dest).endswith("medldm-convert-report.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dest))
        return real(dest, *a, **k)

    monkeypatch.setattr("medldm.io.caseloop.atomic_file", denied)
    monkeypatch.setattr(nib, "save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system", "x")))
    assert main(["convert", str(cases), str(tmp_path / "out"), "--to", "nifti", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "the output is on a read-only file system — choose a writable OUT" in err
    assert "cannot write the run report" in err


# ------------------------------------------------------------------------- 12. the --overwrite race
def test_concurrent_overwrites_of_one_series(tmp_path, series):
    img = load_scan(series)
    dest = tmp_path / "out"
    save_scan(img, dest)
    errors: list[BaseException] = []

    def writer():
        for _ in range(4):
            try:
                save_scan(img, dest, replace=True)
            except FileExistsError:
                pass  # the only acceptable refusal
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert np.array_equal(load_scan(dest).numpy(), img.numpy())
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary or old folder left


def test_overwrite_while_another_run_replaced_the_output(tmp_path, series, monkeypatch):
    out = tmp_path / "d"
    assert main(["convert", str(series), str(out), "--quiet"]) == 0
    real, calls = dicom_write._write, []

    def racing(ds, path):
        if not calls:  # another --overwrite run moves the old series away and puts its own in place
            calls.append(path)
            shutil.move(out, tmp_path / "elsewhere")
            shutil.copytree(tmp_path / "elsewhere", out)
        real(ds, path)

    monkeypatch.setattr(dicom_write, "_write", racing)
    assert main(["convert", str(series), str(out), "--quiet", "--overwrite"]) == 0
    assert np.array_equal(load_scan(out).numpy(), load_scan(series).numpy())
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


# ------------------------------------------------------------------------- 16. leftovers of kill -9
_SLOW_WRITE = """
import sys, time
import medldm.io.dicom_write as d
real = d._write
def slow(ds, path):
    real(ds, path)
    time.sleep(30)
d._write = slow
from medldm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_dicom_write_leaves_nothing_after_the_rerun(tmp_path, scan):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, "convert", str(scan), str(out / "series"),
                             "--quiet"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            tmps = [p for p in out.iterdir() if p.name.startswith(".medldm-tmp.")]
            if tmps and any(tmps[0].iterdir()):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the DICOM write did not start")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert tmps[0].is_dir() and f".{proc.pid}." in tmps[0].name  # the hidden leftover of kill -9
    live = out / f".medldm-tmp.{os.getpid()}.{atomic._HOST}.x.abc"  # a live process's temporary
    live.mkdir()
    other = out / ".series.keepme"  # a hidden folder medldm did not make
    other.mkdir()
    assert main(["convert", str(scan), str(out / "series"), "--quiet"]) == 0
    assert not tmps[0].exists() and live.is_dir() and other.is_dir()
    assert load_scan(out / "series").shape == (58, 58, 24)
    assert clean_stale(out) == []  # nothing else is ever removed


def test_atomic_file_without_replace_keeps_the_existing_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("old")
    with pytest.raises(FileExistsError), atomic_file(f, replace=False) as tmp:
        tmp.write_text("new")
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    d = tmp_path / "folder"
    d.mkdir()
    with pytest.raises(FileExistsError), atomic_file(d) as tmp:
        tmp.write_text("new")
    assert d.is_dir()
