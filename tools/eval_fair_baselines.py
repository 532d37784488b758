"""The shipped denoiser against fair classical baselines on volumes (issue 22, item 4): BM4D and BM3D (each with
the exact Rician bias correction on magnitude data), ANTs ``DenoiseImage`` (Rician or Gaussian model), dipy
``nlmeans`` (its Rician mode), on Gaussian 5 %, Rician 5 % and Rician 10 % noise, every method told the true
level (``--blind``: every method estimates it). ANTs takes no level either way (it estimates it locally).

Volumes (each scaled to [0, 1] by its maximum; noise sigma relative to that; one seed per case):

* ``mni-t1``: a 1 mm T1 crop of nilearn's MNI152 2009a template (an average of 152 brains). It is the only 1 mm
  T1 volume the registries ship, and it is IN THE TRAINING SET of every shipped model (configs/shipped/*.yaml):
  the comparison favours the model there;
* ``s0-brain``: dipy's S0_10slices (a real brain b0, 128 x 128 x 10), a ``medldm demo`` scan that no shipped
  model trained on (held out);
* ``ge-epi``: volume 0 of a GE fMRI EPI series (64 x 64 x 15, 3.75 x 3.75 x 5 mm; tests/data/vendor, from
  dcm2niix's dcm_qa_nih, BSD-2): a scanner and subject no shipped model trained on (held out). An EPI has noise of
  its own: the reference is the scan as acquired.

Models: ``--models`` takes shipped names or model folders, each optionally with ``+adapt=N`` (``--adapt`` with
``N`` optimizer steps, repeatable: ``medldm enhance --adapt-steps N``), e.g.
``--models mr-denoise-2d runs/mr-denoise-25d/model runs/mr-denoise-25d/model+adapt=150``.

PSNR over the whole volume (data range 1; the issue 22 convention), SSIM the mean over the 2D slices. Wall time
and CPU time per method (the table shows CPU seconds: wall time depends on the load of the shared machine); run
with OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 so every method uses one core.

    nice python tools/eval_fair_baselines.py [--crop 96 112 16] [--scans mni-t1 s0-brain] [--blind] [-o runs/fair_baselines]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medldm.data.datasets import resolve_path
from medldm.data.degrade import gaussian_noise, rician_noise
from medldm.eval.baselines import denoise
from medldm.io.reader import load_scan
from medldm.metrics import ssim
from medldm.pipelines.enhance import EnhanceOptions, Enhancer
from medldm.shipped import open_model

MNI = "pkg://nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
S0 = "pkg://dipy/data/files/S0_10slices.nii.gz"
GE_EPI = Path(__file__).parents[1] / "tests" / "data" / "vendor" / "dcm_qa_nih_ge_epi"
CASES = (("gaussian", 0.05), ("rician", 0.05), ("rician", 0.10))
METHODS = ("bm4d", "bm3d", "ants", "nlm-dipy", "model")


def parse_model(spec: str) -> tuple[str, int | None]:
    """'NAME_OR_FOLDER[+adapt=N]' -> (model, adapt steps or None)."""
    name, _, rest = spec.partition("+adapt=")
    return name, int(rest) if rest else None


def volumes(crop: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """name -> clean volume (X, Y, Z) scaled to [0, 1] by its maximum."""
    mni = np.asarray(nib.load(resolve_path(MNI)).dataobj, np.float64)
    c = [(n - k) // 2 for n, k in zip(mni.shape, crop, strict=True)]
    mni = mni[c[0]:c[0] + crop[0], c[1]:c[1] + crop[1], c[2]:c[2] + crop[2]]
    s0 = np.asarray(nib.load(resolve_path(S0)).dataobj, np.float64).reshape(128, 128, 10)
    epi = np.asarray(load_scan(GE_EPI, volume=0), np.float64)
    return {"mni-t1": mni / mni.max(), "s0-brain": s0 / s0.max(), "ge-epi": epi / epi.max()}


def psnr_ssim(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    mse = float(np.mean((np.asarray(pred, np.float64) - ref) ** 2))
    p = torch.as_tensor(np.asarray(pred, np.float32)).permute(2, 0, 1)[:, None]
    r = torch.as_tensor(ref.astype(np.float32)).permute(2, 0, 1)[:, None]
    return 10 * np.log10(1 / mse), float(ssim(p, r, data_range=1.0).mean())


def told(enh: Enhancer, noisy: np.ndarray, level: float, blind: bool) -> float | None:
    """The model's noise-level input for the true sigma ``level``: sigma relative to the range the enhancer
    normalizes the scan to (its own fit), over the model's level_max. None when blind (the enhancer estimates)."""
    if blind:
        return None
    params = enh._fit_normalization(torch.as_tensor(noisy, dtype=torch.float32), noisy, np.zeros(noisy.shape, bool))
    return level / (float(params["hi"]) - float(params["lo"])) / enh.level_max


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, nargs=3, default=[96, 112, 16], help="MNI crop (X Y Z), centred")
    ap.add_argument("--blind", action="store_true", help="every method estimates the level (default: told)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--scans", nargs="+", default=["mni-t1", "s0-brain"])
    ap.add_argument("-m", "--models", nargs="+", default=["mr-denoise-2d"],
                    help="shipped names or folders, each optionally +adapt=N (N adaptation steps)")
    ap.add_argument("-o", "--out", default="runs/fair_baselines")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runners = {m: open_model(m).runner for m in {parse_model(s)[0] for s in args.models}}
    methods = [m for m in args.methods if m != "model"] + (list(args.models) if "model" in args.methods else [])
    rows = []
    for name, ref in volumes(tuple(args.crop)).items():
        if name not in args.scans:
            continue
        for ci, (kind, level) in enumerate(CASES):
            add = gaussian_noise if kind == "gaussian" else rician_noise
            noisy = np.asarray(add(ref, level, 100 + ci, relative=False), np.float64)
            row = {"scan": name, "shape": list(ref.shape), "noise": kind, "level": level,
                   "noisy": psnr_ssim(noisy, ref)}
            for method in methods:
                t0, c0 = time.perf_counter(), time.process_time()
                if method in args.models:
                    model, steps = parse_model(method)
                    enh = runners[model]
                    img = MetaTensor(torch.as_tensor(noisy, dtype=torch.float32), affine=torch.eye(4))
                    opts = EnhanceOptions(noise_level=told(enh, noisy, level, args.blind), adapt_steps=steps)
                    pred = np.asarray(enh.enhance(img, opts).image)
                else:
                    pred = denoise(noisy, method, sigma=None if args.blind else level, dims=2, noise=kind)[0]
                row[f"{method}_s"] = round(time.perf_counter() - t0, 1)
                row[f"{method}_cpu_s"] = round(time.process_time() - c0, 1)
                row[method] = psnr_ssim(pred, ref)
                print(f"{name} {kind} {level:g} {method}: {row[method][0]:.2f} dB ({row[f'{method}_cpu_s']} s CPU, "
                      f"{row[f'{method}_s']} s wall)",
                      flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rows_{'_'.join(args.scans)}.json").write_text(json.dumps({"blind": args.blind, "crop": args.crop, "rows": rows}, indent=1))
    cols = ["noisy", *methods]
    print(f"\nlevels: {'blind (each method estimates it)' if args.blind else 'told (the true level)'}; "
          "PSNR dB over the volume / SSIM (mean over slices) (CPU seconds)")
    print("| scan | noise | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[m][0]:.2f} / {r[m][1]:.3f}" + (f" ({r[m + '_cpu_s']:.0f} s)" if m != "noisy" else "")
                 for m in cols]
        print(f"| {r['scan']} {'×'.join(map(str, r['shape']))} | {r['noise']} {r['level']:g} | " + " | ".join(cells)
              + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
