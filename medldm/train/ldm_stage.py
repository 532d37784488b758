"""Stage 2: latent diffusion U-Net on cached latents of the frozen VAE.

* The training items are encoded ONCE (``medldm.data.latent_cache``: posterior mu and sigma, saved tagged with
  the VAE hash); each step draws ``z = (mu + sigma * eps) * scale_factor`` on factor-aligned crops.
* synthesis: unconditional or class-conditional (learned null class, label dropout ``diffusion.cfg_dropout``);
  with ``condition: mask`` also on a tissue label map (``medldm.data.tissue``, derived once per item): one-hot,
  space-to-depth onto the latent grid, concatenated to the noisy latent; replaced by zeros (no mask) with
  probability ``diffusion.cfg_dropout``, so the same network also samples without a mask;
* sr / denoise: the degraded image of the same crop, made on the fly (``medldm.data.condition``), goes to the
  U-Net by lossless space-to-depth onto the latent grid, and its noise level as a conditioning scalar.
* Validation (held-out scans): diffusion loss on their latents; for sr/denoise also PSNR/SSIM of the enhanced
  image, of the degraded input and of the VAE reconstruction of the clean image (the ceiling set by the VAE).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from medldm.config import to_mapping
from medldm.data.condition import make_pair, noise_level_max
from medldm.data.datasets import step_rng
from medldm.data.latent_cache import encode_items, load_cache, save_cache
from medldm.diffusion import diffusion_loss, make_model_fn, make_schedule, sample, start_noise
from medldm.metrics import psnr, ssim
from medldm.metrics.ranges import MODEL_DATA_RANGE as DATA_RANGE
from medldm.models import EMA, build_denoiser, load_model, model_hash, save_model_folder
from medldm.models.card import ModelCard
from medldm.models.conditioning import space_to_depth
from medldm.models.config import DegradeConfig
from medldm.models.denoiser import mask_condition
from medldm.train.data import RunData, center_batch, center_corners
from medldm.train.distributed import barrier
from medldm.train.engine import Runtime, adamw, prepare
from medldm.train.logging import save_grid


def stage_sampler(d) -> str:
    """The sampler the training stages validate with (and the refiner trains on): the configured one, or
    ``euler_flow`` when a flow schedule is paired with a DDPM-only sampler."""
    return d.sampler if d.schedule == "ddpm" or d.sampler == "euler_flow" else "euler_flow"


def val_sigma(cfg) -> float:
    """The fixed degradation sigma of validation pairs: the middle of ``level_range`` (denoise) or the lowest
    noise augmentation (sr)."""
    r = cfg.degrade.level_range if cfg.task == "denoise" else cfg.degrade.noise_aug_range
    return float(r[0] + r[1]) / 2 if cfg.task == "denoise" else float(r[0])


class LDMStage:
    name = "ldm"

    def __init__(self, cfg, data: RunData, rt: Runtime, vae_dir: Path, out_dir: Path):
        self.cfg, self.data, self.rt, self.tcfg = cfg, data, rt, cfg.ldm_train
        bundle = load_model(vae_dir)
        if bundle.vae is None:
            raise ValueError(f"{vae_dir}: no VAE weights in this model folder")
        vcfg = bundle.card.vae  # not None: the VAE was built from it
        if vcfg.latent_channels != cfg.vae.latent_channels or tuple(vcfg.channels) != tuple(cfg.vae.channels) \
                or vcfg.spatial_dims != cfg.spatial_dims:
            raise ValueError(f"{vae_dir}: its vae section differs from this config's vae section — "
                             "train the VAE with this config (stage: both) or copy its vae section")
        self.vae = bundle.vae.to(rt.device).eval().requires_grad_(False)
        self.vae_card = bundle.card
        self.scale = bundle.scale_factor
        self.f = cfg.factor
        self.patch_lat = tuple(p // self.f for p in cfg.data.patch_size)
        self.cache = self._latents(model_hash(vae_dir), Path(out_dir) / self.name / "latents.safetensors")
        self.mask_classes = int(cfg.data.mask_classes) if cfg.condition == "mask" else 0
        if self.mask_classes:
            for store in (data.train, data.val):
                if store is not None:
                    store.derive_masks(self.mask_classes)
        torch.manual_seed(cfg.seed)
        run_cfg = dataclasses.replace(cfg.unet, use_flash_attention=cfg.unet.use_flash_attention or rt.flash_attention)
        self.denoiser = build_denoiser(run_cfg, cfg.spatial_dims, cfg.vae.latent_channels)
        self.modules = {"denoiser": self.denoiser}
        self.wrapped = {"denoiser": prepare(self.denoiser, rt)}
        self.optimizers = {"denoiser": adamw(self.denoiser.parameters(), self.tcfg.lr, self.tcfg.weight_decay, rt)}
        self.ema = {"denoiser": EMA(self.denoiser, self.tcfg.ema_decay)} if self.tcfg.ema_decay > 0 else {}
        self.schedule = make_schedule(cfg.diffusion)
        self.config = to_mapping(cfg)
        self.metrics: dict[str, float] = {}

    def _latents(self, vae_hash: str, path: Path):
        items = self.data.train.items
        h = hashlib.sha256(vae_hash.encode())
        for it in items:
            h.update(f"{it.scan}:{tuple(it.image.shape)}:{float(it.image.sum()):.6e}".encode())
        tag = h.hexdigest()
        cache = load_cache(path, tag)
        if cache is None:
            if self.rt.dist.is_main:
                cache = encode_items(self.vae, [it.image[:1] for it in items], self.rt.device, self.rt.autocast)
                save_cache(cache, path, tag)
            barrier(self.rt.dist)
            cache = cache if cache is not None else load_cache(path, tag)
        assert cache is not None and len(cache) == len(items)
        return cache

    # ------------------------------------------------------------------------------ training
    def _conditioning(self, clean: torch.Tensor, gen: torch.Generator, sigma: float | None = None):
        """clean (B, 1, *patch) -> (cond (B, f**d, *patch/f) | None, noise level (B,) | None, degraded | None)."""
        if self.cfg.task == "synthesis":
            return None, None, None
        degraded, level = make_pair(clean, self.cfg.task, self.cfg.degrade, gen, sigma)
        cond = space_to_depth(degraded, self.f)
        return cond, (level if self.cfg.unet.noise_level_cond else None), degraded

    def cpu_batch(self, step: int, micro: int) -> dict:
        """Latents z (B, C, *patch/f), and per task labels / condition / noise level, on CPU; plus the seed of
        the diffusion noise. A pure function of (seed, step, micro-batch, rank)."""
        rng = step_rng(self.cfg.seed, step, micro, self.rt.dist.rank)
        store = self.data.train
        idx, corners = store.draw(rng, self.cfg.data.batch_size)
        mu, sigma = self.cache.crop(idx, corners, self.patch_lat, self.f)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        z = (mu + sigma * torch.randn(mu.shape, generator=gen)) * self.scale
        out = {"z": z, "seed": int(rng.integers(0, 2**62))}
        if self.cfg.unet.num_classes:
            out["labels"] = store.labels(idx)
        if self.mask_classes:
            cond = mask_condition(store.mask_crop(idx, corners), self.mask_classes, self.f)
            drop = torch.rand(len(idx), generator=gen) < self.cfg.diffusion.cfg_dropout
            cond[drop] = 0.0  # no mask: the unconditional branch
            out["cond"] = cond
        if self.cfg.task != "synthesis":
            cond, level, _ = self._conditioning(store.crop(idx, corners), gen)
            out["cond"] = cond
            if level is not None:
                out["level"] = level
        return out

    def to_device(self, b: dict) -> dict:
        out = {k: (self.rt.to(v) if k in ("z", "cond") else v.to(self.rt.device)) for k, v in b.items() if k != "seed"}
        out["gen"] = torch.Generator().manual_seed(b["seed"])
        return out

    @staticmethod
    def batch_size(batch: dict) -> int:
        return batch["z"].shape[0]

    def losses(self, b: dict, step: int) -> dict[str, torch.Tensor]:
        loss = diffusion_loss(self.wrapped["denoiser"], self.schedule, b["z"], cond=b.get("cond"),
                              class_labels=b.get("labels"), noise_level=b.get("level"), generator=b["gen"])
        return {"loss": loss}

    # ------------------------------------------------------------------------------ evaluation
    def _eval_net(self) -> torch.nn.Module:
        net = copy.deepcopy(self.denoiser)
        if self.ema:
            self.ema["denoiser"].copy_to(net)
        return net.eval()

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with self.rt.autocast():
            mu, _ = self.vae.encode(self.rt.to(x))
        return mu.float() * self.scale

    @torch.no_grad()
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        with self.rt.autocast():
            return self.vae.decode(z / self.scale).float().cpu()

    @torch.no_grad()
    def sample(self, net, n: int, cond=None, labels=None, level=None, seed: int = 0) -> torch.Tensor:
        """Latent samples (n, C, *patch/f) with the configured sampler."""
        d = self.cfg.diffusion
        gen = torch.Generator().manual_seed(seed)
        shape = (n, self.cfg.vae.latent_channels, *self.patch_lat)
        x_t = start_noise(shape, self.schedule, generator=gen).to(self.rt.device)
        guidance = d.guidance if (labels is not None and self.cfg.unet.num_classes) else 1.0
        fn = make_model_fn(net, self.schedule, cond=cond, class_labels=labels, guidance=guidance, noise_level=level)

        def model_fn(x, t):
            with self.rt.autocast():
                return fn(x, t).float()

        return sample(stage_sampler(d), model_fn, x_t, self.schedule, self.tcfg.val_sampling_steps, generator=gen)

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        store, prefix = self.data.val_or_train()
        x, labels, idx = center_batch(store, self.tcfg.val_max_items)
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        net = self._eval_net()
        z = self._encode(x)
        cond, level, degraded = self._conditioning(x, gen, val_sigma(self.cfg))
        if self.mask_classes:
            _, cond = self._center_masks(store, idx)
        cond = None if cond is None else self.rt.to(cond)
        level = None if level is None else level.to(self.rt.device)
        lab = labels.to(self.rt.device) if self.cfg.unet.num_classes else None
        with self.rt.autocast():
            vl = diffusion_loss(net, self.schedule, z, cond=cond, class_labels=lab, noise_level=level,
                                generator=torch.Generator().manual_seed(self.cfg.seed + 777))
        m = {f"{prefix}loss": float(vl)}
        if self.cfg.task != "synthesis":
            pred = self._decode(self.sample(net, len(x), cond, None, level, seed=self.cfg.seed + 1))
            recon = self._decode(z)
            for name, img in (("", pred), ("input_", degraded.cpu()), ("vae_", recon)):
                m[f"{prefix}{name}psnr"] = float(psnr(img, x, data_range=DATA_RANGE).mean())
                m[f"{prefix}{name}ssim"] = float(ssim(img, x, data_range=DATA_RANGE).mean())
        self.metrics = m
        return m

    def _center_masks(self, store, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(label maps (n, *patch), their condition on the device) of the centre crops ``center_batch`` takes of
        items ``idx``."""
        lab = store.mask_crop(np.asarray(idx), center_corners(store, idx))
        return lab, self.rt.to(mask_condition(lab, self.mask_classes, self.f))

    @torch.no_grad()
    def images(self, step: int, path: Path) -> None:
        net = self._eval_net()
        store, _ = self.data.val_or_train()
        if self.mask_classes:  # rows: real slice, its label map (scaled to [-1, 1]), sample following the map
            x, _, idx = center_batch(store, 8)
            lab, cond = self._center_masks(store, idx)
            lab = lab.float()[:, None] * (2.0 / (self.mask_classes - 1)) - 1
            save_grid([x, lab, self._decode(self.sample(net, len(x), cond, seed=self.cfg.seed + 2))], path)
            return
        if self.cfg.task == "synthesis":
            n = 8
            labels = (torch.arange(n) % self.cfg.unet.num_classes).to(self.rt.device) if self.cfg.unet.num_classes else None
            save_grid([self._decode(self.sample(net, n, labels=labels, seed=self.cfg.seed + 2))], path)
            return
        x, _, _ = center_batch(store, 8)
        cond, level, degraded = self._conditioning(x, torch.Generator().manual_seed(self.cfg.seed + 12345),
                                                   val_sigma(self.cfg))
        pred = self._decode(self.sample(net, len(x), self.rt.to(cond), None,
                                        None if level is None else level.to(self.rt.device), seed=self.cfg.seed + 1))
        save_grid([x, degraded, pred], path)

    def extra(self) -> ModelCard:
        """The model card (``extra.json``): the VAE folder's card (normalization, sizes) with this stage's task,
        condition, degradation and figures."""
        cfg, synthesis = self.cfg, self.cfg.task == "synthesis"
        return dataclasses.replace(
            self.vae_card, stage="ldm", task=cfg.task, scale_factor=self.scale, factor=self.f,
            condition=None if synthesis and not self.mask_classes else ("mask" if synthesis else "space_to_depth"),
            mask_classes=self.mask_classes,
            mask_method=("medldm.data.tissue.tissue_labels: background + 1D k-means intensity clusters of the "
                         "normalized slice, darkest first") if self.mask_classes else None,
            degrade=None if synthesis else DegradeConfig(**dataclasses.asdict(cfg.degrade)),
            noise_level_max=0.0 if synthesis else noise_level_max(cfg.task, cfg.degrade),
            class_from=cfg.data.class_from, class_names=tuple(cfg.data.class_names(cfg.unet.num_classes) or ()),
            vae_val_metrics=self.vae_card.val_metrics, val_metrics=self.metrics,
            train_scans=self.data.train_scans, val_scans=self.data.val_scans,
            refiner=None, refine_val_metrics={}, vae=None, unet=None)

    def export(self, path: Path) -> None:
        modules = {"vae": self.vae, "denoiser": self.denoiser}
        if self.ema:
            modules["denoiser_ema"] = self._eval_net()
        save_model_folder(path, config=self.config, modules=modules, extra=self.extra())
