"""Stage 3 (sr / denoise): training the pixel-space refiner that gets past the VAE's reconstruction ceiling.

Latent diffusion can never return detail the VAE decoder cannot reconstruct, and a few-step sample is not the
minimum-error estimate that PSNR rewards. The refiner is a small MONAI ``BasicUNet`` at full resolution (by
default without normalization layers, so its output does not depend on the image size) that sees both the
decoded diffusion output ``d`` and the degraded input ``y``:

    x_hat = base + refiner([d, y(, s)]),   base = y (``refine.base: degraded``, default) or d (``decoded``)

where ``s`` is a constant map of the U-Net's noise level when ``refine.noise_map`` is on (denoise, FFDNet-style).

The network, its loading and ``apply_refiner`` are part of the model (:mod:`medldm.models.refiner`,
``ModelBundle.refiner``); this module trains it.

Training pairs are made exactly as at inference: clean crops (augmented like stage 1), ``y`` degraded on the
fly like stage 2's condition, and ``d`` the decoded diffusion sample for ``y`` drawn with the frozen stage-2
U-Net and the model's default sampler and step count (no gradient). Training the refiner on decoded *clean*
latents instead (an earlier design) teaches it to trust ``d`` far more than a real sample deserves.
Validation reports PSNR/SSIM of the degraded input, the diffusion output and the refined output.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from medldm.config import to_mapping
from medldm.data.augment import Augmenter
from medldm.data.condition import make_pair
from medldm.data.datasets import step_rng
from medldm.diffusion import make_model_fn, make_schedule, sample, start_noise
from medldm.metrics import psnr, ssim
from medldm.metrics.ranges import MODEL_DATA_RANGE as DATA_RANGE
from medldm.models import EMA, load_model, save_model_folder
from medldm.models.card import ModelCard
from medldm.models.conditioning import space_to_depth
from medldm.models.refiner import RefinerSpec, apply_refiner, build_from_spec, widen_first_layer
from medldm.train.data import RunData, center_batch
from medldm.train.engine import Runtime, adamw, prepare
from medldm.train.ldm_stage import stage_sampler, val_sigma
from medldm.train.logging import save_grid


def refiner_spec_of(cfg) -> RefinerSpec:
    """The refiner a training config describes: its ``refine`` section (and ``spatial_dims``) is the one source."""
    first = "decoded" if cfg.refine.diffusion_channel else "degraded"  # degraded: the no-diffusion ablation
    inputs = (first, "degraded", "noise_level") if cfg.refine.noise_map else (first, "degraded")
    return RefinerSpec(spatial_dims=cfg.spatial_dims, features=tuple(cfg.refine.features), norm=cfg.refine.norm,
                       base=cfg.refine.base, inputs=inputs, context=cfg.refine.context)


class RefineStage:
    name = "refine"

    def __init__(self, cfg, data: RunData, rt: Runtime, ldm_dir: Path, out_dir: Path):

        self.cfg, self.data, self.rt, self.tcfg = cfg, data, rt, cfg.refine
        self.ldm_dir = Path(ldm_dir)
        bundle = load_model(ldm_dir)
        self.bundle = bundle
        self.vae = bundle.vae.to(rt.device).eval().requires_grad_(False)
        self.denoiser = bundle.denoiser.to(rt.device).eval().requires_grad_(False)
        self.scale = bundle.scale_factor
        self.f = cfg.factor
        self.schedule = make_schedule(cfg.diffusion)
        self.augment = Augmenter(cfg.augment, cfg.spatial_dims) if self.tcfg.augment else None
        torch.manual_seed(cfg.seed)
        # the refine section is the one source of the refiner's settings; the model folder stores them (extra())
        self.spec = refiner_spec_of(cfg)
        self.refiner = build_from_spec(self.spec)
        if cfg.stage == "refine" and bundle.refiner is not None:  # warm start from the folder's refiner
            self.refiner.load_state_dict(widen_first_layer(bundle.refiner.state_dict(), self.refiner.state_dict()))
        self.modules = {"refiner": self.refiner}
        self.wrapped = {"refiner": prepare(self.refiner, rt)}
        self.optimizers = {"refiner": adamw(self.refiner.parameters(), self.tcfg.lr, self.tcfg.weight_decay, rt)}
        self.ema = {"refiner": EMA(self.refiner, self.tcfg.ema_decay)} if self.tcfg.ema_decay > 0 else {}
        self.config = to_mapping(cfg)
        self.metrics: dict[str, float] = {}

    def cpu_batch(self, step: int, micro: int) -> dict:
        rng = step_rng(self.cfg.seed, step, micro, self.rt.dist.rank, 3)
        store = self.data.train
        idx, corners = store.draw(rng, self.cfg.data.batch_size)
        clean = store.crop(idx, corners, context=self.spec.context > 0)  # (B, 1 + 2 context, *patch)
        if self.augment is not None:
            clean = self.augment(clean, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        # the slice and its neighbours degraded together (one level per sample), as a degraded volume is
        degraded, level = make_pair(clean, self.cfg.task, self.cfg.degrade, gen)
        context = degraded[:, 1:]
        if self.spec.context and self.tcfg.context_dropout > 0:  # as a single slice is seen: itself as neighbours
            alone = torch.as_tensor(rng.random(len(context)) < self.tcfg.context_dropout)
            context = torch.where(alone.view(-1, 1, *([1] * (context.ndim - 2))),
                                  degraded[:, :1].expand_as(context), context)
        return {"clean": clean[:, :1], "degraded": degraded[:, :1], "context": context, "level": level,
                "seed": int(rng.integers(0, 2**62))}

    def to_device(self, b: dict) -> dict:
        out = {k: self.rt.to(b[k]) for k in ("clean", "degraded", "context")}
        return {**out, "level": b["level"].to(self.rt.device), "seed": b["seed"]}

    @staticmethod
    def batch_size(b: dict) -> int:
        return b["clean"].shape[0]

    @torch.no_grad()
    def diffuse(self, degraded: torch.Tensor, level: torch.Tensor, seed: int) -> torch.Tensor:
        """The decoded diffusion sample for ``degraded`` (N, 1, *patch): the stage-2 model run as inference runs
        it (default sampler and step count of the model folder)."""
        d = self.cfg.diffusion
        cond = self.rt.to(space_to_depth(degraded, self.f))
        lev = level.to(self.rt.device) if self.cfg.unet.noise_level_cond else None
        fn = make_model_fn(self.denoiser, self.schedule, cond=cond, noise_level=lev)
        gen = torch.Generator().manual_seed(int(seed))
        shape = (len(degraded), self.cfg.vae.latent_channels, *(s // self.f for s in degraded.shape[2:]))
        x_t = start_noise(shape, self.schedule, generator=gen).to(self.rt.device)
        with self.rt.autocast():
            z = sample(stage_sampler(d), lambda a, t: fn(a, t).float(), x_t, self.schedule, d.sampling_steps,
                       generator=gen)
            return self.vae.decode(z / self.scale).float()

    def losses(self, b: dict, step: int) -> dict[str, torch.Tensor]:
        decoded = self.diffuse(b["degraded"], b["level"], b["seed"]) if self.spec.uses_diffusion else b["degraded"]
        out = apply_refiner(self.wrapped["refiner"], decoded, b["degraded"], self.spec.base,
                            self._level(b["level"]), b["context"]).float()
        loss = (out - b["clean"].float()).abs().mean()
        return {"loss": loss, "decoded_l1": (decoded - b["clean"].float()).abs().mean().detach()}

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _enhance(self, stack: torch.Tensor):
        """(degraded, diffusion output, refined) for validation crops ``stack`` (N, 1 + 2 context, *patch): the
        slices, then their neighbours (refine.context)."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        degraded, level = make_pair(stack, self.cfg.task, self.cfg.degrade, gen, val_sigma(self.cfg))
        degraded, context = degraded[:, :1], degraded[:, 1:]
        dec = self.diffuse(degraded, level, self.cfg.seed + 1)
        first = dec if self.spec.uses_diffusion else self.rt.to(degraded)
        with self.rt.autocast():
            ref = apply_refiner(self._eval_net(), first, self.rt.to(degraded), self.spec.base,
                                self._level(level), self.rt.to(context)).float()
        return degraded, dec.cpu(), ref.cpu()

    def _level(self, level: torch.Tensor) -> torch.Tensor | None:
        """The refiner's noise-level input (the U-Net's level), or None for refiners without a noise map."""
        return level.to(self.rt.device) if self.spec.noise_map else None

    def _eval_net(self) -> nn.Module:
        net = copy.deepcopy(self.refiner)
        if self.ema:
            self.ema["refiner"].copy_to(net)
        return net.eval()

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:

        store, prefix = self.data.val_or_train()
        stack, _, _ = center_batch(store, self.tcfg.val_max_items, context=self.spec.context > 0)
        x = stack[:, :1]
        degraded, dec, ref = self._enhance(stack)
        m = {}
        for name, img in (("", ref), ("ldm_", dec), ("input_", degraded)):
            m[f"{prefix}{name}psnr"] = float(psnr(img, x, data_range=DATA_RANGE).mean())
            m[f"{prefix}{name}ssim"] = float(ssim(img, x, data_range=DATA_RANGE).mean())
        self.metrics = m
        return m

    def images(self, step: int, path: Path) -> None:
        store, _ = self.data.val_or_train()
        stack, _, _ = center_batch(store, 8, context=self.spec.context > 0)
        degraded, dec, ref = self._enhance(stack)
        save_grid([stack[:, :1], degraded, dec, ref], path)

    def extra(self) -> ModelCard:
        """The ldm folder's model card with the refiner spec (read back by ``load_model``) and its figures."""
        return dataclasses.replace(self.bundle.card, refiner=self.spec, refine_val_metrics=self.metrics)

    def export(self, path: Path) -> None:

        modules = {"vae": self.vae, "refiner": self._eval_net()}
        raw = self._raw_denoiser()
        if raw is not None:  # shipped folders keep the EMA weights only (stage: refine on one of them)
            modules["denoiser"] = raw
        ema_file = self.ldm_dir / "denoiser_ema.safetensors"
        if ema_file.is_file():
            modules["denoiser_ema"] = self.denoiser
        save_model_folder(path, config=self.config, modules=modules, extra=self.extra())

    def _raw_denoiser(self) -> nn.Module:
        return load_model(self.ldm_dir, ema=False).denoiser
