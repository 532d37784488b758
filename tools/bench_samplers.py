"""How many sampler steps reach the 1000-step result on enhancement (issue 5, section 3: goal <= 20 steps).

    python tools/bench_samplers.py -m MODEL -i SCAN [--steps 2,5,10,20,50] [--ref-steps 1000] [--slices 4]

MODEL is an sr/denoise model folder (`medldm train`); SCAN a clean real scan (NIfTI/DICOM). Central slices
(2D models) or a centred crop (3D models) are normalized like training, degraded with the training recipe at a
fixed level (``medldm.data.condition.make_pair``: denoise = middle of ``level_range``, sr = lowest
noise-augmentation level) and enhanced with each sampler and step count from the same start noise. Printed: PSNR
against the clean image (model range [-1, 1], data_range 2), its distance to the ``--ref-steps`` DDIM result,
and the fewest steps within 0.2 dB of it per sampler.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-i", "--input", required=True)
    ap.add_argument("--steps", default="2,5,10,20,50")
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--slices", type=int, default=4, help="2D models: central slices used")
    ap.add_argument("--crop", type=int, default=64, help="in-plane crop (pixels; 3D: cube side)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from medldm.data.condition import make_pair
    from medldm.data.intensity import fit_normalization, normalize
    from medldm.io import load_scan
    from medldm.metrics import psnr
    from medldm.pipelines.enhance import EnhanceOptions, _pad_to
    from medldm.shipped import open_model

    enh = open_model(args.model, device=args.device).runner
    img = load_scan(args.input)
    params = fit_normalization(img, enh.modality, window=enh.ct_window, foreground=True)
    x = torch.as_tensor(normalize(img, params)).float()
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    c = args.crop
    if enh.dims == 2:
        vol = torch.movedim(x, enh.slice_axis, 0)
        mid = vol.shape[0] // 2
        sl = vol[max(mid - args.slices // 2, 0) : max(mid - args.slices // 2, 0) + args.slices]
        h0, w0 = max((sl.shape[1] - c) // 2, 0), max((sl.shape[2] - c) // 2, 0)
        clean = sl[:, h0 : h0 + c, w0 : w0 + c][:, None]
    else:
        starts = [max((s - c) // 2, 0) for s in x.shape]
        clean = x[tuple(slice(s, s + c) for s in starts)][None, None]
    clean = _pad_to(clean, tuple(-(-s // enh.align) * enh.align for s in clean.shape[2:]))
    deg = SimpleNamespace(**{"kind": "gaussian", "scale": 2, "level_range": [0.02, 0.1], "noise_aug_range": [0.0, 0.1],
                             **enh.degrade})
    sigma = sum(deg.level_range) / 2 if enh.task == "denoise" else deg.noise_aug_range[0]
    degraded, level = make_pair(clean, enh.task, deg, torch.Generator().manual_seed(0), sigma)
    lev = float(level[0]) if enh.denoiser.noise_level_cond else None
    keys = list(range(clean.shape[0]))

    def run(sampler: str, steps: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        out, _ = enh._sample_items(degraded, keys, lev, EnhanceOptions(sampler=sampler, steps=steps, seed=0))
        return float(psnr(out, clean, data_range=2.0).mean()), time.perf_counter() - t0

    print(f"model {args.model} ({enh.task}, {enh.dims}D, schedule {enh.dcfg.schedule}/{enh.dcfg.prediction}); "
          f"scan {args.input}; {clean.shape[0]} item(s) {tuple(clean.shape[2:])}; device {args.device}")
    print(f"degraded input PSNR {float(psnr(degraded, clean, data_range=2.0).mean()):.2f} dB")
    ref, secs = run("ddim", args.ref_steps)
    print(f"reference: DDIM {args.ref_steps} steps: {ref:.3f} dB ({secs:.1f} s)")
    samplers = ["ddim", "dpmpp_2m", "unipc"] + (["euler_flow"] if enh.dcfg.schedule == "flow" else [])
    steps = [int(s) for s in args.steps.split(",")]
    print(f"{'sampler':<11}" + "".join(f"{s:>16}" for s in steps) + "   fewest steps within 0.2 dB")
    for name in samplers:
        cells, best = [], None
        for s in steps:
            p, _ = run(name, s)
            cells.append(f"{p:7.2f} ({p - ref:+.2f})")
            if best is None and abs(p - ref) <= 0.2:
                best = s
        print(f"{name:<11}" + "".join(f"{c:>16}" for c in cells) + f"   {best if best is not None else '> ' + str(steps[-1])}")


if __name__ == "__main__":
    main()
