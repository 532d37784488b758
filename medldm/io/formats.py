"""File-format naming shared by readers, writers and the CLI (no heavy imports: used at CLI start-up)."""

from __future__ import annotations

import os
from pathlib import Path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` path (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def sibling_path(out: str | os.PathLike, suffix: str):
    """``DIR/x.nii.gz`` (or a DICOM folder ``DIR/x``) -> ``DIR/x<suffix>``, absolute: the files medldm keeps beside
    an output (``.degradation.json`` records, ``_std.nii.gz`` uncertainty maps)."""
    out = Path(os.path.abspath(out))
    name = out.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return out.with_name(f"{name}{suffix}")
