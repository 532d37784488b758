"""Intensity ranges for PSNR / SSIM: a plain width ``R`` or a named / explicit HU window.

PSNR and SSIM are meaningless without the intensity range they are computed over (SSIM's
constants are ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``; PSNR's peak is ``R``), so the range is
always given by the caller and never guessed from the images.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

#: Width of medldm's model intensity range [-1, 1] (``medldm.data.intensity.MODEL_RANGE``): the ``data_range``
#: of PSNR / SSIM on normalized images (training validation, refiner metrics). Defined here, once; import it.
MODEL_DATA_RANGE: float = 2.0

#: EVALUATION windows: (lo, hi) in Hounsfield units, = level -/+ width / 2 of the usual radiology display presets,
#: for ``data_range=`` / ``window=`` of the metrics. Their names carry a ``ct-`` prefix.
#:
#: Not to be confused with the NORMALIZATION windows of ``medldm.data.intensity.CT_WINDOWS`` (unprefixed names,
#: ``data.ct_window`` / ``--ct-window``), which map HU to the model range before a model sees the image. Where a
#: name appears in both tables the values agree, except the subdural window: ``ct-subdural`` here is the narrow
#: display window W200 L80 = (-20, 180), chosen to score the thin blood/brain contrast, while the normalization
#: window named ``subdural`` is the wider W400 L100 = (-100, 300), which keeps the skull edge and the blood
#: unclipped for the model. A test keeps the shared entries in step.
WINDOWS: dict[str, tuple[float, float]] = {
    "ct-brain": (0.0, 80.0),  # W80 L40
    "ct-subdural": (-20.0, 180.0),  # W200 L80 (narrow display window; the normalization "subdural" is W400 L100)
    "ct-stroke": (8.0, 48.0),  # W40 L28
    "ct-soft-tissue": (-160.0, 240.0),  # W400 L40
    "ct-mediastinum": (-125.0, 225.0),  # W350 L50
    "ct-liver": (-15.0, 135.0),  # W150 L60
    "ct-lung": (-1350.0, 150.0),  # W1500 L-600
    "ct-bone": (-450.0, 1050.0),  # W1500 L300
}

DataRange = float | tuple[float, float] | str

_HOW = (
    "pass data_range= a float R (images already in a range of width R, e.g. 1.0 for [0, 1]), "
    "a (lo, hi) window (both images are clipped to it, R = hi - lo), "
    f"or a window name from medldm.metrics.WINDOWS ({', '.join(WINDOWS)})"
)


def _window(value: tuple[float, float] | Sequence[float] | str) -> tuple[float, float]:
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in WINDOWS:
            raise ValueError(
                f"unknown window {value!r} — use one of {', '.join(WINDOWS)} or a (lo, hi) tuple"
            )
        return WINDOWS[key]
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            f"window (lo, hi) = ({lo}, {hi}) is not a finite range with lo < hi — fix the window"
        )
    return lo, hi


def resolve_range(
    data_range: DataRange | None = None, window: tuple[float, float] | str | None = None
) -> tuple[float | None, float | None, float]:
    """Resolve the intensity convention to ``(lo, hi, R)``.

    * float ``R``: no clipping, ``lo = hi = None`` (images are taken as they are).
    * ``(lo, hi)`` tuple or a window name (``data_range`` or ``window``): images are clipped to
      ``[lo, hi]`` and shifted by ``-lo`` before the metric; ``R = hi - lo``.

    Raises ``TypeError`` when no range is given (it is never guessed) and ``ValueError`` for a bad
    or contradictory one.
    """
    if data_range is None and window is None:
        raise TypeError(f"data_range is required and is never guessed from the images — {_HOW}")
    if window is not None and data_range is not None:
        raise ValueError("give either data_range or window, not both — a window already sets R = hi - lo")
    value = window if window is not None else data_range
    if isinstance(value, bool):
        raise TypeError(f"data_range={value!r} is not a range — {_HOW}")
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if isinstance(value, numbers.Real):
        r = float(value)
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"data_range={r} must be a finite positive number — {_HOW}")
        return None, None, r
    if isinstance(value, str) or (isinstance(value, Sequence) and len(value) == 2):
        lo, hi = _window(value)
        return lo, hi, hi - lo
    raise TypeError(f"data_range={value!r} is not understood — {_HOW}")


def apply_window(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """Clip ``x`` to ``[lo, hi]`` and shift by ``-lo`` (values then lie in ``[0, hi - lo]``);
    identity when ``lo`` is None. Any shape."""
    if lo is None or hi is None:
        return x
    return x.clamp(lo, hi) - lo
