"""Choosing how a float volume in scanner units is stored as 16-bit DICOM pixels.

Stored value ``s`` and real value ``v`` are related by ``v = s * RescaleSlope + RescaleIntercept``.
The choice, in order (first that applies):

1. the reference series' own slope/intercept/signedness, when it represents every value exactly
   (a CT in integer HU converted DICOM -> DICOM keeps its stored values bit for bit);
2. integer-valued data: slope 1 — ``int16`` when the source type was signed and the values fit it,
   else ``uint16`` if they fit ``[0, 65535]``, else ``int16`` if they fit ``[-32768, 32767]``, else ``uint16`` with intercept = minimum when the range spans <= 65535;
   all exact (CT in HU round-trips exactly);
3. anything else (non-integer values, or an integer range wider than 65535): ``uint16`` with
   intercept = minimum and slope = range / 65535 (rounded up to a short decimal): lossy, maximum
   error ``slope / 2`` (e.g. 0.031 HU over a 4096 HU range), reported in ``Encoding.max_error``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_U16 = (0, 65535)
_I16 = (-32768, 32767)


@dataclass(frozen=True)
class Encoding:
    """How to store real values: ``stored = round((v - intercept) / slope)``."""

    slope: float
    intercept: float
    signed: bool  # PixelRepresentation 1 (int16) or 0 (uint16)
    max_error: float  # largest |decoded - original| over the volume (0.0 = exact)

    @property
    def identity(self) -> bool:
        return self.slope == 1.0 and self.intercept == 0.0

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Stored integers (int16 or uint16) for real values of any shape."""
        s = np.rint((np.asarray(values, dtype=np.float64) - self.intercept) / self.slope)
        lo, hi = _I16 if self.signed else _U16
        if s.size and (s.min() < lo or s.max() > hi):  # never wrap around silently
            raise ValueError(f"values outside the stored range {lo}..{hi} for slope {self.slope}, "
                             f"intercept {self.intercept}")
        return s.astype(np.int16 if self.signed else np.uint16)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float64) * self.slope + self.intercept


def _short(x: float, digits: int = 10) -> float:
    """``x`` rounded so its decimal string fits a DICOM DS (16 characters)."""
    return float(f"{x:.{digits}g}")


def _chunks(values: np.ndarray, n: int = 1 << 22):
    """Flat pieces of ``values`` (bounded memory for float64 temporaries on large volumes)."""
    flat = values.reshape(-1)
    for i in range(0, flat.size, n):
        yield flat[i:i + n]


def _error(values: np.ndarray, enc: Encoding) -> float | None:
    """Largest decoding error of ``enc`` on ``values``, or None when a value does not fit."""
    err = 0.0
    for part in _chunks(values):
        try:
            stored = enc.encode(part)
        except ValueError:
            return None
        err = max(err, float(np.max(np.abs(enc.decode(stored).astype(np.float32) - part))))
    return err


def choose_encoding(values: np.ndarray, reference: tuple[float, float, bool] | None = None,
                    prefer_signed: bool = False) -> Encoding:
    """Pick slope/intercept/signedness for ``values`` (float32, any shape; finite).

    ``reference`` = ``(slope, intercept, signed)`` of the source series, tried first and used when
    it is exact. ``prefer_signed``: int16 before uint16 for integer data that fits both (the source
    was signed, e.g. int16 NIfTI), so the reader reports the same original dtype.
    """
    v = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise ValueError("the image has NaN or infinite values")
    if reference is not None and reference[0] != 0:
        enc = Encoding(float(reference[0]), float(reference[1]), bool(reference[2]), 0.0)
        # exact = decodes to the very float32 values (tolerance: float32 rounding of the product)
        err = _error(v, enc)
        if err is not None and err <= 1e-6 * max(1.0, float(np.max(np.abs(v))) if v.size else 1.0):
            return Encoding(enc.slope, enc.intercept, enc.signed, err)
    vmin, vmax = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if all(np.array_equal(part, np.rint(part)) for part in _chunks(v)):
        if prefer_signed and _I16[0] <= vmin and vmax <= _I16[1]:
            return Encoding(1.0, 0.0, True, 0.0)
        if _U16[0] <= vmin and vmax <= _U16[1]:
            return Encoding(1.0, 0.0, False, 0.0)
        if _I16[0] <= vmin and vmax <= _I16[1]:
            return Encoding(1.0, 0.0, True, 0.0)
        if vmax - vmin <= _U16[1]:
            return Encoding(1.0, vmin, False, 0.0)
    # lossy: spread the range over 0..65535
    intercept = _short(vmin)
    slope = _short(max(vmax - intercept, 1e-12) / _U16[1] * (1 + 1e-9), 8)
    for _ in range(20):
        enc = Encoding(slope, intercept, False, 0.0)
        err = _error(v, enc)
        if err is not None:
            return Encoding(slope, intercept, False, err)
        slope = _short(slope * (1 + 1e-6), 8)
    raise ValueError(f"cannot fit values {vmin}..{vmax} into 16-bit DICOM pixels")
