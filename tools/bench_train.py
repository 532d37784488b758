"""Training throughput: medldm's engine vs the MONAI-tutorial recipe, same networks, same run.

    python tools/bench_train.py                       # all three cases, sizes picked for the device
    python tools/bench_train.py --case unet2d --size 64 --batch 32 --steps 50 --compile

Recipe ("MONAI tutorial"): PyTorch defaults (Adam, contiguous NCHW, eager), fp16 autocast + GradScaler on
GPU, fp32 on CPU, MONAI ``DDPMScheduler`` noise for the U-Net, math attention.
medldm: ``medldm.train.engine`` runtime — bf16 autocast (GPU), channels-last, fused AdamW, flash attention
(MONAI ``use_flash_attention``), TF32, optional ``torch.compile``; medldm's loss functions.
Both train on the same synthetic batches (throughput, not quality). FLOPs per step are counted with
``torch.utils.flop_counter``; MFU = achieved FLOP/s / ``--peak-tflops`` (GPU only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medldm.models import UNetConfig, VAEConfig, build_denoiser, build_vae  # noqa: E402

CASES = {
    # name: (kind, spatial_dims, GPU size/batch, CPU size/batch)
    "vae2d": ("vae", 2, (256, 16), (64, 4)),
    "unet2d": ("unet", 2, (64, 32), (16, 8)),
    "vae3d": ("vae", 3, (96, 2), (32, 1)),
}


def networks(kind: str, nd: int, gpu: bool, flash: bool):
    if kind == "vae":
        ch = (64, 128, 128) if nd == 2 else (32, 64, 64)
        cfg = VAEConfig(spatial_dims=nd, channels=ch if gpu else (32, 64, 64), latent_channels=4 if nd == 2 else 3,
                        attention_levels=(False,) * 3, num_res_blocks=2 if nd == 2 else 1,
                        norm_num_groups=32, use_flash_attention=flash)
        return build_vae(cfg)
    cfg = UNetConfig(channels=(128, 256, 512) if gpu else (32, 64, 64), attention_levels=(False, True, True),
                     num_res_blocks=2, num_head_channels=64 if gpu else 32, norm_num_groups=32,
                     use_flash_attention=flash)
    return build_denoiser(cfg, nd, 4)


def make_step(kind: str, model, opt, *, autocast, scaler, medldm_losses: bool):
    """One optimiser step on batch x; returns a closure."""
    if kind == "vae":
        from medldm.train.vae_stage import kl_loss

        def step(x):
            opt.zero_grad(set_to_none=True)
            with autocast():
                recon, mu, sigma = model(x)
                if medldm_losses:
                    loss = (recon.float() - x.float()).abs().mean() + 1e-6 * kl_loss(mu, sigma)
                else:  # tutorial: L1 + KL summed over latent dims, mean over batch
                    kl = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1, dim=list(range(1, mu.ndim)))
                    loss = F.l1_loss(recon.float(), x.float()) + 1e-6 * kl.sum() / kl.shape[0]
            _backward(loss, opt, scaler)
        return step

    if medldm_losses:
        from medldm.diffusion import DiffusionConfig, diffusion_loss, make_schedule

        sched = make_schedule(DiffusionConfig(prediction="v"))
        gen = torch.Generator().manual_seed(0)

        def step(z):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = diffusion_loss(model, sched, z, generator=gen)
            _backward(loss, opt, scaler)
        return step

    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = model.unet  # the plain MONAI U-Net, as the tutorial uses it

    def step(z):
        opt.zero_grad(set_to_none=True)
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (z.shape[0],), device=z.device).long()
        with autocast():
            noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
            pred = unet(noisy, t)
            loss = F.mse_loss(pred.float(), noise.float())
        _backward(loss, opt, scaler)
    return step


def _backward(loss, opt, scaler):
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def count_flops(step, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(x)
    return float(fc.get_total_flops())


def build_variant(name: str, variant: str, args, device: torch.device):
    """(step closure, batch, meta) for one variant of a case."""
    kind, nd, gpu_sb, cpu_sb = CASES[name]
    gpu = device.type == "cuda"
    size, batch = (args.size or (gpu_sb if gpu else cpu_sb)[0]), (args.batch or (gpu_sb if gpu else cpu_sb)[1])
    torch.manual_seed(0)
    medldm_v = variant == "medldm"
    model = networks(kind, nd, gpu, flash=medldm_v and gpu).to(device)
    ch = 1 if kind == "vae" else 4
    x = torch.randn(batch, ch, *([size] * nd), device=device)
    if medldm_v:
        from medldm.config import from_mapping
        from medldm.train.engine import adamw, make_runtime, prepare
        from medldm.train.schema import EngineConfig

        rt = make_runtime(from_mapping(EngineConfig, {"compile": args.compile, "progress": False}))
        wrapped = prepare(model, rt, ddp=False)
        opt = adamw(model.parameters(), 1e-4, 0.0, rt)
        x = rt.to(x)
        step = make_step(kind, wrapped, opt, autocast=rt.autocast, scaler=None, medldm_losses=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda") if gpu else None
        ac = (lambda: torch.autocast("cuda", dtype=torch.float16)) if gpu else contextlib.nullcontext
        step = make_step(kind, model, opt, autocast=ac, scaler=scaler, medldm_losses=False)
    flops = count_flops(step, x) if not (medldm_v and args.compile) else float("nan")
    for _ in range(args.warmup):
        step(x)
    return step, x, {"case": name, "variant": variant, "size": size, "batch": batch, "flops": flops}


def time_steps(step, x, n: int, gpu: bool) -> float:
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step(x)
    sync()
    return time.perf_counter() - t0


def run_case(name: str, args, device: torch.device) -> dict[str, dict]:
    """Both variants, timed in alternating rounds (ABAB...) so load changes hit both; best round reported."""
    gpu = device.type == "cuda"
    built = {v: build_variant(name, v, args, device) for v in ("recipe", "medldm")}
    best = {v: float("inf") for v in built}
    for _ in range(args.repeats):
        for v, (step, x, _) in built.items():
            best[v] = min(best[v], time_steps(step, x, args.steps, gpu))
    out = {}
    for v, (_, _, meta) in built.items():
        dt = best[v]
        res = {**meta, "img_per_s": meta["batch"] * args.steps / dt, "gflop_per_step": meta["flops"] / 1e9,
               "tflop_per_s": meta["flops"] * args.steps / dt / 1e12}
        res.pop("flops")
        if gpu:
            res["mfu"] = res["tflop_per_s"] / args.peak_tflops
        out[v] = res
    if gpu:
        out["medldm"]["peak_mem_gib_both"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--size", type=int, default=0, help="image (or latent) side; 0 = per-device default")
    p.add_argument("--batch", type=int, default=0, help="batch size; 0 = per-device default")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 30 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 10 GPU, 2 CPU)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed rounds per variant (best kept)")
    p.add_argument("--compile", action="store_true", help="torch.compile the medldm variant")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="peak bf16 TFLOP/s for MFU (H100 ~800 measured)")
    p.add_argument("--json", type=Path, help="also write results here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    args.steps = args.steps or (30 if gpu else 5)
    args.warmup = args.warmup or (10 if gpu else 2)
    name = torch.cuda.get_device_name() if gpu else f"CPU ({args.threads} threads)"
    print(f"device: {name}; torch {torch.__version__}; best of {args.repeats} alternating rounds of {args.steps} "
          f"steps after {args.warmup} warm-up")
    results = []
    for case in (CASES if args.case == "all" else [args.case]):
        pair = run_case(case, args, device)
        for r in pair.values():
            mfu = f", MFU {100 * r['mfu']:.1f} %" if "mfu" in r else ""
            print(f"{case:7s} {r['variant']:7s} {r['size']}^{CASES[case][1]} b{r['batch']}: {r['img_per_s']:8.2f} img/s"
                  f"  {r['gflop_per_step']:9.2f} GFLOP/step  {r['tflop_per_s']:.3f} TFLOP/s{mfu}")
        ratio = pair["medldm"]["img_per_s"] / pair["recipe"]["img_per_s"]
        print(f"{case:7s} ratio medldm / recipe = {ratio:.2f}x")
        results.append({"case": case, "ratio": ratio, **pair})
        if gpu:
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"device": name, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
