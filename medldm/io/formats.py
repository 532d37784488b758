"""File-format naming shared by readers, writers and the CLI (no heavy imports: used at CLI start-up)."""

from __future__ import annotations

import os

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` path (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)
