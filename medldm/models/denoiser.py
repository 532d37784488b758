"""Latent denoiser: MONAI ``DiffusionModelUNet`` with image, class and continuous-level conditioning.

Conditioning paths (all *real* inputs of the network):

* ``cond`` (N, C_c, *S): an image (e.g. the low-resolution or noisy scan, resampled to the latent grid, or its
  latent) concatenated to the noisy latent on channels;
* ``class_labels`` (N,) int: classes ``0..num_classes-1``; index ``num_classes`` is a *learned* null class used
  for classifier-free guidance (``LatentDenoiser.null_class``);
* ``noise_level`` (N,) float in [0, 1]: sinusoidal embedding -> MLP, added to the time embedding.

MONAI's U-Net adds ``class_embedding(class_labels)`` to its time embedding. We put ``_CondEmbedding`` in that
slot and hand it a packed float tensor ``(N, 2) = [class index, noise level]``, so the network stays one stateless
MONAI forward (works with ``torch.compile`` and DDP).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from medldm.data.tissue import one_hot
from medldm.models.conditioning import space_to_depth
from medldm.models.config import UNetConfig


class _CondEmbedding(nn.Module):
    """Sum of a class embedding (``num_classes + 1`` rows, last = null) and a noise-level MLP embedding."""

    def __init__(self, num_classes: int, noise_level: bool, freq_dim: int, emb_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.classes = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.level = (
            nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if noise_level else None
        )

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        """packed: (N, 2) float = [class index, noise level in [0, 1]] -> (N, emb_dim)."""
        emb = None
        if self.classes is not None:
            emb = self.classes(packed[:, 0].round().long())
        if self.level is not None:
            f = get_timestep_embedding(packed[:, 1].float() * 1000.0, self.freq_dim)
            e = self.level(f.to(self.level[0].weight.dtype))
            emb = e if emb is None else emb + e
        assert emb is not None
        return emb


class LatentDenoiser(nn.Module):
    """x_t (N, C, *S) + time t (N,) on the [0, num_train_timesteps) scale -> model output (N, C, *S).

    What the output means (eps, v, x0 or flow velocity) is set by the ``DiffusionConfig`` it was trained with.
    """

    def __init__(self, cfg: UNetConfig, spatial_dims: int, latent_channels: int):
        super().__init__()  # cfg checked its own invariants when it was made (UNetConfig.__post_init__)
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.num_classes = int(cfg.num_classes)
        self.cond_channels = int(cfg.cond_channels)
        self.noise_level_cond = bool(cfg.noise_level_cond)
        conditioned = self.num_classes > 0 or self.noise_level_cond
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=latent_channels + self.cond_channels,
            out_channels=latent_channels,
            num_res_blocks=cfg.num_res_blocks,
            channels=tuple(cfg.channels),
            attention_levels=tuple(cfg.attention_levels),
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=cfg.num_head_channels,
            num_class_embeds=(self.num_classes + 1) if conditioned else None,
            use_flash_attention=cfg.use_flash_attention,
        )
        if conditioned:
            emb_dim = cfg.channels[0] * 4
            self.unet.class_embedding = _CondEmbedding(self.num_classes, self.noise_level_cond, cfg.channels[0], emb_dim)

    @property
    def null_class(self) -> int:
        """Index of the learned null class (classifier-free guidance); -1 when not class-conditional."""
        return self.num_classes if self.num_classes > 0 else -1

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t: (N, C, *S); t: (N,) or scalar; cond: (N, cond_channels, *S); class_labels: (N,) int, None = null
        class; noise_level: (N,) float in [0, 1] (required when the model is noise-level conditioned)."""
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(n)
        if self.cond_channels:
            if cond is None:
                raise ValueError(f"this denoiser needs an image condition with {self.cond_channels} channel(s)")
            if cond.shape[0] != n or cond.shape[2:] != x_t.shape[2:] or cond.shape[1] != self.cond_channels:
                raise ValueError(f"condition shape {tuple(cond.shape)} does not match latent {tuple(x_t.shape)}")
            x_t = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("this denoiser was built without an image condition (unet.cond_channels = 0)")
        packed = None
        if self.num_classes > 0 or self.noise_level_cond:
            packed = torch.zeros(n, 2, device=x_t.device, dtype=torch.float32)
            if self.num_classes > 0:
                if class_labels is None:
                    packed[:, 0] = self.num_classes
                else:
                    # labels in [0, num_classes] (last = null class) are checked where they are made (training:
                    # ItemStore.labels; synthesis: Synthesizer.generate), not here: a check would sync the host
                    labels = torch.as_tensor(class_labels, device=x_t.device).reshape(-1).expand(n)
                    packed[:, 0] = labels.float()
            elif class_labels is not None:
                raise ValueError("this denoiser is not class-conditional (unet.num_classes = 0)")
            if self.noise_level_cond:
                if noise_level is None:
                    raise ValueError("this denoiser is conditioned on a noise level: pass noise_level in [0, 1]")
                packed[:, 1] = torch.as_tensor(noise_level, device=x_t.device, dtype=torch.float32).reshape(-1).expand(n)
            elif noise_level is not None:
                raise ValueError("this denoiser was built without noise-level conditioning (unet.noise_level_cond)")
        elif class_labels is not None:
            raise ValueError("this denoiser is not class-conditional (unet.num_classes = 0)")
        elif noise_level is not None:
            raise ValueError("this denoiser was built without noise-level conditioning (unet.noise_level_cond)")
        return self.unet(x_t, t, class_labels=packed)


def build_denoiser(cfg: UNetConfig, spatial_dims: int, latent_channels: int) -> LatentDenoiser:
    """Build the latent denoiser for latents with ``latent_channels`` channels in ``spatial_dims`` D."""
    return LatentDenoiser(cfg, spatial_dims, latent_channels)


def mask_condition(labels: torch.Tensor, classes: int, factor: int) -> torch.Tensor:
    """The U-Net's image condition for a label map (mask-conditioned synthesis): (N, *S) int labels in
    0..classes-1 -> one-hot -> space-to-depth onto the latent grid, (N, classes * f**d, *S / f), so every pixel's
    label reaches the network (no pooling). Shared by training (``medldm.train.ldm_stage``) and inference
    (``medldm.pipelines.synthesize``)."""
    return space_to_depth(one_hot(labels, classes), factor)
