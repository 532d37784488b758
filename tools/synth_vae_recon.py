"""python tools/synth_vae_recon.py STUDY_OUT: reconstruction PSNR/SSIM of the shipped synthesis VAE on the held-out real slices of the study, and the
reconstructions written for `medldm audit` (classifier + FRD of reconstructions vs real)."""
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medldm.metrics.psnr import psnr
from medldm.metrics.ssim import ssim
from medldm.models import load_model
from medldm.shipped import resolve_model

torch.set_num_threads(1)
study = Path(sys.argv[1])
out = study / "recon"
b = load_model(resolve_model("mr-synth-2d"))
vae = b.vae.eval()
P, S = [], []
for f in sorted((study / "holdout").rglob("*.nii.gz")):
    x = np.asarray(nib.load(str(f)).dataobj, np.float32)[:, :, 0] * 2 - 1  # model range
    t = torch.from_numpy(x)[None, None]
    with torch.no_grad():
        mu, _ = vae.encode(t)
        r = vae.decode(mu).clamp(-1, 1)
    P.append(float(psnr(r, t, data_range=2.0)[0]))
    S.append(float(ssim(r, t, data_range=2.0)[0]))
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(((r[0, 0].numpy() + 1) / 2)[:, :, None], np.eye(4)), str(out / f.name))
res = {"n": len(P), "psnr_mean": float(np.mean(P)), "psnr_min": float(np.min(P)), "ssim_mean": float(np.mean(S)),
       "ssim_min": float(np.min(S))}
print(json.dumps(res))
