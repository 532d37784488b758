"""DICOM UIDs written by medldm.

By default every new UID is a UUID-derived UID under the ``2.25`` arc (ISO/IEC 9834-8, DICOM PS3.5
B.2): globally unique without registering an organisational root. A site that owns a registered root
can set the environment variable ``MEDLDM_UID_ROOT`` (e.g. ``1.2.826.0.1.3680043.10.1234.``); new UIDs
are then that root followed by a hash of random entropy (``pydicom.uid.generate_uid``).
"""

from __future__ import annotations

import json
import os
import re
import uuid

from pydicom.uid import UID, generate_uid

from medldm import __version__

#: Default UID prefix: UUID-derived UIDs (``2.25.<128-bit integer>``), no registration needed.
MEDLDM_UID_ROOT = "2.25."

#: Identifies the software that wrote the file (File Meta ``ImplementationClassUID``): a fixed
#: UUID-derived UID (uuid5 of the project name), the same for every medldm release.
IMPLEMENTATION_CLASS_UID = UID("2.25." + str(uuid.uuid5(uuid.NAMESPACE_DNS, "medldm.implementation").int))

#: File Meta ``ImplementationVersionName`` (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"MEDLDM_{__version__}"[:16]

_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def uid_root() -> str:
    """The UID prefix in use: ``$MEDLDM_UID_ROOT`` when set (validated), else :data:`MEDLDM_UID_ROOT`."""
    root = os.environ.get("MEDLDM_UID_ROOT", "").strip() or MEDLDM_UID_ROOT
    if not root.endswith("."):
        root += "."
    if not _ROOT_RE.match(root) or len(root) > 40:
        raise ValueError(f"MEDLDM_UID_ROOT={root!r} is not a valid DICOM UID prefix (digits and dots, "
                         "no leading zeros, at most 40 characters) — set a registered root or unset it")
    return root


def new_uid() -> UID:
    """A new globally unique UID under :func:`uid_root`."""
    root = uid_root()
    return generate_uid(prefix=None) if root == "2.25." else generate_uid(prefix=root)


def derived_uid(kind: str, seed: str) -> UID:
    """A UID that is always the same for the same ``(kind, seed)`` (uuid5 under ``2.25``): e.g. the
    replacement Frame of Reference UID of a source series whose own one is missing or invalid, so that
    every series derived from that source shares it."""
    return UID("2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"medldm:{kind}:{seed}").int))


def provenance_key(provenance: dict) -> str:
    """The options key of a provenance dict: its ``"key"``, else the whole dict as sorted JSON."""
    if provenance.get("key") not in (None, ""):
        return str(provenance["key"])
    return json.dumps(provenance, sort_keys=True, default=str, separators=(",", ":"))


def derived_series_uid(source_series_uid: str, provenance: dict | str, sources=()) -> str:
    """SeriesInstanceUID of the series derived from ``source_series_uid`` with these options (a provenance dict
    or its key): always the same for the same pair, so a re-run is recognised (e.g. by a QIDO query).
    ``sources``: the SOPInstanceUIDs the derived series was made from, when it is one part of its source
    series (a stack of one orientation, a part split at a gap): each part then gets its own series."""
    key = provenance if isinstance(provenance, str) else provenance_key(provenance)
    part = "|" + ",".join(sorted(str(u) for u in sources)) if sources else ""
    return str(derived_uid("derived-series", f"{source_series_uid}|{key}{part}"))
