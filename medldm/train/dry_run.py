"""``medldm train CONFIG -o OUT --dry-run``: check a config end to end in seconds, and measure it.

:func:`dry_run` validates the config (already done by ``load_config``), lists the training / validation scans,
loads ONE training scan (a cut-down of the run's data loading: same normalization, same items, same crops and
augmentation), builds every network of the stages the config asks for, and runs one optimiser step per stage
(after one warm-up step) on one batch. It reports parameter counts, the step time, the peak memory
(``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident memory growth, ``VmHWM`` of
``/proc/self/status`` after resetting it by writing ``5`` to ``/proc/self/clear_refs``) and an estimate of the wall
time (steps x step time x gradient accumulation; validation, latent encoding and checkpoints come on top).

Nothing is written: no model, no checkpoint, and OUT is not created. The LDM and refiner steps run on the
freshly built (untrained) VAE / U-Net: the cost of a step does not depend on the weights.

:func:`measure_stages` is the part :mod:`medldm.plan.memory` reuses on a synthetic batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from medldm.data.augment import Augmenter
from medldm.data.condition import make_pair
from medldm.data.datasets import load_volumes, step_rng
from medldm.data.tissue import tissue_labels
from medldm.diffusion import diffusion_loss, make_model_fn, make_schedule, sample, start_noise
from medldm.models import build_denoiser, load_model
from medldm.models.conditioning import space_to_depth
from medldm.models.denoiser import mask_condition
from medldm.models.refiner import apply_refiner, build_from_spec
from medldm.train.data import RunData, item_store, split_refs
from medldm.train.distributed import cleanup
from medldm.train.engine import Runtime, adamw, make_runtime, prepare
from medldm.train.ldm_stage import stage_sampler
from medldm.train.refine_stage import refiner_spec_of
from medldm.train.sizes import check_sizes
from medldm.train.vae_stage import VAEStage


# ------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Measure the peak memory of the block: yields a dict whose ``bytes`` (peak growth) and ``how`` are set on
    exit. CUDA: ``max_memory_allocated`` above what was allocated at the start; CPU: peak RSS growth."""
    out: dict[str, Any] = {"bytes": None, "how": ""}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["bytes"] = int(torch.cuda.max_memory_allocated(device) - start)
        out["how"] = "torch.cuda.max_memory_allocated"
        return
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    rss0 = _status_kib("VmRSS")
    yield out
    hwm = _status_kib("VmHWM")
    if reset and rss0 is not None and hwm is not None:
        out["bytes"] = max(0, hwm - rss0) * 1024
        out["how"] = "peak RSS growth (/proc/self/status VmHWM)"
    else:
        out["how"] = "unavailable (no /proc/self/clear_refs)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def n_params(*mods: torch.nn.Module) -> int:
    return int(sum(p.numel() for m in mods for p in m.parameters()))


# ------------------------------------------------------------------------------------------ steps
def _timed_steps(step_fn, device: torch.device, warmup: int = 1, timed: int = 1) -> tuple[float, dict]:
    """Run ``step_fn`` ``warmup`` times, then ``timed`` times under the memory probe: (seconds per step, probe)."""
    with peak_memory(device) as mem:
        for _ in range(warmup):
            step_fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(timed):
            step_fn()
        _sync(device)
        dt = (time.perf_counter() - t0) / max(timed, 1)
    return dt, mem


def _optim_step(loss: torch.Tensor, opt: torch.optim.Optimizer, clip: float) -> None:
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if clip > 0 and params:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_stages(cfg, rt: Runtime, clean: torch.Tensor, labels: torch.Tensor | None = None, *,
                   stages: tuple[str, ...] | None = None, warmup: int = 1, timed: int = 1,
                   vae: torch.nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """One optimiser step (after ``warmup``) of each stage on the CPU batch ``clean`` (B, 1, *patch) in the model
    range: ``{stage: {"params", "step_s", "peak_bytes", "memory_how"}}``. ``vae``: a trained VAE to use for the
    LDM / refine steps (default: the freshly built one)."""
    if stages is None:
        stages = tuple(s for s, on in (("vae", cfg.stage in ("vae", "both")), ("ldm", cfg.stage in ("ldm", "both")),
                                       ("refine", cfg.stage in ("ldm", "both", "refine") and cfg.refine.enabled)) if on)
    out: dict[str, dict[str, Any]] = {}
    x = rt.to(clean)
    torch.manual_seed(cfg.seed)
    vstage = VAEStage(cfg, None, rt)
    if "vae" in stages:
        opt = vstage.optimizers["vae"]

        def vae_step():
            with rt.autocast():
                loss = vstage.losses(x, max(cfg.vae_train.adv_start, 0))["loss"]
            _optim_step(loss, opt, cfg.vae_train.grad_clip)
            if "discriminator" in vstage.optimizers:
                vstage.optimizers["discriminator"].step()
                vstage.optimizers["discriminator"].zero_grad(set_to_none=True)

        dt, mem = _timed_steps(vae_step, rt.device, warmup, timed)
        out["vae"] = {"params": n_params(*vstage.modules.values()), "step_s": dt, "peak_bytes": mem["bytes"],
                      "memory_how": mem["how"]}
    if not ({"ldm", "refine"} & set(stages)):
        return out
    net_vae = (vae if vae is not None else vstage.vae).to(rt.device).eval().requires_grad_(False)
    vstage = None  # free the VAE stage (its optimizer) before the next stage
    f = cfg.factor
    schedule = make_schedule(cfg.diffusion)
    gen = torch.Generator().manual_seed(cfg.seed)
    cond = level = degraded = None
    if cfg.task != "synthesis":
        degraded, lev = make_pair(clean.float(), cfg.task, cfg.degrade, gen)
        cond = rt.to(space_to_depth(degraded, f))
        level = lev.to(rt.device) if cfg.unet.noise_level_cond else None
    elif getattr(cfg, "condition", None) == "mask":  # tissue label maps of the batch, as the LDM stage derives them
        classes = int(cfg.data.mask_classes)
        maps = torch.stack([tissue_labels(c[0], classes) for c in clean.float().cpu()])
        cond = rt.to(mask_condition(maps, classes, f))
    with torch.no_grad(), rt.autocast():
        mu, sigma = net_vae.encode(x)
        z = (mu + sigma * torch.randn_like(sigma)).float()
    lab = labels.to(rt.device) if labels is not None and cfg.unet.num_classes else None
    run_unet = dataclasses.replace(cfg.unet, use_flash_attention=cfg.unet.use_flash_attention or rt.flash_attention)
    torch.manual_seed(cfg.seed)
    denoiser = build_denoiser(run_unet, cfg.spatial_dims, cfg.vae.latent_channels)
    wrapped = prepare(denoiser, rt, ddp=False)
    if "ldm" in stages:
        opt = adamw(denoiser.parameters(), cfg.ldm_train.lr, cfg.ldm_train.weight_decay, rt)

        def ldm_step():
            with rt.autocast():
                loss = diffusion_loss(wrapped, schedule, z, cond=cond, class_labels=lab, noise_level=level,
                                      generator=torch.Generator().manual_seed(1))
            _optim_step(loss, opt, cfg.ldm_train.grad_clip)

        dt, mem = _timed_steps(ldm_step, rt.device, warmup, timed)
        out["ldm"] = {"params": n_params(denoiser), "step_s": dt, "peak_bytes": mem["bytes"],
                      "memory_how": mem["how"], "latent_shape": list(z.shape)}
    if "refine" in stages and degraded is not None:
        denoiser.eval().requires_grad_(False)
        spec = refiner_spec_of(cfg)
        torch.manual_seed(cfg.seed)
        refiner = build_from_spec(spec)
        rwrapped = prepare(refiner, rt, ddp=False)
        opt = adamw(refiner.parameters(), cfg.refine.lr, cfg.refine.weight_decay, rt)
        deg = rt.to(degraded)
        # a 2.5D refiner's neighbouring slices: the batch's own slice stands in for them (same cost per step)
        ctx = deg.repeat(1, 2 * spec.context, *([1] * (deg.ndim - 2))) if spec.context else None

        def refine_step():
            with torch.no_grad():
                fn = make_model_fn(denoiser, schedule, cond=cond, noise_level=level)
                g = torch.Generator().manual_seed(2)
                x_t = start_noise(tuple(z.shape), schedule, generator=g).to(rt.device)
                with rt.autocast():
                    zz = sample(stage_sampler(cfg.diffusion), lambda a, t: fn(a, t).float(), x_t, schedule,
                                cfg.diffusion.sampling_steps, generator=g)
                    decoded = net_vae.decode(zz).float()
            with rt.autocast():
                pred = apply_refiner(rwrapped, decoded, deg, spec.base, level if spec.noise_map else None, ctx).float()
                loss = (pred - x.float()).abs().mean()
            _optim_step(loss, opt, cfg.refine.grad_clip)

        dt, mem = _timed_steps(refine_step, rt.device, warmup, timed)
        out["refine"] = {"params": n_params(refiner), "step_s": dt, "peak_bytes": mem["bytes"],
                         "memory_how": mem["how"], "sampling_steps": cfg.diffusion.sampling_steps}
    return out


# ------------------------------------------------------------------------------------------ the dry run
def _one_scan_data(cfg, max_scans: int = 1):
    """(train refs, val refs, RunData holding the items of the first ``max_scans`` readable training scans)."""
    d = cfg.data
    train_refs, val_refs = split_refs(cfg)
    kw = {"modality": d.modality, "ct_window": d.ct_window, "cache": "memory"}
    vols = []
    for r in train_refs:  # the first readable scans (load_volumes skips broken ones with a warning)
        try:
            vols += load_volumes([r], **kw)
        except Exception:  # noqa: BLE001 - try the next scan; none readable is reported below
            continue
        if len(vols) >= max_scans:
            break
    if not vols:
        raise ValueError("data.train: no readable training scan")
    store = item_store(cfg, vols)
    return train_refs, val_refs, RunData(store, None, [v["id"] for v in vols], [], [v["norm"] for v in vols])


def estimate_wall_s(cfg, stage_figures: dict[str, dict]) -> float:
    """Seconds of optimiser steps for the whole run: sum over stages of steps x grad_accum x step time."""
    tcfg = {"vae": cfg.vae_train, "ldm": cfg.ldm_train, "refine": cfg.refine}
    return float(sum(tcfg[s].steps * tcfg[s].grad_accum * f["step_s"] for s, f in stage_figures.items()))


def tiny_variant(cfg):
    """A copy of ``cfg`` for a quick check: batch 1, the smallest patch the networks accept, one sampling step, no
    discriminator step. Same networks (parameter counts), same data path; its step times are not the run's."""
    c = copy.deepcopy(cfg)
    c.data.batch_size = 1
    side = c.factor * 2 ** len(c.unet.channels)  # the U-Net bottom keeps 2 latent voxels a side
    c.data.patch_size = tuple(max(side, 32) for _ in c.data.patch_size)  # the refiner pools 4 times
    if c.data.resize_to is not None:
        c.data.resize_to = tuple(max(r, p) for r, p in zip(c.data.resize_to, c.data.patch_size, strict=True))
    c.diffusion.sampling_steps = 1
    c.vae_train.adv_start = 2**31  # the discriminator is built (counted) but not run: it needs larger patches
    return c


def dry_run(cfg, out_dir: str | Path | None = None, *, tiny: bool = False) -> dict[str, Any]:
    """Validate, build, load one batch, run one step per stage; returns the figures (see the module doc).
    ``tiny``: run :func:`tiny_variant` of the config without a warm-up step (a check, not a measurement)."""
    t_start = time.perf_counter()
    check_sizes(cfg)  # the config as written, before anything is built
    full = cfg
    if tiny:
        cfg = tiny_variant(cfg)
    rt = make_runtime(cfg.engine)
    try:
        train_refs, val_refs, data = _one_scan_data(cfg)
        rng = step_rng(cfg.seed, 0, 0, 0)
        idx, corners = data.train.draw(rng, cfg.data.batch_size)
        clean = data.train.crop(idx, corners)
        if cfg.augment.enabled:
            clean = Augmenter(cfg.augment, cfg.spatial_dims)(clean, rng)
        labels = data.train.labels(idx)
        vae = None
        if cfg.stage == "ldm" and cfg.vae_path:
            vae = load_model(cfg.vae_path).vae
        stages = measure_stages(cfg, rt, clean, labels, vae=vae, warmup=0 if tiny else 1)
        steps = {"vae": cfg.vae_train.steps, "ldm": cfg.ldm_train.steps, "refine": cfg.refine.steps}
        for s, fig in stages.items():
            fig["steps"] = steps[s]
        out = Path(out_dir) if out_dir is not None else None
        return {
            "device": str(rt.device), "precision": str(rt.amp_dtype or "fp32").replace("torch.", ""),
            "tiny": tiny, "batch_size": full.data.batch_size, "patch_size": list(full.data.patch_size),
            "task": cfg.task, "spatial_dims": cfg.spatial_dims, "stage": cfg.stage,
            "train_scans": len(train_refs), "val_scans": len(val_refs),
            "val_split": "data.val" if cfg.data.val else (f"{cfg.data.val_fraction:g} of the scans (by scan)"
                                                          if val_refs else "none (validating on training items)"),
            "loaded_scans": data.train_scans, "items": len(data.train),
            "batch_shape": list(clean.shape), "stages": stages,
            "wall_estimate_s": estimate_wall_s(cfg, stages),
            "out_exists": bool(out is not None and out.exists() and any(out.iterdir())),
            "dry_run_s": time.perf_counter() - t_start,
        }
    finally:
        cleanup(rt.dist)


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_report(fig: dict[str, Any], out_dir: str | Path) -> str:
    """The dry run's figures as the lines ``medldm train --dry-run`` prints."""
    lines = [f"config     valid: task {fig['task']}, {fig['spatial_dims']}D, stage {fig['stage']}",
             f"device     {fig['device']} ({fig['precision']})",
             f"data       {fig['train_scans']} training scans, {fig['val_scans']} validation scans "
             f"(split: {fig['val_split']}); loaded {len(fig['loaded_scans'])} scan -> {fig['items']} items; "
             f"batch {tuple(fig['batch_shape'])}"]
    for s, f in fig["stages"].items():
        lines.append(f"{s:<10} {f['params'] / 1e6:.2f} M parameters; step {f['step_s']:.3f} s; "
                     f"peak memory {_mib(f['peak_bytes'])} ({f['memory_how']}); {f['steps']} steps "
                     f"-> {_dur(f['steps'] * f['step_s'])}")
    if fig.get("tiny"):
        lines.append(f"tiny       measured at batch 1, patch {tuple(fig['batch_shape'][2:])}, 1 sampling step "
                     f"(the config: batch {fig['batch_size']}, patch {tuple(fig['patch_size'])}): the times below "
                     "are a check, not the run's")
    lines.append(f"wall time  about {_dur(fig['wall_estimate_s'])} of optimiser steps "
                 "(validation, latent encoding and checkpoints come on top)")
    if fig["out_exists"]:
        lines.append(f"note       {out_dir} already holds files: a real run needs --resume or another -o folder")
    lines.append(f"dry run    {fig['dry_run_s']:.1f} s; nothing written ({out_dir} untouched)")
    return "\n".join(lines)
