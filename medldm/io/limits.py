"""Size limits checked before memory is allocated (one place for every reader and generator).

``MEDLDM_MAX_VOXELS`` (environment, e.g. ``4e9``) bounds the voxels of one scan that medldm reads (NIfTI,
DICOM series and multi-frame objects) or generates; the default 2**31 voxels is 8 GiB as float32.
Headers claiming more are refused with a one-line error before any voxel is read (docs/limits.md).
"""

from __future__ import annotations

import os

from medldm.io.errors import CaseError

#: default of the voxel limit (``MEDLDM_MAX_VOXELS``): 2**31 voxels = 8 GiB as float32
DEFAULT_MAX_VOXELS = 2**31
ENV = "MEDLDM_MAX_VOXELS"


def max_voxels() -> int:
    """The most voxels one scan may hold: ``MEDLDM_MAX_VOXELS`` (e.g. ``4e9``), default 2**31."""
    v = os.environ.get(ENV, "").strip()
    if not v:
        return DEFAULT_MAX_VOXELS
    try:
        n = int(float(v))
    except ValueError:
        n = 0
    if n < 1:
        raise CaseError(ENV, f"{v!r} is not a positive voxel count",
                        "set it to a number such as 4e9, or unset it for the default 2**31")
    return n
