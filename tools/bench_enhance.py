"""End-to-end cost of `medldm enhance` on one volume: read -> enhance -> write, seconds and peak memory.

    python tools/bench_enhance.py -m MODEL -i SCAN [--steps 20] [--samples 1] [--device cpu|cuda]
                                  [--batch-size 8] [--threads 2] [--repeats 1]

Prints per stage seconds (read, enhance, write), voxels/s and peak memory: process RSS (CPU) and
``torch.cuda.max_memory_allocated`` (GPU). Issue 5 goal on an H100: a 512x512x300 CT denoised in <= 60 s.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-i", "--input", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from medldm.io.reader import load_scan
    from medldm.io.writer import save_scan
    from medldm.pipelines import EnhanceOptions
    from medldm.shipped import open_model

    enh = open_model(args.model, device=args.device).runner
    opts = EnhanceOptions(steps=args.steps, samples=args.samples, batch_size=args.batch_size, device=args.device)
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}; {platform.processor() or platform.machine()}; device {args.device}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f"; {torch.get_num_threads()} threads"))
    print(f"model {args.model}: {enh.task}, {enh.dims}D, sampler {opts.sampler or enh.dcfg.sampler}, "
          f"{args.steps} steps, {args.samples} sample(s)")
    for r in range(args.repeats):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        img = load_scan(args.input)
        t1 = time.perf_counter()
        res = enh.enhance(img, opts)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            save_scan(res.image, Path(tmp) / "out.nii.gz")
        t3 = time.perf_counter()
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        gpu = f", GPU peak {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else ""
        nvox = int(res.image.numel())
        print(f"run {r}: shape {tuple(img.shape)} -> {tuple(res.image.shape)}: read {t1 - t0:.2f} s, enhance "
              f"{t2 - t1:.2f} s, write {t3 - t2:.2f} s, total {t3 - t0:.2f} s ({nvox / (t3 - t0):.3g} voxel/s); "
              f"peak RSS {rss_gib:.2f} GiB{gpu}")


if __name__ == "__main__":
    main()
