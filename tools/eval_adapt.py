"""``--adapt`` variants on the held-out brain (docs/models.md, "3D context and adaptation to the scan"): the
shipped denoiser on dipy's S0_10slices with Gaussian 5 % noise (sigma relative to its maximum, told the true
level), alone and after N adaptation steps with other learning rates / trained parameter sets of
``medldm.pipelines.adapt``. PSNR over the volume (data range 1), SSIM mean over slices.

    OMP_NUM_THREADS=1 python tools/eval_adapt.py [-m mr-denoise-2d]
    OMP_NUM_THREADS=1 python tools/eval_adapt.py --sr [-m mr-sr2x-2d]   # x2 SR: the brain down-sampled (anti-aliased)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

import medldm.pipelines.adapt as adapt
from medldm.pipelines.enhance import EnhanceOptions
from medldm.shipped import open_model

sys.path.insert(0, str(Path(__file__).parent))
import eval_fair_baselines as fair  # noqa: E402

#: (trained parameter name prefixes, learning rate, steps)
VARIANTS = ((("final_conv",), 1e-3, 100), (("",), 1e-5, 100), (("final_conv", "upcat_1"), 3e-4, 100))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None, help="default: mr-denoise-2d (mr-sr2x-2d with --sr)")
    ap.add_argument("--sr", action="store_true", help="x2 super-resolution instead of denoising")
    ap.add_argument("--scan", default="s0-brain", choices=("s0-brain", "ge-epi"), help="held-out volume (--sr)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sr:
        return sr(args.model or "mr-sr2x-2d", args.scan)
    enh = open_model(args.model or "mr-denoise-2d").runner
    ref = fair.volumes((96, 112, 16))["s0-brain"]
    noisy = np.asarray(fair.gaussian_noise(ref, 0.05, 100, relative=False), np.float64)
    img = MetaTensor(torch.as_tensor(noisy, dtype=torch.float32), affine=torch.eye(4))
    lev = fair.told(enh, noisy, 0.05, False)
    print("no adaptation", fair.psnr_ssim(np.asarray(enh.enhance(img, EnhanceOptions(noise_level=lev)).image), ref))
    for trained, lr, steps in VARIANTS:
        adapt.TRAINED, adapt.LR = trained, lr
        r = enh.enhance(img, EnhanceOptions(noise_level=lev, adapt_steps=steps))
        print(trained, lr, steps, fair.psnr_ssim(np.asarray(r.image), ref), r.info["adapt"]["loss_first"],
              r.info["adapt"]["loss_last"], flush=True)
    return 0


def sr(model: str, scan: str) -> int:
    """The SR model on the held-out brain down-sampled x2 (medldm's anti-aliased down-sampling), alone and adapted
    (self-pairs: the low-resolution scan down-sampled further) for 30 and 100 steps, against the B-spline."""
    from medldm.data.degrade import downsample
    from medldm.eval.baselines import upsample_scan

    enh = open_model(model).runner
    ref = fair.volumes((96, 112, 16))[scan]
    ref = ref[: ref.shape[0] // 2 * 2, : ref.shape[1] // 2 * 2]
    img = MetaTensor(torch.as_tensor(ref, dtype=torch.float32), affine=torch.eye(4))
    low = downsample(img, 2, method="gaussian")
    print("bspline", fair.psnr_ssim(np.asarray(upsample_scan(low, 2, "bspline")), ref))
    print("no adaptation", fair.psnr_ssim(np.asarray(enh.enhance(low, EnhanceOptions()).image), ref), flush=True)
    for steps in (30, 100):
        r = enh.enhance(low, EnhanceOptions(adapt_steps=steps))
        print("adapt", steps, fair.psnr_ssim(np.asarray(r.image), ref), r.info["adapt"]["loss_first"],
              r.info["adapt"]["loss_last"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
