"""The training engine: one loop for every stage.

Speed (CUDA only; CPU runs in fp32 with the same code): bf16 autocast, channels-last tensors, optional
``torch.compile``, fused AdamW, TF32 matmuls, flash attention (set on the network configs by the stages).
Correctness: gradient accumulation (DDP ``no_sync`` on inner micro-batches), gradient clipping per optimizer,
EMA, linear warm-up, per-step seeding (``seed, step, rank``) so data, augmentation, degradations and diffusion
noise are a pure function of the step — a run resumed from a checkpoint reproduces the loss sequence of an
uninterrupted one exactly (tests/test_train_resume.py kills a run with SIGKILL to check it).

A *stage* (``VAEStage``, ``LDMStage``) supplies: ``name``, ``tcfg`` (its train section), ``modules`` (raw
networks to checkpoint), ``wrapped`` (the same, DDP/compile-wrapped, used for forward), ``optimizers``,
``ema`` (name -> EMA), ``cpu_batch(step, micro)`` + ``to_device(batch)``, ``losses(batch, step) -> {"loss": ...}``,
``validate(step) -> metrics``, ``images(step, path)``, ``export(path)``, ``config`` and ``extra()``.

Host syncs: loss values stay on the device, summed per log interval, and are read once per log row (as EDM2's
``training_stats`` does) — no ``float()`` / ``.item()`` per micro-batch. The one read per step is a single flag:
whether the step's loss and gradient norms are finite. A non-finite step is skipped (no optimizer step, no EMA
update), counted in the log's ``nonfinite`` column and reported; ``Runtime.max_nonfinite`` consecutive ones stop
the run with ``NonFiniteLossError`` (its last checkpoint stays intact). With fp16 the GradScaler handles gradient
overflow itself, so only the loss is checked then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medldm.devices import DeviceError, resolve, select
from medldm.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from medldm.train.distributed import (
    DistInfo,
    all_finite,
    barrier,
    check_in_sync,
    init_distributed,
    mean_across,
    wrap_ddp,
)
from medldm.train.logging import MetricLog, read_log

log_ = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class Runtime:
    """Where and how networks run."""

    device: torch.device
    amp_dtype: torch.dtype | None
    dist: DistInfo
    channels_last: bool = False
    compile: bool = False
    fused_adamw: bool = False
    flash_attention: bool = False
    progress: bool = True
    tensorboard: bool = True
    max_nonfinite: int = 20  # consecutive non-finite (skipped) steps before the run stops

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch tensor to the device (channels-last on CUDA)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        return x


def _grad_params(o: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in o.param_groups for p in g["params"] if p.grad is not None]


def unscale_and_check(optimizers, scaler, grad_clip: float, finite: torch.Tensor) -> torch.Tensor:
    """Unscale (fp16) and clip the gradients of ``optimizers`` (each with gradients); returns ``finite`` and-ed with
    the finiteness of their norms (fp16: the GradScaler skips overflowing steps itself, so only the loss counts)."""
    for o in optimizers:
        if scaler is not None:
            scaler.unscale_(o)
        params = _grad_params(o)
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        elif scaler is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            continue
        if scaler is None:
            finite = finite & torch.isfinite(norm).to(finite.device)
    return finite


def deterministic_cublas() -> None:
    """cuBLAS is deterministic only with a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its handle is created,
    i.e. at the first matrix product on the GPU): set it (unless the user did) before anything runs on CUDA.
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` then warns (instead of failing) about the ops
    that have no deterministic CUDA kernel (docs/training.md lists them)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def make_runtime(ecfg) -> Runtime:
    """Resolve ``engine`` config switches against the hardware (GPU features are CPU no-ops). The device is
    :func:`medldm.devices.select` of ``engine.device`` and the rank's ``LOCAL_RANK`` — the same rule as the
    commands' ``--device``: ``cuda:{local_rank % device_count}``, made the current device."""
    try:
        cuda = resolve(ecfg.device).type == "cuda"  # checked before the process group is joined
    except DeviceError as e:
        raise RuntimeError(f"engine.device {ecfg.device}: {e} (engine.device=auto picks the CPU)") from None
    if cuda and ecfg.deterministic:
        deterministic_cublas()
    info = init_distributed("cuda" if cuda else "cpu")
    if cuda:
        device = select(ecfg.device, info.local_rank)  # before: cuda:LOCAL_RANK, invalid with one GPU per process
        torch.backends.cuda.matmul.allow_tf32 = ecfg.tf32
        torch.backends.cudnn.allow_tf32 = ecfg.tf32
        torch.backends.cudnn.benchmark = not ecfg.deterministic
        if ecfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        device = torch.device("cpu")
    if ecfg.num_threads > 0:
        torch.set_num_threads(ecfg.num_threads)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(ecfg.precision)
    if ecfg.precision == "auto":
        amp = torch.bfloat16 if cuda else None
    if not cuda and amp is torch.float16:
        raise RuntimeError("engine.precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return Runtime(device=device, amp_dtype=amp, dist=info, channels_last=cuda and ecfg.channels_last,
                   compile=ecfg.compile, fused_adamw=cuda and ecfg.fused_adamw,
                   flash_attention=cuda and ecfg.flash_attention, progress=ecfg.progress and info.is_main,
                   tensorboard=ecfg.tensorboard)


def prepare(module: nn.Module, rt: Runtime, ddp: bool = True) -> nn.Module:
    """Move to device (channels-last on CUDA), wrap in DDP when distributed, compile when asked."""
    module.to(rt.device)
    if rt.channels_last:
        volumetric = any(p.dim() == 5 for p in module.parameters())
        module.to(memory_format=torch.channels_last_3d if volumetric else torch.channels_last)
    wrapped = wrap_ddp(module, rt.dist, rt.device) if ddp else module
    if rt.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def adamw(params, lr: float, weight_decay: float, rt: Runtime, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA."""
    kw = {"fused": True} if rt.fused_adamw else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **kw)


def seed_step(seed: int, step: int, rank: int) -> int:
    """Seed torch / numpy / python RNGs for one step; returns the derived seed."""
    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s


class _StepData(torch.utils.data.Dataset):
    """Map-style view of the batch stream: index i -> the CPU batch of (step, micro-batch) = divmod(i, accum)."""

    def __init__(self, stage: Any, start: int, total: int, accum: int):
        self.stage, self.start, self.n, self.accum = stage, start, (total - start) * accum, accum

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        s, m = divmod(i, self.accum)
        return self.stage.cpu_batch(self.start + s, m)


def batch_stream(stage: Any, start: int, total: int, accum: int, workers: int, pin: bool):
    """CPU batches in (step, micro) order; ``workers`` > 0 prepares them in DataLoader worker processes.

    Each batch is a pure function of (seed, step, micro, rank), so worker count never changes the result."""
    if workers <= 0:
        return (stage.cpu_batch(s, m) for s in range(start, total) for m in range(accum))
    loader = torch.utils.data.DataLoader(_StepData(stage, start, total, accum), batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=pin, prefetch_factor=4)
    return iter(loader)


def _lr_factor(step: int, warmup: int, total: int = 0, schedule: str = "constant") -> float:
    """Linear warm-up, then constant or cosine decay (to 1 % of the base rate at ``total``)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        frac = min(1.0, (step - warmup) / (total - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


@dataclasses.dataclass
class _Interval:
    """What the next row of the training log sums, since the last one: on-device loss sums of the finite steps
    (``n`` of them; no host read), the skipped steps, and the images seen since ``t0``."""

    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    n: int = 0
    skipped: int = 0
    imgs: int = 0
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, step_sums: dict[str, torch.Tensor]) -> None:
        for k, v in step_sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def restart_clock(self) -> None:
        """After a checkpoint: its writing does not count against the images per second."""
        self.t0, self.imgs = time.perf_counter(), 0


def _resume(stage: Any, rt: Runtime, sdir: Path, log: MetricLog, val_log: MetricLog) -> tuple[int, bool]:
    """Restore networks, EMA, optimizers and RNG from ``sdir/checkpoint`` when it holds a trainer state (the logs
    cut back to its step); ``(step, whether the stage had finished and exported its model)``."""
    ckpt = sdir / "checkpoint"
    if not (ckpt / "trainer_state.pt").is_file():
        return 0, False
    state = load_checkpoint(ckpt, modules=stage.modules, ema=stage.ema, map_location=rt.device)
    for k, o in stage.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    step = int(state["step"])
    set_rng_state(state["rng"])
    if rt.dist.is_main:
        log.truncate_after(step)
        val_log.truncate_after(step)
        log_.info("%s: resumed at step %d from %s", stage.name, step, ckpt)
    return step, step >= stage.tcfg.steps and (sdir / "model").is_dir()


def _backward_step(stage: Any, rt: Runtime, stream, scaler, step: int, base_lr: dict, iv: _Interval):
    """One optimiser step's forward and backward passes over ``grad_accum`` micro-batches (learning rate set,
    gradients unscaled and clipped); ``(loss sums on the device, the optimizers with gradients, finite)``."""
    tcfg = stage.tcfg
    for k, o in stage.optimizers.items():
        f = _lr_factor(step, tcfg.warmup_steps, tcfg.steps, tcfg.lr_schedule)
        for g, lr0 in zip(o.param_groups, base_lr[k], strict=True):
            g["lr"] = lr0 * f
        o.zero_grad(set_to_none=True)
    step_sums: dict[str, torch.Tensor] = {}
    for micro in range(tcfg.grad_accum):
        batch = stage.to_device(next(stream))
        sync = micro == tcfg.grad_accum - 1
        with contextlib.ExitStack() as stack:
            if not sync and rt.dist.enabled:
                for m in stage.wrapped.values():
                    m = getattr(m, "_orig_mod", m)  # torch.compile wraps the DDP module
                    if isinstance(m, nn.parallel.DistributedDataParallel):
                        stack.enter_context(m.no_sync())
            with rt.autocast():
                losses = stage.losses(batch, step)
            loss = losses["loss"] / tcfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():  # stays on the device: no host sync
            v = v.detach().double() / tcfg.grad_accum
            step_sums[k] = step_sums[k] + v if k in step_sums else v
        iv.imgs += int(stage.batch_size(batch)) * rt.dist.world_size
    # optimizers without gradients this step (the discriminator before adv_start) take no part: the GradScaler
    # raises "No inf checks were recorded" for an optimizer it unscaled nothing of
    active = [o for o in stage.optimizers.values() if _grad_params(o)]
    finite = unscale_and_check(active, scaler, tcfg.grad_clip, torch.isfinite(step_sums["loss"]))
    finite = all_finite(finite, rt.dist)  # every rank takes the same decision
    return step_sums, active, bool(finite)  # the step's one host read


def _log_row(stage: Any, rt: Runtime, iv: _Interval, step: int, log: MetricLog, bar) -> None:
    """The interval's row of the training log (its one read of the loss values)."""
    now = time.perf_counter()
    vals: dict[str, Any] = {k: v / iv.n for k, v in iv.sums.items()} if iv.n else {"loss": math.nan}
    vals["nonfinite"] = float(iv.skipped)
    row = mean_across(vals, rt.dist)
    row["img_per_s"] = iv.imgs / max(now - iv.t0, 1e-9)
    row["lr"] = next(iter(stage.optimizers.values())).param_groups[0]["lr"]
    if rt.dist.is_main:
        log.write(step, row)
    if bar is not None:
        bar.set_postfix(loss=f"{row.get('loss', math.nan):.4g}", img_s=f"{row['img_per_s']:.1f}")


def _images_and_validation(stage: Any, rt: Runtime, step: int, sdir: Path, val_log: MetricLog, bar) -> dict | None:
    """The sample images and validation due at ``step``; the validation metrics (main rank), else None."""
    tcfg, last, metrics = stage.tcfg, step == stage.tcfg.steps, None
    if tcfg.image_every and (step % tcfg.image_every == 0 or last) and rt.dist.is_main:
        stage.images(step, sdir / "images" / f"step_{step:07d}.png")
    if (tcfg.val_every and step % tcfg.val_every == 0) or last:
        if rt.dist.is_main:
            metrics = stage.validate(step)
            val_log.write(step, metrics)
            if bar is not None:
                bar.write(f"{stage.name} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        barrier(rt.dist)
    return metrics


def _checkpoint(stage: Any, rt: Runtime, step: int, ckpt: Path) -> None:
    """The checkpoint of ``step`` in ``ckpt``: the ranks' networks checked to agree, the main rank writes."""
    check_in_sync(stage.modules, rt.dist)
    if rt.dist.is_main:
        save_checkpoint(ckpt, config=stage.config, modules=stage.modules, extra=stage.extra(),
                        trainer_state={"step": step, "optimizers": {k: o.state_dict()
                                                                   for k, o in stage.optimizers.items()}},
                        ema=stage.ema)
    barrier(rt.dist)


def fit(stage: Any, rt: Runtime, out_dir: Path, *, seed: int, resume: bool = False,
        stop_after: int | None = None) -> dict[str, float]:
    """Train ``stage`` for ``stage.tcfg.steps`` optimiser steps under ``out_dir/<stage.name>/``.

    ``stop_after``: return after that many steps of this call (tests; a checkpoint is written first).
    Returns the last validation metrics."""
    tcfg = stage.tcfg
    sdir = Path(out_dir) / stage.name
    ckpt = sdir / "checkpoint"
    main = rt.dist.is_main
    log = MetricLog(sdir / "train_log.csv", (sdir / "tb") if rt.tensorboard and main else None)
    val_log = MetricLog(sdir / "val_log.csv")
    base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in stage.optimizers.items()}
    step, finished_before = _resume(stage, rt, sdir, log, val_log) if resume else (0, False)
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype is torch.float16 else None
    total = tcfg.steps
    metrics: dict[str, float] = {}
    bar = None
    if rt.progress:
        bar = tqdm(total=total, initial=step, desc=stage.name, unit="step", file=sys.stderr, dynamic_ncols=True)
    done_here = 0
    consecutive = 0  # non-finite (skipped) steps in a row
    iv = _Interval()
    stream = batch_stream(stage, step, total, tcfg.grad_accum, stage.cfg.data.num_workers, rt.device.type == "cuda")
    while step < total:
        seed_step(seed, step, rt.dist.rank)
        step_sums, active, finite = _backward_step(stage, rt, stream, scaler, step, base_lr, iv)
        if finite:
            consecutive = 0
            iv.add(step_sums)
            for o in active:
                if scaler is not None:
                    scaler.step(o)
                else:
                    o.step()
            for name, e in stage.ema.items():
                e.update(stage.modules[name])
        else:
            iv.skipped += 1
            consecutive += 1
            log_.warning("%s step %d: non-finite loss or gradient — step skipped (%d in a row)",
                         stage.name, step, consecutive)
            if consecutive >= rt.max_nonfinite:
                if bar is not None:
                    bar.close()
                log.close()
                raise NonFiniteLossError(
                    f"{stage.name}: {consecutive} consecutive steps (up to step {step}) had a non-finite loss or "
                    f"gradient and were skipped — lower the learning rate, enable grad_clip or use bf16/fp32; "
                    f"the last checkpoint in {ckpt} is intact (resume with --resume)")
        if scaler is not None:
            scaler.update()
        step += 1
        done_here += 1
        if step % tcfg.log_every == 0 or step == total:
            _log_row(stage, rt, iv, step, log, bar)
            iv = _Interval()
        if bar is not None:
            bar.update(1)
        validated = _images_and_validation(stage, rt, step, sdir, val_log, bar)
        metrics = metrics if validated is None else validated
        stop = stop_after is not None and done_here >= stop_after
        if step % tcfg.ckpt_every == 0 or step == total or stop:
            _checkpoint(stage, rt, step, ckpt)
            iv.restart_clock()
        if stop and step < total:
            break
    if bar is not None:
        bar.close()
    if step >= total and main and not finished_before:  # a finished stage keeps its exported model
        stage.export(sdir / "model")
    barrier(rt.dist)
    log.close()
    if not metrics and (sdir / "val_log.csv").is_file():  # resumed a finished stage: report its last validation
        rows = read_log(sdir / "val_log.csv")
        metrics = {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
    return metrics
