"""PACS in and out against a real Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``): DICOMweb study in ->
derived series out into the same study, a QIDO query, a server stopped mid-run, a re-run without duplicates, the
C-STORE listener (pynetdicom as the sending modality, Orthanc as the forward target), and the provenance tags as
the server returns them. Without Orthanc the tests skip locally and fail in CI (``skip_or_fail``)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import skip_or_fail

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USER, PASSWORD = "medldm-test", "not-a-real-secret"
PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process on free localhost ports with a temporary storage folder and the DICOMweb plugin."""

    def __init__(self, folder: Path, listener_port: int = 11112):
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        plugin = next((p for p in PLUGINS if Path(p).exists()), None)
        if not Path(exe).exists() or plugin is None:
            skip_or_fail("Orthanc with the DICOMweb plugin not installed (apt-get install orthanc orthanc-dicomweb)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http, self.dicom = _free_port(), _free_port()
        cfg = {"Name": "medldm-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
               "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
               "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
               "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
               "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
               "DicomModalities": {"medldm": ["MEDLDM", "127.0.0.1", listener_port]}}
        (folder / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(folder / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.http}/dicom-web"
        t0 = time.monotonic()
        while True:
            try:
                self.rest("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None or time.monotonic() - t0 > 30:
                    self.stop()
                    pytest.fail(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.1)

    def rest(self, path: str, data: bytes | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data,
                                     method="POST" if data is not None else "GET")
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def upload(self, folder: Path) -> None:
        for f in sorted(p for p in folder.iterdir() if p.is_file()):
            self.rest("/instances", f.read_bytes())

    def series(self, study: str) -> dict[str, int]:
        """SeriesInstanceUID -> number of instances, of one study (Orthanc's REST API, not medldm's code)."""
        out = {}
        for oid in self.rest("/series"):
            s = self.rest(f"/series/{oid}")
            parent = self.rest(f"/studies/{s['ParentStudy']}")
            if parent["MainDicomTags"]["StudyInstanceUID"] == study:
                out[s["MainDicomTags"]["SeriesInstanceUID"]] = len(s["Instances"])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _uid(folder: Path, kw: str) -> str:
    return str(pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.is_file()),
                               stop_before_pixels=True).get(kw))


@pytest.fixture(scope="session")
def credentials():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLDM_DICOMWEB_USER", USER)
        mp.setenv("MEDLDM_DICOMWEB_PASSWORD", PASSWORD)
        mp.delenv("MEDLDM_DICOMWEB_TOKEN", raising=False)
        yield


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory, dicomdir_tests, credentials):
    """Orthanc holding 98892001/CT5N (CT, 5 slices) and 98892003/MR700 (MR, 7 slices)."""
    srv = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        srv.upload(dicomdir_tests / "98892001" / "CT5N")
        srv.upload(dicomdir_tests / "98892003" / "MR700")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def enhancer():
    from medldm.models import load_model
    from medldm.models.folder import model_hash
    from medldm.pipelines.enhance import EnhanceOptions, Enhancer
    from medldm.shipped import resolve_model

    folder = resolve_model("mr-denoise-2d")
    return Enhancer(load_model(folder), device="cpu"), EnhanceOptions(steps=2, device="cpu"), model_hash(folder)


def _enhance_and_store(url: str, base: str, enhancer, cache: Path, out: Path, **kw):
    """What ``medldm enhance -i URL -o URL`` does, through the library: retrieve, the case loop, STOW."""
    from medldm.cli.remote import provenance, resolve_remote_input, store_remote_output
    from medldm.io.caseloop import run_cases
    from medldm.io.discover import output_path
    from medldm.io.reader import load_case
    from medldm.io.writer import save_scan

    enh, opts, mhash = enhancer
    remote = resolve_remote_input(url, cache=cache, **kw)
    processed = []

    def process(case):
        processed.append(case.id)
        img = load_case(case)
        res = enh.enhance(img, opts)
        res.image.meta["provenance"] = provenance("mr-denoise-2d", mhash, enh.task, opts, res.info)
        t = output_path(case, out)
        save_scan(res.image, t, reference=img.meta["source_files"], description=f"{enh.task} (mr-denoise-2d)")
        return [t]

    status, results = run_cases(remote.found.cases, process, quiet=True)
    done = [Path(r.outputs[0]) for r in results if r.status == "done"]
    stored = store_remote_output(base, done, quiet=True) if done else (0, [])
    return status, results, processed, stored


@pytest.fixture(scope="module")
def stored_once(orthanc, enhancer, dicomdir_tests, tmp_path_factory):
    src = dicomdir_tests / "98892001" / "CT5N"
    study, series = _uid(src, "StudyInstanceUID"), _uid(src, "SeriesInstanceUID")
    tmp = tmp_path_factory.mktemp("run1")
    before = orthanc.series(study)
    res = _enhance_and_store(f"{orthanc.base}/studies/{study}", orthanc.base, enhancer, tmp / "cache", tmp / "out")
    return {"study": study, "series": series, "before": before, "result": res, "tmp": tmp}


def test_study_in_derived_series_out_into_the_same_study(orthanc, stored_once):
    status, results, processed, (sstatus, sresults) = stored_once["result"]
    assert status == 0 and sstatus == 0 and len(processed) == 1
    assert processed[0] == f"{stored_once['study']}/{stored_once['series']}"
    assert stored_once["before"] == {stored_once["series"]: 5}
    after = orthanc.series(stored_once["study"])
    assert len(after) == 2 and after[stored_once["series"]] == 5  # the source is untouched
    derived = next(u for u in after if u != stored_once["series"])
    assert after[derived] == 5
    assert sresults[0].extra["stored"] == 5 and not sresults[0].extra["skipped"]
    assert derived in sresults[0].outputs[0] and "@" not in sresults[0].outputs[0]


def test_provenance_tags_as_the_server_returns_them(orthanc, stored_once):
    from dicomweb_client.api import DICOMwebClient

    from medldm import __version__
    from medldm.io.dicomweb import session

    study, src_series = stored_once["study"], stored_once["series"]
    derived = next(u for u in orthanc.series(study) if u != src_series)
    client = DICOMwebClient(orthanc.base, session=session())
    ds = client.retrieve_series(study, derived)[0]
    assert ds.StudyInstanceUID == study and "DERIVED" in list(ds.ImageType)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src_series
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert "model mr-denoise-2d" in ds.DerivationDescription and "steps 2" in ds.DerivationDescription
    assert "task denoise" in ds.DerivationDescription
    item = [it for it in ds.ContributingEquipmentSequence if it.Manufacturer == "medldm"][0]
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert item.SoftwareVersions == __version__ and item.ManufacturerModelName.startswith("mr-denoise-2d sha256:")
    assert "research use only" in ds.SeriesDescription


def test_rerun_stores_no_duplicate(orthanc, stored_once, enhancer, tmp_path):
    """The same command again (new local folders, so nothing is resumed locally): the derived series has the same
    deterministic UID, the QIDO check finds it, nothing is stored twice."""
    study = stored_once["study"]
    before = orthanc.series(study)
    status, _, processed, (sstatus, sresults) = _enhance_and_store(
        f"{orthanc.base}/studies/{study}", orthanc.base, enhancer, tmp_path / "cache", tmp_path / "out")
    assert status == 0 and sstatus == 0 and len(processed) == 1
    assert sresults[0].extra["skipped"] and sresults[0].extra["stored"] == 0
    assert orthanc.series(study) == before and len(before) == 2


def test_qido_query_retrieves_the_matching_series_only(orthanc, dicomdir_tests, tmp_path):
    from medldm.cli.remote import resolve_remote_input

    remote = resolve_remote_input(orthanc.base, "Modality=MR&StudyDate=19000101-", cache=tmp_path)
    mr_series = _uid(dicomdir_tests / "98892003" / "MR700", "SeriesInstanceUID")
    folders = {p.parent for c in remote.found.cases for p in c.paths}
    assert [f.name for f in folders] == [mr_series]
    assert len(list(next(iter(folders)).glob("*.dcm"))) == 7
    assert all(c.error is None and c.id.startswith(_uid(dicomdir_tests / "98892003" / "MR700", "StudyInstanceUID"))
               for c in remote.found.cases)
    assert not list(tmp_path.rglob(".medldm-tmp*"))
    # the same query again reuses the complete cached series
    again = resolve_remote_input(orthanc.base, "Modality=MR&StudyDate=19000101-", cache=tmp_path)
    assert {p.parent for c in again.found.cases for p in c.paths} == folders


def test_server_stopped_mid_run(tmp_path, dicomdir_tests, enhancer, credentials):
    """The server stops between the QIDO search and the WADO retrieval: bounded retries, then one line for the
    series, status 1, nothing processed and no partial folder in the cache; a search against the stopped server
    is one line too."""
    from medldm.cli.remote import resolve_remote_input
    from medldm.io.caseloop import run_cases
    from medldm.io.dicomweb import DicomWeb
    from medldm.io.errors import CaseError

    srv = Orthanc(tmp_path / "srv")
    try:
        src = dicomdir_tests / "98892001" / "CT5N"
        srv.upload(src)
        study = _uid(src, "StudyInstanceUID")
        client = DicomWeb(srv.base, retries=2, backoff=0.05)
        remote = resolve_remote_input(f"{srv.base}/studies/{study}", cache=tmp_path / "cache", client=client,
                                      after_search=lambda found: srv.stop())
    finally:
        srv.stop()
    called = []
    status, results = run_cases(remote.found.cases, called.append, quiet=True)
    assert status == 1 and not called and len(results) == 1
    line = results[0].message
    assert "\n" not in line and "failed (no connection) after 3 attempts" in line and srv.base in line
    assert "check that the server is running" in line
    assert not list((tmp_path / "cache").rglob("*.dcm"))
    with pytest.raises(CaseError) as e:
        resolve_remote_input(f"{srv.base}/studies/{study}", cache=tmp_path / "cache", client=client)
    assert "QIDO search" in str(e.value) and "\n" not in str(e.value)


def test_incomplete_retrieval_is_never_processed(orthanc, dicomdir_tests, tmp_path):
    """A series whose retrieval yields fewer instances than QIDO lists is a failure and leaves no folder."""
    from medldm.io.dicomweb import DicomWeb
    from medldm.io.errors import CaseError

    dw = DicomWeb(orthanc.base, retries=0)
    src = dicomdir_tests / "98892001" / "CT5N"
    info = dw.search_series(_uid(src, "StudyInstanceUID"))[0]
    info.instances += 1  # the server lists one more than it sends (still arriving, or lost in transit)
    with pytest.raises(CaseError) as e:
        dw.retrieve_series(info, tmp_path)
    assert "retrieved 5 of the 6 instances" in str(e.value)
    assert not list(tmp_path.rglob("*.dcm")) and not (tmp_path / info.study / info.series).exists()


def test_credentials_are_refused_on_the_url_and_a_wrong_password_is_one_line(orthanc, monkeypatch, tmp_path):
    from medldm.io.dicomweb import DicomWeb, parse_url, redact
    from medldm.io.errors import CaseError, UsageError

    with pytest.raises(UsageError) as e:
        parse_url(f"http://{USER}:{PASSWORD}@127.0.0.1:{orthanc.http}/dicom-web/studies/1.2.3")
    assert PASSWORD not in str(e.value) and "MEDLDM_DICOMWEB_USER" in str(e.value)
    assert redact("https://u:p@h:1/dicom-web?token=x") == "https://h:1/dicom-web"
    monkeypatch.setenv("MEDLDM_DICOMWEB_PASSWORD", "wrong")
    with pytest.raises(CaseError) as e:
        DicomWeb(orthanc.base, retries=0).search_series()
    assert "refused access (HTTP 401)" in str(e.value) and "wrong" not in str(e.value)


def test_cstore_listener_spools_processes_forwards_and_resumes(orthanc, enhancer, dicomdir_tests, tmp_path):
    """pynetdicom as the sending modality -> ``medldm listen`` (Listener) -> Orthanc (C-STORE forward). The first
    listener is stopped before the series is complete (Ctrl-C): everything received is on disk, and the next
    start processes it. A broken series fails with one line and the listener keeps going."""
    from pynetdicom import AE

    from medldm.cli.listen import make_processor
    from medldm.io.dimse import DONE, FAILED, Listener, Peer

    enh, opts, mhash = enhancer
    src = dicomdir_tests / "77654033" / "CT2"
    files = [f for f in sorted(src.iterdir())
             if float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) > 0]  # its 3-slice run
    broken = dicomdir_tests / "TINY_ALPHA" / "PT000000" / "ST000000" / "SE000000" / "IM000000"  # no pixel data
    study = _uid(src, "StudyInstanceUID")
    process = make_processor(enh, opts, tmp_path / "derived", "mr-denoise-2d", mhash)
    forward = Peer("ORTHANC", "127.0.0.1", orthanc.dicom)
    port = _free_port()

    def send(paths):
        ae = AE(ae_title="MODALITY")
        dss = [pydicom.dcmread(p) for p in paths]
        for d in dss:
            ae.add_requested_context(d.SOPClassUID, d.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDLDM")
        assert assoc.is_established
        statuses = [assoc.send_c_store(d).Status for d in dss]
        assoc.release()
        return statuses

    first = Listener(tmp_path / "spool", process, aet="MEDLDM", host="127.0.0.1", port=port, idle=60, forward=forward)
    first.start()
    try:
        assert send(files) == [0, 0, 0]
    finally:
        first.stop()  # Ctrl-C before the series was complete
    spooled = list((tmp_path / "spool").rglob("*.dcm"))
    assert len(spooled) == 3 and not list((tmp_path / "spool").rglob(DONE)) and not first.results

    second = Listener(tmp_path / "spool", process, aet="MEDLDM", host="127.0.0.1", port=port, idle=0.5,
                      forward=forward)
    second.start()
    try:
        assert send([broken]) == [0]
        t0 = time.monotonic()
        while len(second.results) < 2 and time.monotonic() - t0 < 60:
            time.sleep(0.1)
    finally:
        second.stop()
    status = {folder.name: (state, line) for folder, state, line in second.results}
    series = _uid(src, "SeriesInstanceUID")
    assert status[series][0] == "done"
    bad = _uid(broken.parent, "SeriesInstanceUID")
    assert status[bad][0] == "failed" and "\n" not in status[bad][1] and "pixel data" in status[bad][1]
    assert (tmp_path / "spool" / study / series / DONE).exists()
    assert (tmp_path / "spool" / _uid(broken.parent, "StudyInstanceUID") / bad / FAILED).exists()
    on_server = orthanc.series(study)
    assert len(on_server) == 1 and list(on_server.values()) == [3]  # the derived series, in the source's study
    derived = next(iter(on_server))
    assert derived != series


def test_listen_command_is_importable_and_parses(tmp_path):
    import argparse

    from medldm.cli import listen
    from medldm.io.dimse import parse_peer
    from medldm.io.errors import UsageError

    p = argparse.ArgumentParser()
    listen.add_arguments(p)
    a = p.parse_args(["-m", "mr-denoise-2d", "--forward", "PACS@127.0.0.1:4242", "--idle", "2", "-o", str(tmp_path)])
    assert a.aet == "MEDLDM" and a.port == 11112 and parse_peer(a.forward).port == 4242
    with pytest.raises(UsageError):
        parse_peer("nohost")
    assert os.environ.get("MEDLDM_DICOMWEB_TOKEN") is None


def test_cli_info_and_convert_read_and_store_through_dicomweb(orthanc, dicomdir_tests, tmp_path, monkeypatch,
                                                              capsys):
    """`medldm info URL --json` and `medldm convert STUDY_URL BASE_URL` on the command line: the derived series
    lands in the source's study, a re-run stores no duplicate, the server's source series is untouched."""
    from medldm.cli import main

    monkeypatch.setenv("MEDLDM_CACHE", str(tmp_path / "cache"))
    src = dicomdir_tests / "98892003" / "MR700"
    study, series = _uid(src, "StudyInstanceUID"), _uid(src, "SeriesInstanceUID")
    url = f"{orthanc.base}/studies/{study}"
    assert main(["info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info) == 7 and all(e["shape"][2] == 1 for e in info)  # 7 oblique slices, 7 orientations: 7 stacks
    before = orthanc.series(study)
    assert before.get(series) == 7
    assert main(["convert", url, orthanc.base, "--description", "cli test", "--quiet"]) == 0
    after = orthanc.series(study)
    new = set(after) - set(before)
    assert after[series] == 7 and len(new) == 7 and all(after[n] == 1 for n in new)  # one derived series per stack
    assert main(["convert", url, orthanc.base, "--description", "cli test", "--quiet"]) == 0  # re-run
    assert orthanc.series(study) == after
    assert main(["convert", str(src), str(tmp_path / "o"), "--query", "Modality=MR"]) == 2  # --query needs a URL


def test_cli_enhance_study_url_to_the_server(orthanc, dicomdir_tests, tmp_path, monkeypatch):
    """The issue's done-when: `medldm enhance -m mr-denoise-2d -i .../studies/UID -o .../dicom-web` puts derived
    series into the same study; a re-run stores nothing new."""
    from medldm.cli import main

    monkeypatch.setenv("MEDLDM_CACHE", str(tmp_path / "cache"))
    src = dicomdir_tests / "98892003" / "MR700"
    study, series = _uid(src, "StudyInstanceUID"), _uid(src, "SeriesInstanceUID")
    before = orthanc.series(study)
    argv = ["enhance", "-m", "mr-denoise-2d", "-i", f"{orthanc.base}/studies/{study}", "-o", orthanc.base,
            "--steps", "2", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    after = orthanc.series(study)
    new = set(after) - set(before)
    assert after[series] == 7 and len(new) == 7  # one derived series per stack of the source, same study
    assert main(argv) == 0
    assert orthanc.series(study) == after


def test_instances_with_group_0000_go_through_dicomweb(orthanc, tmp_path, monkeypatch):
    """Issue 20.2 (PACS): instances stored with Command Set elements (group 0000) — Orthanc keeps and returns them
    over WADO-RS — are retrieved, enhanced and stored back (before: ValueError 'Command Set elements (0000,eeee)
    are not allowed when using dcmwrite()' on the retrieval)."""
    from test_io_vendor import command_set_series

    from medldm.cli import main

    src = command_set_series(tmp_path)
    orthanc.upload(src)
    study, series = _uid(src, "StudyInstanceUID"), _uid(src, "SeriesInstanceUID")
    monkeypatch.setenv("MEDLDM_CACHE", str(tmp_path / "cache"))
    assert main(["enhance", "-m", "mr-denoise-2d", "-i", f"{orthanc.base}/studies/{study}/series/{series}",
                 "-o", orthanc.base, "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    after = orthanc.series(study)
    assert after[series] == 15 and len(after) == 2 and sorted(after.values()) == [15, 15]
