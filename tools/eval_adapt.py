"""``--adapt`` variants on the held-out brain (docs/models.md, "3D context and adaptation to the scan"): the
shipped denoiser on dipy's S0_10slices with Gaussian 5 % noise (sigma relative to its maximum, told the true
level), alone and after N adaptation steps with other learning rates / trained parameter sets of
``medldm.pipelines.adapt``. PSNR over the volume (data range 1), SSIM mean over slices.

    OMP_NUM_THREADS=1 python tools/eval_adapt.py [-m mr-denoise-2d]
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
    ap.add_argument("-m", "--model", default="mr-denoise-2d")
    args = ap.parse_args()
    torch.set_num_threads(1)
    enh = open_model(args.model).runner
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


if __name__ == "__main__":
    raise SystemExit(main())
