"""``save_scan``: write a scan in the kind the output path names (NIfTI file or DICOM series folder)."""

from __future__ import annotations

import os
from pathlib import Path

from medldm.io.formats import is_nifti


def save_scan(img, out_path: str | os.PathLike, *, reference=None, description: str = "medldm") -> Path:
    """Write ``img`` (MetaTensor (X, Y, Z), RAS affine): ``out_path`` ending in .nii/.nii.gz -> NIfTI
    (``reference`` unused), anything else -> a DICOM series folder (``reference``: the source series'
    files or folder for a derived series; None for a new anonymous series). Returns ``out_path``."""
    out_path = Path(out_path)
    if is_nifti(out_path):
        from medldm.io.nifti import save_nifti

        return save_nifti(img, out_path)
    from medldm.io.dicom_write import save_dicom_series

    save_dicom_series(img, out_path, reference=reference, description=description)
    return out_path
