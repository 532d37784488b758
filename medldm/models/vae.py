"""Stage-1 autoencoder: MONAI ``AutoencoderKL`` built from a ``VAEConfig``."""

from __future__ import annotations

from monai.networks.nets import AutoencoderKL

from medldm.models.config import VAEConfig


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """KL autoencoder: image (N, in_channels, *S) <-> latent (N, latent_channels, *S / f), f = 2**(levels-1).

    ``cfg`` checked its own invariants when it was made (``VAEConfig.__post_init__``)."""
    return AutoencoderKL(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_res_blocks=cfg.num_res_blocks,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_decoder_nonlocal_attn,
        use_flash_attention=cfg.use_flash_attention,
    )
