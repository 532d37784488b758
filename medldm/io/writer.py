"""``save_scan``: write a scan in the kind the output path names (NIfTI file or DICOM series folder).

Both kinds appear atomically and never replace what medldm did not write (``medldm.io.atomic``):
``replace=False`` keeps any existing output (FileExistsError); ``replace=True`` replaces an existing NIfTI
file, or a DICOM series folder that ``owned`` (default: only DICOM files medldm wrote) says is medldm's.
"""

from __future__ import annotations

import os
from pathlib import Path

from medldm.io.atomic import atomic_file
from medldm.io.dicom_write import save_dicom_series
from medldm.io.errors import CaseError
from medldm.io.formats import is_nifti
from medldm.io.nifti import save_nifti


def save_scan(img, out_path: str | os.PathLike, *, reference=None, description: str = "medldm",
              replace: bool = True, owned=None, dtype=None, deidentify=False) -> Path:
    """Write ``img`` (MetaTensor (X, Y, Z), RAS affine): ``out_path`` ending in .nii/.nii.gz -> NIfTI
    (``reference`` unused; ``dtype`` forces the stored type), anything else -> a DICOM series folder
    (``reference``: the source series' files or folder for a derived series; None for a new anonymous
    series; ``deidentify``: False, True or a shared :class:`medldm.io.deidentify.Deidentifier`, the PS3.15
    basic profile). ``replace``/``owned``: see the module docstring. Returns ``out_path``."""
    out_path = Path(out_path)
    if is_nifti(out_path):
        with atomic_file(out_path, replace=replace) as tmp:
            try:
                save_nifti(img, tmp, **({"dtype": dtype} if dtype is not None else {}))
            except CaseError as e:  # name the output, not the temporary file
                raise CaseError(out_path, e.reason, e.hint) from e
        return out_path
    save_dicom_series(img, out_path, reference=reference, description=description, replace=replace, owned=owned,
                      deidentify=deidentify)
    return out_path
