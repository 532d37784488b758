"""Benchmark medldm.metrics against skimage, MONAI and torchmetrics, side by side in one run.

    python tools/bench_metrics.py --threads 1            # CPU (and CUDA when available)
    python tools/bench_metrics.py --threads 2 --device cpu

Images are real: 256x256 tiles of the pydicom-data head CT (693_UNCI.dcm, soft-tissue window mapped
to [0, 1]) and axial slices of the MNI152 T1 (nilearn), each with its own Gaussian noise (sigma 0.03);
3D: 64^3 crops of the MNI152 T1. All metrics use data_range=1.0 and an 11-tap Gaussian (sigma 1.5).
Throughput = images / median wall time of ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _pkg_file(pkg: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    return p if p.exists() else None


def real_images_2d(size: int) -> list[np.ndarray]:
    """Distinct real size x size images in [0, 1]: head-CT tiles and MNI152 axial slices."""
    out: list[np.ndarray] = []
    ct = _pkg_file("data_store", "data", "693_UNCI.dcm")
    if ct is not None:
        import pydicom
        from pydicom.pixels import apply_modality_lut

        ds = pydicom.dcmread(ct)
        hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        w = (np.clip(hu, -160, 240) + 160) / 400
        for i in range(0, w.shape[0] - size + 1, size // 2):
            for j in range(0, w.shape[1] - size + 1, size // 2):
                out.append(w[i : i + size, j : j + size])
    vol = mni_volume()
    if vol is not None:
        for z in range(40, vol.shape[2] - 40, 4):
            sl = np.zeros((size, size), np.float32)
            s = vol[:size, :size, z]
            sl[: s.shape[0], : s.shape[1]] = s
            out.append(sl)
    if not out:
        raise SystemExit("no real images: pip install pydicom-data or nilearn")
    return out


def mni_volume() -> np.ndarray | None:
    p = _pkg_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if p is None:
        return None
    import nibabel as nib

    return np.asarray(nib.load(p).dataobj, dtype=np.float32) / 255.0


def make_pairs(pool: list[np.ndarray], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, *shape) float32 (pred, ref): real references, each with its own noise."""
    rng = np.random.default_rng(seed)
    ref = np.stack([pool[i % len(pool)] for i in range(n)])[:, None]
    pred = ref + rng.normal(0.0, 0.03, ref.shape).astype(np.float32)
    return torch.from_numpy(pred), torch.from_numpy(ref)


def timed_round_robin(fns: dict[str, Callable[[], object]], repeats: int, sync: bool) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up call each, then ``repeats`` rounds that
    call every function once in turn (so load changes on a shared machine hit all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def contenders(nd: int, device: str) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from monai.metrics import SSIMMetric

    from medldm.metrics import psnr, ssim

    def ours(x, y):
        psnr(x, y, data_range=1.0)
        return ssim(x, y, data_range=1.0)

    monai_metric = SSIMMetric(
        spatial_dims=nd, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5
    )
    c: dict[str, Callable] = {
        "medldm ssim+psnr": ours,
        "medldm ssim (conv path)": lambda x, y: ssim(x, y, data_range=1.0, method="conv"),
        "monai SSIMMetric": lambda x, y: monai_metric(x, y).flatten(),
    }
    if device == "cuda":
        del c["medldm ssim (conv path)"]
    if importlib.util.find_spec("torchmetrics") is not None:
        from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

        c["torchmetrics ssim"] = lambda x, y: tm_ssim(x, y, data_range=1.0, reduction="none")
    return c


def bench(title: str, pred: torch.Tensor, ref: torch.Tensor, device: str, repeats: int, sk_n: int) -> None:
    """Print images/s of every contender on one batch, with the speed-up of medldm over each and
    the largest SSIM difference to medldm (a check that all compute the same thing)."""
    nd = pred.ndim - 2
    x, y = pred.to(device), ref.to(device)
    count: dict[str, int] = {}
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for name, fn in contenders(nd, device).items():
        fns[name] = lambda fn=fn: fn(x, y).float().cpu()
        count[name] = x.shape[0]
    if device == "cpu" and sk_n:
        from skimage.metrics import structural_similarity

        xs, ys = pred[:sk_n, 0].numpy(), ref[:sk_n, 0].numpy()

        def sk() -> torch.Tensor:
            return torch.tensor(
                [
                    structural_similarity(
                        b, a, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
                    )
                    for a, b in zip(xs, ys, strict=True)
                ]
            ).float()

        fns["skimage SSIM (float32, 1 thread)"] = sk
        count["skimage SSIM (float32, 1 thread)"] = len(xs)
    sec = timed_round_robin(fns, repeats, device == "cuda")
    ours = fns["medldm ssim+psnr"]()
    base = count["medldm ssim+psnr"] / sec["medldm ssim+psnr"]
    print(f"\n{title}  [{device}, batch {x.shape[0]}, median of {repeats}]")
    for name, fn in fns.items():
        ips = count[name] / sec[name]
        got = fn()
        diff = (got - ours[: len(got)]).abs().max().item()
        print(f"  {name:34s} {ips:10.1f} images/s   medldm x{base / ips:6.2f}   max|dSSIM| {diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="2D batch on CPU (CUDA uses --cuda-batch)")
    ap.add_argument("--cuda-batch", type=int, default=512)
    ap.add_argument("--vol", type=int, default=64, help="3D edge length")
    ap.add_argument("--vol-batch", type=int, default=4, help="3D batch on CPU (CUDA: 8x)")
    ap.add_argument("--skimage-n", type=int, default=16, help="images timed with skimage (0: skip)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"torch {torch.__version__}, CPU {cpu}, torch threads {torch.get_num_threads()}, "
        f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
    )
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    pool2 = real_images_2d(args.size)
    vol = mni_volume()
    for dev in devices:
        b = args.batch if dev == "cpu" else args.cuda_batch
        p, r = make_pairs(pool2, b)
        bench(f"2D {args.size}x{args.size}", p, r, dev, args.repeats, args.skimage_n)
        if vol is not None:
            e = args.vol
            rng = np.random.default_rng(1)
            crops = []
            for _ in range(16):
                i, j, k = (int(rng.integers(20, s - e - 20)) for s in vol.shape)
                crops.append(vol[i : i + e, j : j + e, k : k + e])
            p, r = make_pairs(crops, args.vol_batch if dev == "cpu" else 8 * args.vol_batch)
            bench(f"3D {e}^3", p, r, dev, args.repeats, min(args.skimage_n, 4))


if __name__ == "__main__":
    main()
