"""Image-quality metrics: PSNR, SSIM and MS-SSIM for batches of 2D and 3D images, any device.

Public API (see docs/metrics.md)::

    psnr(pred, ref, *, data_range, mask=None, reduction="none") -> Tensor (N,)
    ssim(pred, ref, *, data_range, mask=None, win_size=11, sigma=1.5, k1=0.01, k2=0.03,
         gaussian=True, return_map=False) -> Tensor (N,)  [, map (N, C, *valid)]
    ms_ssim(pred, ref, *, data_range, weights=None, win_size=11, sigma=1.5, k1=0.01, k2=0.03) -> Tensor (N,)
    resolve_range(data_range=None, window=None) -> (lo, hi, R)
    WINDOWS: dict[str, (lo, hi)]   # HU presets, e.g. "ct-soft-tissue": (-160, 240)

Images are (N, C, H, W) or (N, C, D, H, W) torch tensors (numpy accepted). ``data_range`` is
required: a float R, a (lo, hi) window (both images clipped to [lo, hi], shifted by -lo, R = hi - lo)
or a window name.
"""

from medldm.metrics.msssim import MS_SSIM_WEIGHTS, ms_ssim
from medldm.metrics.psnr import psnr
from medldm.metrics.ranges import WINDOWS, apply_window, resolve_range
from medldm.metrics.ssim import ssim

__all__ = ["MS_SSIM_WEIGHTS", "WINDOWS", "apply_window", "ms_ssim", "psnr", "resolve_range", "ssim"]
