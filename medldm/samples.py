"""Real sample scans that registry packages ship (see ../shared/DATA.md): used by the demo, docs and benchmarks.

Nothing is downloaded: each sample is a file inside an installed package. ``sample_path(name)`` raises a
``LookupError`` naming the package to install when it is missing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    name: str
    package: str  # import name of the package that ships it
    pip: str  # what to pip install
    relpath: str  # inside the package folder
    description: str


SAMPLES: dict[str, Sample] = {s.name: s for s in [
    Sample("ct-head", "data_store", "pydicom-data", "data/693_UNCI.dcm", "head CT slice, 512x512, 0.479 mm (DICOM)"),
    Sample("ct-small", "pydicom", "pydicom", "data/test_files/CT_small.dcm", "CT slice 128x128, HU via rescale (DICOM)"),
    Sample("mr-small", "pydicom", "pydicom", "data/test_files/MR_small.dcm", "MR slice 64x64 (DICOM)"),
    Sample("mr-series-oblique", "pydicom", "pydicom", "data/test_files/dicomdirtests/98892003/MR700",
           "oblique MR series, 7 slices of 16x16 (DICOM folder)"),
    Sample("mr-abdomen", "data_store", "pydicom-data", "data/MR-SIEMENS-DICOM-WithOverlays.dcm", "abdomen MR slice 484x484 (DICOM)"),
    Sample("mr-shoulder", "data_store", "pydicom-data", "data/MR2_UNCI.dcm", "shoulder MR slice 1024x1024 (DICOM)"),
    Sample("mr-brain-s0", "dipy", "dipy", "data/files/S0_10slices.nii.gz", "brain diffusion b0 MR, 128x128x10 (NIfTI)"),
    Sample("mr-mni152", "nilearn", "nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
           "MNI152 2009a T1 template, 197x233x189 at 1 mm (NIfTI; an average of 152 brains)"),
]}


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sample_path(name: str) -> Path:
    """Path of a shipped sample scan (file or DICOM folder)."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
    s = SAMPLES[name]
    root = package_dir(s.package)
    if root is None or not (root / s.relpath).exists():
        raise LookupError(f"sample {name!r} needs the package {s.pip!r}: pip install {s.pip}")
    return root / s.relpath


def available_samples() -> dict[str, Path]:
    """The samples whose packages are installed."""
    out = {}
    for name in SAMPLES:
        try:
            out[name] = sample_path(name)
        except LookupError:
            pass
    return out
