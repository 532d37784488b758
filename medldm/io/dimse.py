"""DIMSE for PACS without DICOMweb: a C-STORE SCP that spools, a series-completion watcher, a C-STORE SCU.

:class:`Listener` (``medldm listen``):

* every received instance is written to disk before the C-STORE is answered: into
  ``<spool>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, first as a hidden temporary file in that folder, then
  renamed (atomic; fsynced) — an instance the sender was told is stored is on disk, so Ctrl-C loses nothing;
* a series is complete when no new instance of it arrived for ``idle`` seconds; it is then processed once by
  ``process(series_folder) -> [derived series folders]`` (one at a time, in a worker thread) and the derived
  series are sent with C-STORE to ``forward`` (``AET@HOST:PORT``);
* a series is marked done (``<series folder>/.medldm-done``) only after processing and forwarding succeeded; a
  failed series gets one line (logged, and kept in ``.medldm-failed``) and the listener keeps going;
* on start, every spooled series without a done marker is processed (received before a stop, or failed); an
  instance that arrives for a done series removes its marker (the series is processed again, with the same
  deterministic derived UIDs, so the PACS replaces the earlier result rather than adding a duplicate).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medldm.io.caseloop import failure_line
from medldm.io.dicom import drop_command_set
from medldm.io.errors import CaseError, UsageError

log = logging.getLogger(__name__)

DONE = ".medldm-done"
FAILED = ".medldm-failed"
_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass
class Peer:
    """A DICOM node: ``AET@HOST:PORT``."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``AET@HOST:PORT`` -> :class:`Peer` (UsageError otherwise)."""
    m = re.match(r"^([^@]{1,16})@(.+):(\d{1,5})$", text.strip())
    if not m or not 0 < int(m.group(3)) < 65536:
        raise UsageError(f"--forward {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242")
    return Peer(m.group(1).strip(), m.group(2).strip("[]"), int(m.group(3)))


def _safe_uid(uid: object, what: str) -> str:
    s = str(uid or "").strip()
    if not _UID.match(s):
        raise ValueError(f"invalid {what} {s!r}")
    return s


def send_series(files, peer: Peer, *, calling_aet: str = "MEDLDM", retries: int = 2, backoff: float = 1.0,
                where: object = None) -> int:
    """C-STORE every file of ``files`` to ``peer``; returns the number sent. Association failures are retried
    (``retries`` times, exponential backoff); then, or on a refused instance, one :class:`CaseError` line."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # noqa: F401  (registers the SOP classes)

    files = [Path(f) for f in files]
    if not files:
        return 0
    datasets = [drop_command_set(pydicom.dcmread(f)) for f in files]
    where = where or files[0].parent
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cls, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(cls, [ts] if ts == "1.2.840.10008.1.2" else [ts, "1.2.840.10008.1.2"])
    delay, err = backoff, ""
    for attempt in range(retries + 1):
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet)
        if assoc.is_established:
            try:
                for ds, f in zip(datasets, files, strict=True):
                    status = assoc.send_c_store(ds)
                    code = getattr(status, "Status", None)
                    if code is None:
                        raise CaseError(where, f"C-STORE of {f.name} to {peer}: no answer (connection lost)",
                                        "check the forward node, then send the series again (restart the listener)")
                    if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                        raise CaseError(where, f"C-STORE of {f.name} to {peer} refused (status 0x{code:04X})",
                                        "check the forward node's log and its accepted SOP classes")
            finally:
                assoc.release()
            return len(files)
        err = "association rejected" if assoc.is_rejected else "no connection"
        if assoc.is_rejected:
            break  # a rejection (wrong AE title, unknown caller) does not go away by retrying
        if attempt < retries:
            time.sleep(delay)
            delay *= 2
    raise CaseError(where, f"cannot send the derived series to {peer}: {err}",
                    "check --forward (AE title, host, port) and that the node accepts this AE title as a caller")


class Listener:
    """C-STORE SCP with a spool, a completion watcher and a processing worker (see the module docstring)."""

    def __init__(self, spool: str | os.PathLike, process: Callable[[Path], list], *, aet: str = "MEDLDM",
                 host: str = "0.0.0.0", port: int = 11112, idle: float = 10.0, forward: Peer | None = None,
                 send: Callable | None = None):
        self.spool = Path(spool)
        self.process = process
        self.aet, self.host, self.port = aet, host, int(port)
        self.idle = float(idle)
        self.forward = forward
        if send is None and forward is not None:
            send = lambda files, where: send_series(files, forward, calling_aet=aet, where=where)  # noqa: E731
        self.send = send
        self._last: dict[Path, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._worker: threading.Thread | None = None
        self.results: list[tuple[Path, str, str]] = []  # (series folder, "done" | "failed", line)

    # ------------------------------------------------------------------ receiving
    def _handle_store(self, event) -> int:
        try:
            ds = event.dataset
            study = _safe_uid(ds.StudyInstanceUID, "StudyInstanceUID")
            series = _safe_uid(ds.SeriesInstanceUID, "SeriesInstanceUID")
            sop = _safe_uid(ds.SOPInstanceUID, "SOPInstanceUID")
            folder = self.spool / study / series
            folder.mkdir(parents=True, exist_ok=True)
            data = event.encoded_dataset(include_meta=True)
            tmp = folder / f".medldm-tmp.{sop}.{os.getpid()}.{threading.get_ident()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"{sop}.dcm")
            with self._lock:
                (folder / DONE).unlink(missing_ok=True)  # new content: process the series again
                self._last[folder] = time.monotonic()
            return 0x0000
        except ValueError as e:
            log.warning("refused an instance from %s: %s", getattr(event.assoc.requestor, "ae_title", "?"), e)
            return 0xC000  # cannot understand
        except OSError as e:
            log.error("cannot spool a received instance in %s: %s — free space or fix permissions", self.spool, e)
            return 0xA700  # out of resources

    def pending(self) -> list[Path]:
        """Spooled series folders without a done marker."""
        if not self.spool.is_dir():
            return []
        return sorted(p for p in self.spool.glob("*/*") if p.is_dir() and not (p / DONE).exists()
                      and any(f.suffix == ".dcm" for f in p.iterdir()))

    # ------------------------------------------------------------------ processing
    def _due(self) -> list[Path]:
        now = time.monotonic()
        with self._lock:
            return [f for f, t in self._last.items() if now - t >= self.idle]

    def process_series(self, folder: Path) -> bool:
        """Process one spooled series and forward the result; one line on failure. True when done."""
        with self._lock:
            self._last.pop(folder, None)
        try:
            outputs = self.process(folder) or []
            n = 0
            for out in outputs:
                files = sorted(Path(out).glob("*.dcm")) if Path(out).is_dir() else [Path(out)]
                if self.send is not None:
                    n += self.send(files, folder) or 0
            (folder / DONE).write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {len(outputs)} series, "
                                       f"{n} instances sent\n")
            (folder / FAILED).unlink(missing_ok=True)
            self.results.append((folder, "done", ""))
            log.info("done %s: %d derived series, %d instances sent to %s", folder, len(outputs), n,
                     self.forward or "-")
            return True
        except CaseError as e:
            line = e.line()
        except Exception as e:  # keep listening: one bad series must not stop the node
            line = failure_line(str(folder), e)[0]
        log.warning("FAILED %s", line)
        self.results.append((folder, "failed", line))
        try:
            (folder / FAILED).write_text(line + "\n")
        except OSError:
            pass
        return False

    def _run_worker(self) -> None:
        for folder in self.pending():  # left from an earlier run: received before a stop, or failed
            if self._stop.is_set():
                return
            with self._lock:
                if folder in self._last:
                    continue  # still receiving it
            self.process_series(folder)
        while not self._stop.wait(min(0.2, max(self.idle / 4, 0.05))):
            for folder in self._due():
                if self._stop.is_set():
                    return
                self.process_series(folder)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.spool.mkdir(parents=True, exist_ok=True)
        for tmp in self.spool.glob("*/*/.medldm-tmp.*"):  # half-written files of a killed run (never acknowledged)
            tmp.unlink(missing_ok=True)
        ae = AE(ae_title=self.aet)
        ae.maximum_associations = 8
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._handle_store)])
        except OSError as e:
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e} — choose another --port "
                             "(ports below 1024 need root)") from None
        self._worker = threading.Thread(target=self._run_worker, name="medldm-listen-worker", daemon=True)
        self._worker.start()
        log.info("listening as %s on %s:%d, spool %s, series complete after %g s idle, forward to %s",
                 self.aet, self.host, self.port, self.spool, self.idle, self.forward or "-")

    def stop(self, wait: bool = True) -> None:
        """Stop receiving; the series being processed is finished (when ``wait``), the others stay spooled."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if wait and self._worker is not None:
            self._worker.join()

    def serve_forever(self) -> None:
        self.start()
        try:
            while True:
                time.sleep(1)
        finally:
            self.stop(wait=False)


#: transfer syntaxes the SCP accepts: uncompressed, deflate and the common compressed ones (stored as received)
ALL_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]
