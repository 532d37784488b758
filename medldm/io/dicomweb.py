"""DICOMweb in and out: QIDO-RS search, WADO-RS retrieval into a local cache, STOW-RS of derived series.

URLs (``parse_url``):

* ``http(s)://HOST:PORT/dicom-web/studies/<StudyInstanceUID>``: every series of the study;
* ``http(s)://HOST:PORT/dicom-web/studies/<StudyUID>/series/<SeriesUID>``: one series;
* ``http(s)://HOST:PORT/dicom-web`` with a QIDO query string (``Modality=MR&StudyDate=20240101-``): the series
  that match (series-level QIDO-RS search).

Retrieval (:meth:`DicomWeb.retrieve_series`): each series is retrieved into ``<cache>/<StudyUID>/<SeriesUID>/``
(one ``<SOPInstanceUID>.dcm`` per instance, as the server stores it), first into a temporary folder beside it;
the folder appears (rename) only when the number of instances equals QIDO's NumberOfSeriesRelatedInstances, so a
partly retrieved series is never processed. A complete folder already in the cache is reused. A study URL or a
query leaves out the series medldm derived (SeriesDescription ``... [medldm ...] research use only``), so a re-run
does not enhance its own results; a series URL takes the series it names.

Storing (:meth:`DicomWeb.store_series`): a derived series folder is sent with STOW-RS, unless a QIDO search finds
its SeriesInstanceUID on the server already with at least as many instances (a re-run: medldm's derived UIDs are
deterministic for a source series + model + options, see ``medldm.io.dicom_write.derived_series_uid``).

Reliability: connection errors, timeouts, 429 and 5xx answers are retried (``retries`` times, exponential backoff
from ``backoff`` seconds), then a :class:`~medldm.io.errors.CaseError` with one line (server, what failed, what to
do). The server's data is only read (QIDO, WADO) or added to (STOW); nothing is ever deleted or modified.

Authentication, from the environment only (never the command line; URLs in messages and reports carry no
credentials, :func:`redact`): ``MEDLDM_DICOMWEB_TOKEN`` (``Authorization: Bearer``), or ``MEDLDM_DICOMWEB_USER`` +
``MEDLDM_DICOMWEB_PASSWORD`` (basic auth), else the ``~/.netrc`` entry of the host (requests reads it). A URL with
``user:password@`` is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from medldm.io.atomic import atomic_dir
from medldm.io.dicom import drop_command_set
from medldm.io.errors import CaseError, UsageError

log = logging.getLogger(__name__)

TOKEN_ENV = "MEDLDM_DICOMWEB_TOKEN"
USER_ENV = "MEDLDM_DICOMWEB_USER"
PASSWORD_ENV = "MEDLDM_DICOMWEB_PASSWORD"
#: DICOM tags asked for in QIDO series searches
_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", "Modality",
           "SeriesDescription", "SeriesNumber")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def is_dicomweb_url(arg: object) -> bool:
    """True for an ``http://`` or ``https://`` argument (a DICOMweb URL rather than a path)."""
    return isinstance(arg, str) and arg.lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """``url`` without credentials (``user:password@``) and without a query string (it may hold tokens)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class Target:
    """A parsed DICOMweb URL: the service root, and the study / series / QIDO filters it names."""

    base: str  # http(s)://host:port/.../dicom-web (no trailing slash, no credentials)
    study: str | None = None
    series: str | None = None
    filters: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        s = self.base
        if self.study:
            s += f"/studies/{self.study}"
        if self.series:
            s += f"/series/{self.series}"
        return s


def parse_url(url: str, query: str | None = None) -> Target:
    """Parse a DICOMweb URL (see the module docstring); ``query``: a QIDO query string (``Modality=MR&...``),
    also accepted as the URL's own ``?...``. Raises :class:`UsageError` for anything else."""
    if not is_dicomweb_url(url):
        raise UsageError(f"{url!r} is not an http(s):// DICOMweb URL")
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise UsageError(f"{redact(url)}: credentials in the URL are not accepted (they would end up in shell "
                         f"history, logs and reports) — set {TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}, "
                         "or put the host in ~/.netrc")
    if not parts.hostname:
        raise UsageError(f"{redact(url)}: no host in the URL")
    segs = [s for s in parts.path.split("/") if s]
    study = series = None
    if "studies" in segs:
        i = segs.index("studies")
        rest, segs = segs[i + 1:], segs[:i]
        if not rest:
            raise UsageError(f"{redact(url)}: 'studies' without a StudyInstanceUID")
        study = rest[0]
        if len(rest) >= 3 and rest[1] == "series":
            series = rest[2]
        elif len(rest) != 1:
            raise UsageError(f"{redact(url)}: expected .../studies/<StudyUID> or .../studies/<StudyUID>/series/"
                             "<SeriesUID>")
    for uid in (study, series):
        if uid is not None and not all(c.isdigit() or c == "." for c in uid):
            raise UsageError(f"{redact(url)}: {uid!r} is not a DICOM UID")
    filters = dict(parse_qsl(parts.query, keep_blank_values=False))
    if query:
        filters.update(parse_qsl(query.lstrip("?"), keep_blank_values=False, strict_parsing=False))
    base = urlunsplit((parts.scheme, parts.netloc, "/" + "/".join(segs), "", "")).rstrip("/")
    if not study and not filters:
        raise UsageError(f"{redact(url)}: name a study (.../studies/<UID>) or give a QIDO query "
                         "(e.g. --query 'Modality=MR&StudyDate=20240101-')")
    return Target(base, study, series, filters)


def session():
    """A requests session with the credentials of the environment (token, basic auth) or ~/.netrc."""
    import requests

    s = requests.Session()
    token = os.environ.get(TOKEN_ENV, "").strip()
    user = os.environ.get(USER_ENV, "")
    if token:
        s.auth = _Bearer(token)  # an auth object: requests then does not apply ~/.netrc on top
    elif user:
        s.auth = (user, os.environ.get(PASSWORD_ENV, ""))
    return s  # neither: requests applies the host's ~/.netrc entry (trust_env)


class _Bearer:
    def __init__(self, token: str):
        self._token = token

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:  # never the token
        return "Bearer(...)"


@dataclass
class SeriesInfo:
    study: str
    series: str
    instances: int | None  # NumberOfSeriesRelatedInstances (None when the server does not say)
    modality: str = ""
    description: str = ""


def _value(item: dict, tag: str):
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


class DicomWeb:
    """One DICOMweb service (``base`` = ``http(s)://host:port/.../dicom-web``), with bounded retries."""

    def __init__(self, base: str, *, retries: int = 3, backoff: float = 1.0, timeout: float = 60.0):
        from dicomweb_client.api import DICOMwebClient

        self.base = base.rstrip("/")
        self.retries, self.backoff = int(retries), float(backoff)
        self.client = DICOMwebClient(self.base, session=session(), timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # our own retries: connection errors too, one line at the end

    def __str__(self) -> str:
        return redact(self.base)

    # ------------------------------------------------------------------ plumbing
    def _call(self, what: str, fn: Callable, *, where: object = None):
        """``fn()`` with retries on connection errors, timeouts, 408/429/5xx; then one CaseError line."""
        import requests

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except requests.HTTPError as e:
                code = e.response.status_code if e.response is not None else None
                if code in (401, 403):
                    raise CaseError(where or self, f"{what}: the server {self} refused access (HTTP {code})",
                                    f"set {TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}, or a ~/.netrc entry "
                                    "for the host, with an account allowed to do this") from None
                if code not in _RETRY_STATUS:
                    raise CaseError(where or self, f"{what}: the server {self} answered HTTP {code}",
                                    "check the URL and the UIDs (the server log says more)") from None
                err = f"HTTP {code}"
            except (requests.ConnectionError, requests.Timeout) as e:
                err = "no connection" if isinstance(e, requests.ConnectionError) else "timed out"
            if attempt < self.retries:
                log.debug("%s: %s (%s), retrying in %.1f s", self, what, err, delay)
                time.sleep(delay)
                delay *= 2
        raise CaseError(where or self, f"{what}: the DICOMweb server {self} failed ({err}) after "
                                       f"{self.retries + 1} attempts",
                        "check that the server is running and reachable, then run the same command again "
                        "(done series are not redone)")

    # ------------------------------------------------------------------ QIDO
    def search_series(self, study: str | None = None, series: str | None = None,
                      filters: dict | None = None) -> list[SeriesInfo]:
        """Series-level QIDO-RS search (all pages)."""
        f = dict(filters or {})
        if series:
            f["SeriesInstanceUID"] = series
        what = "QIDO search for series" + (f" of study {study}" if study else "")
        items = self._call(what, lambda: self.client.search_for_series(
            study_instance_uid=study, fields=list(_FIELDS), search_filters=f or None, get_remaining=True))
        out = []
        for it in items or []:
            n = _value(it, "00201209")
            out.append(SeriesInfo(study=str(_value(it, "0020000D") or study or ""),
                                  series=str(_value(it, "0020000E") or ""),
                                  instances=int(n) if n not in (None, "") else None,
                                  modality=str(_value(it, "00080060") or ""),
                                  description=str(_value(it, "0008103E") or "")))
        return [s for s in out if s.series and (not series or s.series == series)]

    def find(self, target: Target) -> list[SeriesInfo]:
        """The series a parsed URL names (CaseError when there are none)."""
        found = self.search_series(target.study, target.series, target.filters)
        if not found:
            raise CaseError(redact(str(target)), "no series found on the server",
                            "check the UIDs or the query (a QIDO search with these filters returned nothing)")
        return found

    def series_count(self, study: str, series: str) -> int | None:
        """Instances of ``series`` on the server (None: not there)."""
        found = self.search_series(study, series)
        if not found:
            return None
        return found[0].instances if found[0].instances is not None else 0

    # ------------------------------------------------------------------ WADO
    def retrieve_series(self, info: SeriesInfo, cache: str | os.PathLike) -> Path:
        """``<cache>/<study>/<series>/`` holding every instance of the series (see the module docstring)."""
        dest = Path(cache) / info.study / info.series
        where = f"{self}/studies/{info.study}/series/{info.series}"
        if dest.is_dir() and info.instances is not None and _count(dest) == info.instances:
            return dest  # complete from an earlier run
        with atomic_dir(dest, replace=True, owned=lambda p: True) as tmp:
            bad: list[str] = []

            def get() -> int:
                for f in tmp.iterdir():  # a retried attempt starts again
                    f.unlink()
                bad.clear()
                n = 0
                for ds in self.client.iter_series(info.study, info.series,
                                                  media_types=(("application/dicom", "*"),)):
                    try:
                        drop_command_set(ds).save_as(tmp / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                    except (ValueError, TypeError, AttributeError, KeyError) as e:  # one instance, never the run
                        bad.append(f"instance {str(ds.get('SOPInstanceUID', '?'))[:64]}: {type(e).__name__}: "
                                   f"{(str(e).splitlines() or [''])[0]}")
                        continue
                    n += 1
                return n

            n = self._call("WADO-RS retrieval of the series", get, where=where)
            expected = info.instances
            if bad:
                raise CaseError(where, f"{len(bad)} instance{'s' * (len(bad) > 1)} of the series cannot be stored "
                                       f"as DICOM files ({bad[0]})",
                                "the server returns damaged instances; fix them on the server or export the "
                                "series from the scanner again (nothing of it was processed)")
            if expected is not None and n != expected:
                raise CaseError(where, f"retrieved {n} of the {expected} instances the server lists for the series",
                                "the series is incomplete or still arriving on the server: run again later "
                                "(nothing of it was processed)")
            if n == 0:
                raise CaseError(where, "the server returned no instance of the series", "check the series on the server")
        return dest

    # ------------------------------------------------------------------ STOW
    def store_series(self, folder: str | os.PathLike) -> dict:
        """STOW-RS every DICOM file of ``folder`` (one series) unless the server holds that series already.
        Returns ``{"series": uid, "study": uid, "stored": n, "skipped": bool}``."""
        import pydicom

        folder = Path(folder)
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() == ".dcm") \
            if folder.is_dir() else []
        if not files:
            raise CaseError(folder, "no DICOM files to store", "store derived DICOM series folders only")
        heads = [drop_command_set(pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
        series = {str(h.SeriesInstanceUID) for h in heads}
        if len(series) != 1:
            raise CaseError(folder, f"holds {len(series)} series", "store one series folder at a time")
        uid, study = series.pop(), str(heads[0].StudyInstanceUID)
        have = self.series_count(study, uid)
        if have is not None and have >= len(files):
            log.info("%s: series %s is on %s already (%d instances): not stored again", folder, uid, self, have)
            return {"series": uid, "study": study, "stored": 0, "skipped": True}
        datasets = [drop_command_set(pydicom.dcmread(f)) for f in files]
        resp = self._call("STOW-RS of the derived series",
                          lambda: self.client.store_instances(datasets, study_instance_uid=study), where=folder)
        failed = list(resp.get("FailedSOPSequence", []) if resp is not None else [])
        if failed:
            raise CaseError(folder, f"the server {self} refused {len(failed)} of {len(files)} instances "
                                    f"(failure reason {failed[0].get('FailureReason', '?')})",
                            "check the server log; run again to retry")
        return {"series": uid, "study": study, "stored": len(files), "skipped": False}


def _count(folder: Path) -> int:
    return sum(1 for f in folder.iterdir() if f.is_file() and f.suffix == ".dcm")


@dataclass
class Fetched:
    """What :func:`fetch` got: complete series folders, and one CaseError per series that failed."""

    folders: list[Path]
    failures: list[CaseError]
    series: list[SeriesInfo]


def fetch(url: str, query: str | None = None, cache: str | os.PathLike | None = None, *,
          client: DicomWeb | None = None, after_search: Callable | None = None) -> Fetched:
    """Search (QIDO) and retrieve (WADO) the series ``url`` (+ ``query``) names into ``cache`` (default
    :func:`default_cache`). A series that cannot be retrieved completely becomes a failure (one line) and no
    folder. A failing search raises :class:`CaseError`. ``after_search(series)`` is called between the two."""
    target = parse_url(url, query)
    cache = Path(cache) if cache is not None else default_cache(target.base)
    dw = client or DicomWeb(target.base)
    found = dw.find(target)
    if not target.series:  # a study or a query: never medldm's own results (a re-run would enhance them again)
        own = [s for s in found if is_medldm_series(s)]
        for s in own:
            log.info("%s/studies/%s/series/%s: skipped, a series medldm derived (%s)", dw, s.study, s.series,
                     s.description)
        found = [s for s in found if not is_medldm_series(s)]
    if after_search is not None:
        after_search(found)
    folders, failures = [], []
    for info in found:
        try:
            folders.append(dw.retrieve_series(info, cache))
        except CaseError as e:
            failures.append(e)
            log.warning("FAILED %s", e.line())
    return Fetched(folders, failures, found)


def is_medldm_series(info: SeriesInfo) -> bool:
    """A series medldm wrote (its SeriesDescription carries ``[medldm ...]``, see medldm.io.dicom_write)."""
    return "[medldm " in info.description


def default_cache(base: str) -> Path:
    """``$MEDLDM_CACHE/dicomweb/<host>_<port>`` (default ``~/.cache/medldm``)."""
    parts = urlsplit(base)
    root = Path(os.environ.get("MEDLDM_CACHE") or Path.home() / ".cache" / "medldm")
    return root / "dicomweb" / f"{parts.hostname}_{parts.port or (443 if parts.scheme == 'https' else 80)}"
