"""``-i URL`` / ``-o URL`` of the folder commands: DICOMweb input and output (``medldm.io.dicomweb``).

* :func:`resolve_remote_input` turns ``-i http(s)://…/dicom-web/studies/<UID>[/series/<UID>]`` (or
  ``-i http(s)://…/dicom-web --query "Modality=MR&..."``) into a :class:`~medldm.io.discover.Discovery` over the
  local cache: one case per retrieved series (id ``<StudyUID>/<SeriesUID>``), plus one failed case (``error``
  set, so the case loop reports its one line and exits 1) per series that could not be retrieved completely.
* :func:`local_output` is the local folder a command writes to when ``-o`` is a URL (the staging folder; resume
  records and the run report live there).
* :func:`store_remote_output` sends the derived series folders with STOW-RS (skipping series the server holds
  already) and returns ``(exit status, results)`` like the case loop.
* :func:`provenance` is the dict a command puts into ``img.meta["provenance"]`` (DerivationDescription,
  ContributingEquipmentSequence and deterministic derived UIDs, see docs/pacs.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from medldm.io.caseloop import run_cases
from medldm.io.dicomweb import DicomWeb, default_cache, fetch, is_dicomweb_url, parse_url, redact
from medldm.io.discover import Case, Discovery, scan_folder
from medldm.io.errors import UsageError

is_remote = is_dicomweb_url


@dataclass
class RemoteInput:
    """What :func:`resolve_remote_input` found: ``root`` (the cache folder), ``found`` (a Discovery whose case
    ids are ``<StudyUID>/<SeriesUID>``), ``url`` (credential-free, for reports)."""

    root: Path
    found: object
    url: str


def resolve_remote_input(arg: str, query: str | None = None, cache: str | os.PathLike | None = None,
                         **kw) -> RemoteInput:
    """Retrieve the series ``arg`` (+ ``query``) names into ``cache`` (default ``$MEDLDM_CACHE/dicomweb/<host>``)
    and discover them. A failing QIDO search raises :class:`~medldm.io.errors.CaseError` (the command's error
    line, nothing processed); a series not retrieved completely becomes a failed case. ``kw`` goes to
    :func:`medldm.io.dicomweb.fetch` (``client=``, ``after_search=``)."""
    target = parse_url(arg, query)
    root = Path(cache) if cache is not None else default_cache(target.base)
    got = fetch(arg, query, root, **kw)
    cases, skipped, notes = [], [], []
    for folder in got.folders:
        rel = folder.relative_to(root).as_posix()  # <study>/<series>
        d = scan_folder(folder)
        for c in d.cases:
            cid = rel if c.id == folder.name else f"{rel}/{c.id}"
            cases.append(replace(c, id=cid, root=root))
        skipped += d.skipped
        notes += d.notes
    for e in got.failures:
        where = e.path
        sid = where.split("/studies/", 1)[-1].replace("/series/", "/") if "/studies/" in where else where
        cases.append(Case(id=sid, kind="dicom-series", paths=[], root=root, error=e, source=where))
    return RemoteInput(root, Discovery(cases, skipped, notes), redact(str(target)))


def local_output(url: str, command: str, key: object = "") -> Path:
    """The local staging folder for ``-o URL``: ``$MEDLDM_CACHE/dicomweb-out/<host>_<port>/<command>-<hash of key>``
    (``key``: e.g. the resume options, so different runs do not share outputs)."""
    root = default_cache(url)  # only its host and port count
    h = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    return root.parent.parent / "dicomweb-out" / root.name / f"{command}-{h}"


def store_remote_output(url: str, folders, *, client=None, quiet: bool = False):
    """STOW-RS each derived series folder in ``folders`` to ``url`` (a ``…/dicom-web`` root); a series the server
    holds already (same SeriesInstanceUID, as many instances) is skipped. Returns ``(status, results)``: status 0
    when every folder is stored or skipped, 1 when some failed (one line each, logged)."""
    base = url.rstrip("/")
    if not is_dicomweb_url(base):
        raise UsageError(f"{url!r} is not an http(s):// DICOMweb URL")
    dw = client or DicomWeb(base)

    def store(folder):
        r = dw.store_series(folder)
        return {"outputs": [f"{redact(base)}/studies/{r['study']}/series/{r['series']}"], **r}

    return run_cases([Path(f) for f in folders], store, name=str, desc="store", quiet=quiet)


def provenance(model_name: str, model_hash: str, task: str | None, opts, info: dict | None = None, **extra) -> dict:
    """``img.meta["provenance"]`` for an enhanced scan: model, hash, task and the options that change the pixels.
    ``opts``: the ``EnhanceOptions`` (or a dict); ``info``: ``EnhanceResult.info`` (the steps and sampler actually
    used). Everything in it is in the options key of the deterministic derived UIDs, except the estimated noise
    level (a given ``--noise-level`` is in it)."""
    get = opts.get if isinstance(opts, dict) else (lambda k: getattr(opts, k, None))
    info = info or {}
    prov = {"model": model_name, "model_hash": model_hash, "task": task or info.get("task")}
    for k in ("steps", "sampler", "samples", "window", "overlap"):
        v = info.get(k, get(k))
        if v is not None:
            prov[k] = list(v) if isinstance(v, tuple) else v
    for k in ("seed", "axis", "refine"):
        if get(k) is not None:
            prov[k] = get(k)
    prov["noise_level"] = get("noise_level") if get("noise_level") is not None else "estimated"
    prov.update(extra)
    return prov


def add_remote_arguments(p) -> None:
    """``--query`` for the commands whose ``-i`` may be a DICOMweb URL."""
    p.add_argument("--query", metavar="QIDO",
                   help="with IN http(s)://…/dicom-web: a QIDO-RS search, e.g. 'Modality=MR&StudyDate=20240101-' "
                        "(docs/pacs.md)")


def open_remote(args, command: str, *, inp: str = "input", outp: str = "output"):
    """``-i URL`` / ``-o URL`` of a folder command: ``(src, out, remote_in, remote_out)``. ``src`` is the local
    cache of the retrieved series (or IN), ``out`` the local staging folder of ``-o URL`` (or OUT). A failing
    search raises :class:`~medldm.io.errors.CaseError` (the command prints it and exits 1: the server, not
    the command line, is at fault)."""
    arg_in, arg_out = str(getattr(args, inp)), str(getattr(args, outp))
    query = getattr(args, "query", None)
    if query and not is_remote(arg_in):
        raise UsageError("--query needs IN to be a DICOMweb URL (http(s)://HOST:PORT/dicom-web)")
    remote_out = arg_out if is_remote(arg_out) else None
    if remote_out:
        if getattr(args, "to", None) == "nifti":
            raise UsageError("-o URL stores DICOM series on the server: --to nifti does not apply")
        if hasattr(args, "to"):
            args.to = "dicom"
    remote_in = resolve_remote_input(arg_in, query) if is_remote(arg_in) else None
    src = remote_in.root if remote_in else Path(arg_in)
    out = local_output(remote_out, command, (arg_in, query)) if remote_out else Path(arg_out)
    return src, out, remote_in, remote_out
