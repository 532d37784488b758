"""Held-out evaluation of ``mr-thinslice-4x`` (issue 12, item 3): thick -> thin slices vs cubic along Z.

Scans: the ``medldm demo`` scans (``medldm.demo.DEMO_SAMPLES``: mr-brain-s0, mr-abdomen, mr-shoulder), which no
shipped model trained on (neither this model nor the mr-denoise-2d VAE it uses), and dipy's ``test_piesno.nii.gz``
(``dipy-piesno``: diffusion MR, 96 x 96 x 14 at 1 mm; used by no shipped model). The demo scans are 2D slices (or
a stack of 53 mm-apart slices), so the axis thinned is a real high-resolution in-plane axis: each scan (X, Y, S)
is reformatted to (X, S, Y) (array axes permuted, affine columns with them: the same voxels in the same world
positions), so its Y axis becomes Z, and only the (X, Z) reformat is usable; piesno is reformatted to (Y, Z, X)
(X becomes Z), so both reformats run and are fused, as on a real thick-slice volume. Then the issue's protocol,
with the demo's conventions (``medldm demo`` runs the same references, degradation, baselines and metrics for its
"Thick -> thin slices x4" table, with the default model variant):

1. reference: ``medldm.demo.prepare_thinslice_references`` (the reformats above, Z cropped (centred) to a
   multiple of 4, scaled to [0, 1] by its own 0.5-99.5th percentiles);
2. ``medldm degrade --kind thick --level 4 --axis 2`` (box profile: the mean of 4 slices);
3. ``medldm baseline --task sr --scale 4 --axis through`` with ``bicubic`` (Keys cubic convolution, the "cubic
   along z"), ``bspline`` and ``linear``;
4. the model through ``medldm.pipelines.thinslice`` (what ``medldm enhance -m mr-thinslice-4x`` runs): LDM +
   refiner (the shipped default), LDM only (``refine=False``), and the refiner with its diffusion channel
   replaced by the interpolated input (an inference-time ablation: how much the refiner uses the diffusion
   output);
5. ``medldm evaluate --data-range 1 --axis 1``: PSNR/SSIM per 2D slice of the reformatted volume (the original
   image planes), averaged per scan.

    python docs/training_logs/mr-thinslice-4x/eval_heldout.py [-m MODEL] [-o runs/thinslice_eval]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medldm.demo import THIN_FACTOR as FACTOR


def _cli(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medldm", *args, "--quiet"], check=True)
    return time.perf_counter() - t0


def prepare(out: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Step 1 of the protocol: ``medldm.demo.prepare_thinslice_references`` (the one copy, shared with
    ``medldm demo``), written to OUT/ref."""
    from medldm.demo import prepare_thinslice_references
    from medldm.io.reader import load_scan

    refs = prepare_thinslice_references(out / "ref", names=names)
    for name, path in refs.items():
        print(f"{name}: reference {tuple(load_scan(path).shape)}")
    return refs


def run_model(model: str, out: Path, names: list[str], only: tuple[str, ...] = ()) -> dict[str, float]:
    from medldm.io.nifti import save_nifti
    from medldm.io.reader import load_scan
    from medldm.models import load_model
    from medldm.pipelines.enhance import EnhanceOptions
    from medldm.pipelines.thinslice import ThinSliceEnhancer
    from medldm.shipped import resolve_model

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    enh = ThinSliceEnhancer(load_model(resolve_model(model)))
    times["load"] = time.perf_counter() - t0

    variants = {"ldm+refiner": EnhanceOptions(), "ldm-only": EnhanceOptions(refine=False),
                "refiner-no-diffusion": EnhanceOptions()}
    for variant, opts in variants.items():
        if only and variant not in only:
            continue
        saved = enh.inner.refiner_uses_diffusion
        # the ablation: the refiner sees the interpolated input in place of the LDM output
        enh.inner.refiner_uses_diffusion = saved and variant != "refiner-no-diffusion"
        t0 = time.perf_counter()
        for name in names:
            img = load_scan(out / "thick" / f"{name}.nii.gz")
            res = enh.enhance(img, opts)
            res.image.meta["original_dtype"] = "float32"
            save_nifti(res.image, out / variant / f"{name}.nii.gz", dtype="float32")
            print(f"{variant} {name}: {tuple(img.shape)} -> {tuple(res.image.shape)}, axes {res.info.get('axes')}")
        times[variant] = time.perf_counter() - t0
        enh.inner.refiner_uses_diffusion = saved
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="mr-thinslice-4x")
    ap.add_argument("-o", "--out", default="runs/thinslice_eval")
    ap.add_argument("--scans", nargs="*", default=(), help="demo scan names (default: all three)")
    ap.add_argument("--variants", nargs="*", default=(), help="model variants to run (default: all three)")
    ap.add_argument("--reuse", action="store_true", help="keep OUT's references, inputs and baselines")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    times = dict(old.get("times_s", {}))
    if args.reuse and (out / "bicubic").is_dir():  # a second call for more variants: same references and inputs
        names = sorted(p.name.split(".")[0] for p in (out / "ref").glob("*.nii.gz"))
    else:
        names = sorted(prepare(out, tuple(args.scans)))
        times["degrade"] = _cli("degrade", "--kind", "thick", "--level", str(FACTOR), "--axis", "2",
                                str(out / "ref"), str(out / "thick"))
        for method in ("linear", "bicubic", "bspline"):
            times[method] = _cli("baseline", "--task", "sr", "--method", method, "--scale", str(FACTOR), "--axis",
                                 "through", "-i", str(out / "thick"), "-o", str(out / method))
    times.update(run_model(args.model, out, names, tuple(args.variants)))
    methods = [m for m in ("linear", "bicubic", "bspline", "ldm-only", "refiner-no-diffusion", "ldm+refiner")
               if (out / m).is_dir()]
    preds = [a for m in methods for a in ("--pred", f"{m}={out / m}")]
    _cli("evaluate", "--ref", str(out / "ref"), *preds, "--data-range", "1", "--axis", "1",
         "--slices-per-case", "1", "-o", str(out / "report"))
    table = _table(out / "report" / "metrics.csv")
    summary = {"times_s": times, "scans": names, "report": str(out / "report"), "data_range": 1.0,
               "methods": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["times_s"], indent=2))
    print("| method | " + " | ".join(names) + " | mean PSNR / SSIM |")
    print("|---|" + "---|" * (len(names) + 1))
    for m, row in table.items():
        cells = [f"{row['cases'][n]['psnr']:.2f} / {row['cases'][n]['ssim']:.3f}" for n in names]
        print(f"| {m} | " + " | ".join(cells) + f" | {row['psnr']:.2f} / {row['ssim']:.3f} |")
    return 0


def _table(metrics_csv: Path) -> dict[str, dict]:
    """method -> per-scan mean of the 2D slice PSNR/SSIM, and their mean over scans (the demo's convention)."""
    acc: dict[str, dict[str, list[tuple[float, float]]]] = {}
    with metrics_csv.open(newline="") as f:
        for r in csv.DictReader(f):
            if r["level"] == "slice":
                acc.setdefault(r["method"], {}).setdefault(r["case"], []).append((float(r["psnr"]), float(r["ssim"])))
    table = {}
    for m, cases in acc.items():
        per = {c: {"psnr": float(np.mean([v[0] for v in vals])), "ssim": float(np.mean([v[1] for v in vals]))}
               for c, vals in cases.items()}
        table[m] = {"psnr": float(np.mean([p["psnr"] for p in per.values()])),
                    "ssim": float(np.mean([p["ssim"] for p in per.values()])), "cases": per}
    return table


if __name__ == "__main__":
    raise SystemExit(main())
