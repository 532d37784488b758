"""Denoisers on single slices (where a 2.5D model's neighbours are the slice itself): 256 x 256 centre crops of the
held-out abdomen and shoulder MR slices (pydicom-data), scaled to [0, 1] by their 0.5-99.5th percentiles (clamped
at 0 for the Rician case), Gaussian and Rician noise sigma 5 %, PSNR (data range 1), models blind.

    OMP_NUM_THREADS=1 python tools/eval_single_slices.py [-m mr-denoise-2d mr-denoise-25d ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from medldm.data.datasets import resolve_path
from medldm.data.degrade import gaussian_noise, rician_noise
from medldm.shipped import enhance

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import held_out_crop  # noqa: E402  (the demo's preparation of a reference)

SCANS = ("pkg://data_store/data/MR-SIEMENS-DICOM-WithOverlays.dcm", "pkg://data_store/data/MR2_UNCI.dcm")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--models", nargs="+", default=["mr-denoise-2d", "mr-denoise-25d"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for scan in SCANS:
        ref = held_out_crop(resolve_path(scan), 256, 1).clamp(min=0)
        for kind, add in (("gaussian", gaussian_noise), ("rician", rician_noise)):
            noisy = add(ref, 0.05, 7, relative=False)
            row = {}
            for m in args.models:
                out = np.asarray(enhance(m, noisy, seed=0), np.float64)
                row[m] = round(float(10 * np.log10(1 / np.mean((out - np.asarray(ref, np.float64)) ** 2))), 2)
            print(Path(scan).name, kind, row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
