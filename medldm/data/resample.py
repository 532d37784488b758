"""Keys cubic-convolution resampling: the ``bicubic`` baseline (medldm.eval.baselines), the thin-slice training
degradation (medldm.data.condition) and the thin-slice model's first step (medldm.pipelines.thinslice) use the
same function, so the model sees at inference exactly the interpolation it was trained to undo.

Hand-written on purpose: scipy's ``zoom`` has no Keys kernel and aligns voxel corners, not pixel areas; the
separable numpy version matches torch's ``bicubic`` (a = -0.75) to float precision (tests/test_baselines.py)."""

from __future__ import annotations

import numpy as np

KEYS_A = -0.5  # Keys (1981) cubic convolution parameter


def keys_kernel(t: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    """Keys (1981) cubic convolution kernel W(t); ``a=-0.5`` is Keys' choice (MATLAB ``imresize``),
    ``a=-0.75`` the one of OpenCV/PyTorch ``bicubic``."""
    t = np.abs(t)
    t2, t3 = t * t, t * t * t
    near = (a + 2) * t3 - (a + 3) * t2 + 1
    far = a * t3 - 5 * a * t2 + 8 * a * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def cubic_convolution_resize(vol: np.ndarray, new_shape: tuple[int, ...], a: float = KEYS_A) -> np.ndarray:
    """Separable cubic-convolution resampling of ``vol`` to ``new_shape`` (pixel-area alignment:
    output voxel ``i`` samples input coordinate ``(i + 0.5)·n/m − 0.5``; borders replicated).
    No anti-aliasing: meant for up-sampling."""
    out = np.asarray(vol, dtype=np.float64)
    for ax, (n, m) in enumerate(zip(out.shape, new_shape, strict=True)):
        if n == m:
            continue
        pos = (np.arange(m) + 0.5) * (n / m) - 0.5
        base = np.floor(pos).astype(np.int64)
        shape = [1] * out.ndim
        shape[ax] = m
        acc = np.zeros(out.shape[:ax] + (m,) + out.shape[ax + 1:], dtype=np.float64)
        for k in (-1, 0, 1, 2):
            idx = np.clip(base + k, 0, n - 1)
            w = keys_kernel(pos - (base + k), a).reshape(shape)
            acc += np.take(out, idx, axis=ax) * w
        out = acc
    return out
