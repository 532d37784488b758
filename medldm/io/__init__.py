"""Reading and writing scans. Images travel as ``monai.data.MetaTensor`` of shape ``(X, Y, Z)``
(float32, scanner units: HU for CT) with ``.affine`` = voxel->RAS mm (see ``medldm.io.geometry``
and docs/io.md) and meta keys listed in docs/io.md.

Public API::

    load_scan(path, volume=None) -> MetaTensor          # NIfTI file, DICOM file(s) or series folder
    load_case(case, volume=None) -> MetaTensor          # a Case from scan_folder
    read_case(case, volume=None) -> (data, affine, meta)  # the same, numpy only (no torch import)
    scan_folder(root) -> Discovery                      # cases (NIfTI files, DICOM series) + skipped files
    save_nifti(img, path, dtype=None) -> Path
    save_dicom_series(img, out_dir, reference=None, description="medldm", modality=None) -> list[Path]
    save_scan(img, out_path, reference=None, description="medldm") -> Path   # by output kind
"""

from medldm.io.errors import CaseError, UsageError

__all__ = ["CaseError", "UsageError", "load_scan", "load_case", "read_case", "scan_folder", "save_nifti", "save_dicom_series", "save_scan"]


def __getattr__(name):  # lazy: keep `import medldm.io` light
    if name in ("load_scan", "load_case", "read_case"):
        from medldm.io import reader

        return getattr(reader, name)
    if name in ("scan_folder", "Case", "Discovery", "output_path"):
        from medldm.io import discover

        return getattr(discover, name)
    if name in ("save_nifti",):
        from medldm.io import nifti

        return getattr(nifti, name)
    if name in ("save_dicom_series",):
        from medldm.io import dicom_write

        return getattr(dicom_write, name)
    if name in ("save_scan",):
        from medldm.io import writer

        return getattr(writer, name)
    raise AttributeError(name)
