"""Data preparation: intensity normalization with an exact inverse (:mod:`medldm.data.intensity`) and
seeded synthetic degradations (:mod:`medldm.data.degrade`, low-dose CT in :mod:`medldm.data.lowdose`).
See docs/degradations.md."""

from medldm.data.degrade import (
    KINDS,
    apply_degradation,
    downsample,
    gaussian_noise,
    lowdose_ct,
    rician_noise,
    thick_slices,
)
from medldm.data.intensity import CT_WINDOWS, denormalize, fit_normalization, normalize, normalize_image

__all__ = [
    "CT_WINDOWS", "KINDS", "apply_degradation", "denormalize", "downsample", "fit_normalization",
    "gaussian_noise", "lowdose_ct", "normalize", "normalize_image", "rician_noise", "thick_slices",
]
