"""Held-out evaluation of a denoising model against NLM and BM3D (issue 12, item 1): Gaussian AND Rician noise at
several levels, every method blind (each estimates the noise level itself), plus the model with the true level
(an oracle, to show what the estimate costs) and the ablation of the diffusion channel.

Scans: the ``medldm demo`` scans (``medldm.demo.DEMO_SAMPLES``: dipy's S0_10slices brain b0, pydicom-data's
abdomen MR and MR2_UNCI shoulder), never used to train any shipped model (docs/models.md), prepared as the demo
prepares them (``medldm.demo.prepare_references``: scaled to [0, 1] by their own 0.5-99.5th percentiles).
Protocol = the demo's: noise sigma relative to that range, seeded per (kind, level, scan); PSNR / SSIM per 2D
slice (data range 1), mean over a scan's slices, then over the scans.

Methods:
* ``nlm`` / ``bm3d``: ``medldm.eval.baselines.denoise_scan`` (sigma estimated: ``medldm.data.noise``);
* ``nlm-rician``: the unbiased NLM of Manjon et al. 2008 for magnitude MR, sqrt(max(NLM(y^2) - 2 s^2, 0)), with s
  estimated from y: NLM and BM3D assume zero-mean noise and keep the Rician bias (about 1.25 s in the background),
  which dominates their PSNR on Rician input;
* ``model``: ``medldm.shipped.enhance`` (= ``medldm enhance``; level estimated);
* ``model-oracle-level``: the same with the true level (``EnhanceOptions.noise_level``);
* ``refiner-no-diffusion``: the refiner with its diffusion channel replaced by the noisy input (same weights; an
  inference-time ablation: how much the latent diffusion output carries).

    python tools/eval_denoise_heldout.py [-m mr-denoise-2d] [-o runs/denoise_eval] [--levels 0.02 0.05 0.1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def psnr_ssim(pred, ref) -> tuple[float, float]:
    """Mean over the 2D slices (along Z) of PSNR / SSIM with data range 1."""
    from medldm.metrics import psnr, ssim

    p = torch.as_tensor(np.asarray(pred, np.float32)).permute(2, 0, 1)[:, None]
    r = torch.as_tensor(np.asarray(ref, np.float32)).permute(2, 0, 1)[:, None]
    return float(psnr(p, r, data_range=1.0).mean()), float(ssim(p, r, data_range=1.0).mean())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="mr-denoise-2d")
    ap.add_argument("-o", "--out", default="runs/denoise_eval")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.02, 0.05, 0.10])
    ap.add_argument("--kinds", nargs="+", default=["gaussian", "rician"])
    ap.add_argument("--methods", nargs="+", default=["nlm", "nlm-rician", "bm3d", "model", "model-oracle-level",
                                                     "refiner-no-diffusion"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    from medldm.data.degrade import gaussian_noise, rician_noise
    from medldm.demo import prepare_references
    from medldm.eval.baselines import denoise_scan
    from medldm.io.reader import load_scan
    from medldm.pipelines.enhance import EnhanceOptions
    from medldm.shipped import open_model

    out = Path(args.out)
    refs = {n: load_scan(p) for n, p in prepare_references(out, quick=False).items()}
    enh = open_model(args.model).runner
    level_max = enh.level_max
    uses_diffusion = enh.refiner_uses_diffusion

    rows = []
    for kind in args.kinds:
        add = gaussian_noise if kind == "gaussian" else rician_noise
        for level in args.levels:
            for i, (name, ref) in enumerate(refs.items()):
                seed = 1000 * args.kinds.index(kind) + 100 * args.levels.index(level) + i
                noisy = add(ref, level, seed)
                row = {"kind": kind, "level": level, "scan": name, "shape": list(ref.shape)}
                row["noisy"] = psnr_ssim(noisy, ref)
                for method in args.methods:
                    t0 = time.perf_counter()
                    if method in ("nlm", "bm3d"):
                        pred = denoise_scan(noisy, method)[0]
                    elif method == "nlm-rician":
                        from medldm.data.noise import estimate_noise_sigma
                        from medldm.eval.baselines import denoise

                        y = np.asarray(noisy, np.float64)
                        s2 = estimate_noise_sigma(y) ** 2
                        pred = np.sqrt(np.maximum(denoise(y**2, "nlm")[0].astype(np.float64) - 2 * s2, 0.0))
                    else:
                        opts = EnhanceOptions(noise_level=level / level_max if method == "model-oracle-level" else None)
                        # the ablation: the refiner sees the noisy input where the diffusion output would be
                        enh.refiner_uses_diffusion = uses_diffusion and method != "refiner-no-diffusion"
                        try:
                            res = enh.enhance(noisy, opts)
                        finally:
                            enh.refiner_uses_diffusion = uses_diffusion
                        pred = res.image
                        if method == "model":
                            row["estimated_level"] = res.info["noise_level"] * level_max
                    row[f"{method}_s"] = time.perf_counter() - t0
                    row[method] = psnr_ssim(pred, ref)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    methods = ["noisy", *args.methods]
    print("| noise | " + " | ".join(methods) + " | est. sigma |")
    print("|---|" + "---|" * (len(methods) + 1))
    for kind in args.kinds:
        for level in args.levels:
            sel = [r for r in rows if r["kind"] == kind and r["level"] == level]
            cells = [f"{np.mean([r[m][0] for r in sel]):.2f} / {np.mean([r[m][1] for r in sel]):.3f}" for m in methods]
            est = np.mean([r.get("estimated_level", np.nan) for r in sel])
            print(f"| {kind} {level:g} | " + " | ".join(cells) + f" | {est:.3f} |")
    times = {m: float(np.sum([r[f"{m}_s"] for r in rows])) for m in args.methods}
    print("wall time per method over all cases (s):", json.dumps({k: round(v, 1) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
