"""Stage 1: KL autoencoder (MONAI ``AutoencoderKL``).

Loss = L1(recon, x) + kl_weight * KL(q(z|x) || N(0, I)) [+ ssim_weight * (1 - SSIM)] [+ grad_weight * L1 of
image gradients] [+ adv_weight * least-squares patch-GAN loss from ``adv_start`` on (MONAI PatchDiscriminator)].
No loss needs downloaded weights. At export the latent scale factor ``1 / std(z)`` over training crops is stored
in ``extra.json`` (``scale_factor``), with validation PSNR/SSIM (model range [-1, 1], data_range 2).

Validation, image grids and the scale factor all use the weights that are exported: the EMA average when
``vae_train.ema_decay`` > 0, else the raw weights.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from monai.losses import PatchAdversarialLoss, SSIMLoss
from monai.networks.nets import PatchDiscriminator

from medldm.config import to_mapping
from medldm.data.augment import Augmenter
from medldm.data.datasets import step_rng
from medldm.metrics import psnr, ssim
from medldm.metrics.ranges import MODEL_DATA_RANGE as DATA_RANGE
from medldm.models import EMA, build_vae, save_model_folder
from medldm.models.card import ModelCard, Normalization
from medldm.train.data import RunData, center_batch
from medldm.train.engine import Runtime, adamw, prepare
from medldm.train.logging import save_grid


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.float() ** 2 + sigma.float() ** 2 - torch.log(sigma.float() ** 2 + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between finite-difference image gradients along every spatial axis."""
    loss = a.new_zeros(())
    for ax in range(2, a.ndim):
        loss = loss + (torch.diff(a, dim=ax) - torch.diff(b, dim=ax)).abs().mean()
    return loss


class VAEStage:
    name = "vae"

    def __init__(self, cfg, data: RunData, rt: Runtime):
        self.cfg, self.data, self.rt, self.tcfg = cfg, data, rt, cfg.vae_train
        torch.manual_seed(cfg.seed)
        run_cfg = dataclasses.replace(cfg.vae, use_flash_attention=cfg.vae.use_flash_attention or rt.flash_attention)
        self.vae = build_vae(run_cfg)
        self.modules: dict[str, torch.nn.Module] = {"vae": self.vae}
        self.wrapped = {"vae": prepare(self.vae, rt)}
        self.optimizers = {"vae": adamw(self.vae.parameters(), self.tcfg.lr, self.tcfg.weight_decay, rt)}
        self.disc = None
        if self.tcfg.adv_weight > 0:
            self.disc = PatchDiscriminator(spatial_dims=cfg.spatial_dims, num_layers_d=3, channels=32,
                                           in_channels=cfg.vae.in_channels, out_channels=1)
            self.modules["discriminator"] = self.disc
            self.wrapped["discriminator"] = prepare(self.disc, rt)
            self.optimizers["discriminator"] = adamw(self.disc.parameters(), self.tcfg.disc_lr, 0.0, rt, (0.5, 0.999))
        self.ema = {}
        if self.tcfg.ema_decay > 0:
            self.ema = {"vae": EMA(self.vae, self.tcfg.ema_decay)}
        # differentiable fp32 SSIM (MONAI's SSIMLoss = 1 - SSIM): medldm.metrics.ssim is a no-grad metric
        self.ssim_loss = SSIMLoss(spatial_dims=cfg.spatial_dims, data_range=DATA_RANGE) \
            if self.tcfg.ssim_weight > 0 else None
        self.augment = Augmenter(cfg.augment, cfg.spatial_dims)
        self.config = to_mapping(cfg)
        self.metrics: dict[str, float] = {}
        self.scale_factor: float | None = None

    # ------------------------------------------------------------------------------ training
    def cpu_batch(self, step: int, micro: int) -> torch.Tensor:
        """(B, 1, *patch) augmented crops for (step, micro-batch), a pure function of the seed and rank."""
        rng = step_rng(self.cfg.seed, step, micro, self.rt.dist.rank)
        idx, corners = self.data.train.draw(rng, self.cfg.data.batch_size)
        return self.augment(self.data.train.crop(idx, corners), rng)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return self.rt.to(x)

    @staticmethod
    def batch_size(batch: torch.Tensor) -> int:
        return batch.shape[0]

    def losses(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        t = self.tcfg
        recon, mu, sigma = self.wrapped["vae"](x)
        recon = recon.float()
        xf = x.float()
        out = {"l1": (recon - xf).abs().mean(), "kl": kl_loss(mu, sigma)}
        total = out["l1"] + t.kl_weight * out["kl"]
        if self.ssim_loss is not None:
            with torch.autocast(device_type=recon.device.type, enabled=False):  # fp32 whatever the run's precision
                out["ssim"] = self.ssim_loss(recon.float(), xf)
            total = total + t.ssim_weight * out["ssim"]
        if t.grad_weight > 0:
            out["grad"] = gradient_l1(recon, xf)
            total = total + t.grad_weight * out["grad"]
        if self.disc is not None and step >= t.adv_start:
            adv = PatchAdversarialLoss(criterion="least_squares")
            self.disc.requires_grad_(False)  # the generator term must not train the discriminator
            g_adv = adv(self.disc(recon.to(x.dtype))[-1].float(), target_is_real=True, for_discriminator=False)
            self.disc.requires_grad_(True)
            # one discriminator forward for real and fake (one DDP forward per backward)
            logits = self.wrapped["discriminator"](torch.cat([x, recon.detach().to(x.dtype)]))[-1].float()
            real, fake = logits.chunk(2)
            d_fake = adv(fake, target_is_real=False, for_discriminator=True)
            d_real = adv(real, target_is_real=True, for_discriminator=True)
            out["adv_g"] = g_adv
            out["adv_d"] = 0.5 * (d_fake + d_real)
            total = total + t.adv_weight * g_adv + t.adv_weight * out["adv_d"]
        out["loss"] = total
        return out

    # ------------------------------------------------------------------------------ evaluation
    def export_net(self) -> torch.nn.Module:
        """The VAE as it will be exported (EMA weights when EMA is on), in eval mode; training weights untouched."""
        if not self.ema:
            return self.vae.eval()
        net = copy.deepcopy(self.vae)
        self.ema["vae"].copy_to(net)
        return net.eval()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        """Deterministic reconstruction (decoder of the posterior mean) by ``net`` (default: the exported VAE)."""
        own = net is None
        net = self.export_net() if own else net
        with self.rt.autocast():
            mu, _ = net.encode(self.rt.to(x))
            r = net.decode(mu).float().cpu()
        if own:
            self.vae.train()
        return r

    @torch.no_grad()
    def validate(self, step: int, net: torch.nn.Module | None = None) -> dict[str, float]:
        """Validation PSNR / SSIM / L1 of ``net`` (default: the exported VAE)."""
        store, prefix = self.data.val_or_train()
        x, _, _ = center_batch(store, self.tcfg.val_max_items)
        net = self.export_net() if net is None else net.eval()
        r = torch.cat([self.reconstruct(x[i:i + 8], net) for i in range(0, len(x), 8)])
        self.vae.train()
        self.metrics = {f"{prefix}psnr": float(psnr(r, x, data_range=DATA_RANGE).mean()),
                        f"{prefix}ssim": float(ssim(r, x, data_range=DATA_RANGE).mean()),
                        f"{prefix}l1": float((r - x).abs().mean())}
        return self.metrics

    def images(self, step: int, path: Path) -> None:
        store, _ = self.data.val_or_train()
        x, _, _ = center_batch(store, 8)
        save_grid([x, self.reconstruct(x)], path)

    @torch.no_grad()
    def compute_scale_factor(self, n_batches: int = 8, net: torch.nn.Module | None = None) -> float:
        """1 / std of sampled latents of ``net`` (default: the exported VAE) over training crops (Rombach et al.
        2022, sec. 4.3 / appendix G)."""
        net = self.export_net() if net is None else net.eval()
        zs = []
        for b in range(n_batches):
            rng = step_rng(self.cfg.seed, 10**9 + b)
            idx, corners = self.data.train.draw(rng, self.cfg.data.batch_size)
            x = self.rt.to(self.data.train.crop(idx, corners))
            with self.rt.autocast():
                mu, sigma = net.encode(x)
            g = torch.Generator().manual_seed(int(rng.integers(2**31)))
            eps = torch.randn(mu.shape, generator=g).to(mu.device)
            zs.append((mu.float() + sigma.float() * eps).flatten().cpu())
        self.vae.train()
        std = float(torch.cat(zs).std())
        self.scale_factor = 1.0 / max(std, 1e-8)
        return self.scale_factor

    def extra(self) -> ModelCard:
        """The model card of the VAE's folder (``extra.json``)."""
        d, cfg = self.data, self.cfg
        return ModelCard(
            stage="vae", task=cfg.task, spatial_dims=cfg.spatial_dims, factor=cfg.factor,
            scale_factor=self.scale_factor if self.scale_factor is not None else 1.0,
            normalization=Normalization(modality=cfg.data.modality, ct_window=cfg.data.ct_window,
                                        method="CT: HU window; else foreground percentiles 0.5/99.5 -> [-1, 1]",
                                        examples=list(d.normalization)),
            patch_size=tuple(cfg.data.patch_size), slice_axis=cfg.data.slice_axis,
            resize_to=tuple(cfg.data.resize_to) if cfg.data.resize_to else None,
            train_scans=d.train_scans, val_scans=d.val_scans,
            val_metrics=self.metrics, metric_range="model range [-1, 1], data_range 2",
        )

    def export(self, path: Path) -> None:
        net = self.export_net()  # the averaged VAE when EMA is on
        self.compute_scale_factor(net=net)  # on the same weights (one EMA copy, not one per call)
        if not self.metrics:  # validation ran on these weights at the last step (engine); else run it now
            self.validate(self.tcfg.steps, net)
        save_model_folder(path, config=self.config, modules={"vae": net}, extra=self.extra())
        self.vae.train()

