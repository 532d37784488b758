"""Network construction from config, conditioning paths of the latent denoiser, EMA."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medldm.models import EMA, UNetConfig, VAEConfig, build_denoiser, build_vae, from_dict, to_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_VAE = VAEConfig(channels=(8, 16), attention_levels=(False, False), norm_num_groups=4, num_res_blocks=1)
TINY_UNET = UNetConfig(channels=(16, 32), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8)



def _randomize_zero_init(model: torch.nn.Module) -> None:
    """MONAI zero-initializes output convolutions; give them weights so outputs depend on the inputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def mr_slices(dipy_files) -> torch.Tensor:
    """Two real MR slices (dipy S0_10slices), 32x32 crops scaled to [0, 1]: (2, 1, 32, 32)."""
    vol = np.asarray(nib.load(dipy_files / "S0_10slices.nii.gz").dataobj, dtype=np.float32)[..., 0]
    x = torch.from_numpy(vol[48:80, 48:80, 4:6]).permute(2, 0, 1)[:, None]
    return x / x.max()


@pytest.mark.parametrize("dims", [2, 3])
def test_vae_shapes_and_downsample_factor(dims, mr_slices):
    cfg = VAEConfig(**{**to_dict(TINY_VAE), "spatial_dims": dims, "channels": (8, 8, 16), "attention_levels": (False,) * 3})
    vae = build_vae(cfg)
    x = mr_slices if dims == 2 else mr_slices[:1, :, :16, :16, None].expand(1, 1, 16, 16, 8).contiguous()
    z_mu, z_sigma = vae.encode(x)
    f = cfg.downsample_factor
    assert f == 4 and z_mu.shape == (x.shape[0], cfg.latent_channels, *(s // f for s in x.shape[2:]))
    assert (z_sigma > 0).all()
    assert vae.decode(z_mu).shape == x.shape


def test_vae_config_errors():
    # medldm's own messages (key-qualified "vae.…"); MONAI's AutoencoderKL errors also say "attention_levels" and
    # "norm_num_groups", so matching those words alone would pass on MONAI's error too.
    with pytest.raises(ValueError, match=r"vae\.attention_levels.* one entry per vae\.channels level"):
        build_vae(VAEConfig(channels=(8, 16), attention_levels=(False,)))
    with pytest.raises(ValueError, match=r"vae\.norm_num_groups.*8.* must divide every vae\.channels entry"):
        build_vae(VAEConfig(channels=(8, 12), attention_levels=(False, False), norm_num_groups=8))
    with pytest.raises(ValueError, match=r"did you mean '(vae\.)?latent_channels'"):
        from_dict(VAEConfig, {"latent_channel": 3})
    cfg = from_dict(UNetConfig, {"channels": [16, 32], "attention_levels": [False, True], "norm_num_groups": 8,
                                 "num_head_channels": 8})
    assert cfg.channels == (16, 32) and to_dict(cfg)["channels"] == [16, 32]


def test_unet_config_errors():
    """medldm's key-qualified messages ("unet.…"), not MONAI DiffusionModelUNet's, which name the same settings."""
    base = to_dict(TINY_UNET)
    with pytest.raises(ValueError, match=r"unet\.attention_levels.* one entry per unet\.channels level"):
        build_denoiser(UNetConfig(**{**base, "attention_levels": (False,)}), spatial_dims=2, latent_channels=4)
    with pytest.raises(ValueError, match=r"unet\.norm_num_groups.*12.* must divide every unet\.channels entry"):
        build_denoiser(UNetConfig(**{**base, "norm_num_groups": 12}), spatial_dims=2, latent_channels=4)
    with pytest.raises(ValueError, match=r"unet\.num_head_channels.*12.* must divide the channels of every attention level"):
        build_denoiser(UNetConfig(**{**base, "num_head_channels": 12}), spatial_dims=2, latent_channels=4)


def test_network_invariants_are_checked_once_by_the_config():
    """The same check and message wherever a config is made: a model folder's section (from_dict), a training
    config (load_config), a direct construction; the builders no longer repeat them."""
    from medldm.config import ConfigError
    from medldm.train.schema import load_config

    bad = {"channels": [16, 24], "attention_levels": [False, False], "norm_num_groups": 16}
    msg = r"^unet\.norm_num_groups=16 must divide every unet\.channels entry$"
    with pytest.raises(ConfigError, match=msg):
        from_dict(UNetConfig, bad, prefix="unet")
    with pytest.raises(ConfigError, match=msg):
        load_config({"unet": bad})
    with pytest.raises(ValueError, match=msg):
        UNetConfig(channels=(16, 24), attention_levels=(False, False), norm_num_groups=16)
    with pytest.raises(ConfigError, match=r"^vae\.attention_levels = \[False\]: needs one entry per vae\.channels level"):
        load_config({"vae": {"channels": [8, 16], "attention_levels": [False]}})


def _cond_denoiser(dims: int = 2):
    cfg = UNetConfig(**{**to_dict(TINY_UNET), "num_classes": 3, "cond_channels": 1, "noise_level_cond": True})
    torch.manual_seed(0)
    d = build_denoiser(cfg, spatial_dims=dims, latent_channels=4).eval()
    _randomize_zero_init(d)
    return d


def test_every_conditioning_input_changes_the_output(mr_slices):
    """Image condition (a real MR slice), class label (incl. null) and the continuous noise level are real inputs."""
    d = _cond_denoiser()
    cond = torch.nn.functional.avg_pool2d(mr_slices, 4)  # (2, 1, 8, 8): the latent grid
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    base = dict(cond=cond, class_labels=torch.tensor([0, 1]), noise_level=torch.tensor([0.1, 0.1]))
    with torch.no_grad():
        ref = d(x, t, **base)
        for k, v in {"noise_level": torch.tensor([0.6, 0.6]), "class_labels": torch.tensor([2, 3]), "cond": cond.flip(-1)}.items():
            out = d(x, t, **{**base, k: v})
            assert (out - ref).abs().mean() > 1e-3 * ref.abs().mean(), k
        assert torch.equal(d(x, t, **base), ref)  # deterministic
        none = d(x, t, **{**base, "class_labels": None})  # None = learned null class
        assert torch.equal(none, d(x, t, **{**base, "class_labels": torch.tensor([3, 3])}))
        # each sample uses its own noise level
        mixed = d(x, t, **{**base, "noise_level": torch.tensor([0.1, 0.6])})
        assert torch.allclose(mixed[0], ref[0], atol=1e-5) and not torch.allclose(mixed[1], ref[1], atol=1e-3)
    assert d.null_class == 3


def test_noise_level_conditioning_learns():
    """A few optimizer steps make the output track the noise level (gradient reaches the level MLP)."""
    d = _cond_denoiser().train()
    opt = torch.optim.Adam(d.parameters(), lr=5e-3)
    x, cond = torch.zeros(4, 4, 8, 8), torch.zeros(4, 1, 8, 8)
    lev = torch.tensor([0.0, 0.3, 0.6, 0.9])
    target = (lev - lev.mean()).reshape(4, 1, 1, 1).expand(4, 4, 8, 8)  # only the level tells them apart
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(d(x, torch.full((4,), 10), cond=cond, class_labels=None, noise_level=lev), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * target.var(unbiased=False).item()  # below what ignoring the level can reach
    assert d.unet.class_embedding.level[0].weight.grad is not None


def test_denoiser_3d_and_input_errors():
    d = build_denoiser(TINY_UNET, spatial_dims=3, latent_channels=2)
    out = d(torch.randn(1, 2, 8, 8, 8), torch.tensor([3]))
    assert out.shape == (1, 2, 8, 8, 8)
    # each message is medldm's (LatentDenoiser's input checks), not one MONAI or torch could also raise
    with pytest.raises(ValueError, match=r"this denoiser is not class-conditional \(unet\.num_classes = 0\)"):
        d(torch.randn(1, 2, 8, 8, 8), torch.tensor([3]), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"this denoiser was built without an image condition \(unet\.cond_channels = 0\)"):
        d(torch.randn(1, 2, 8, 8, 8), torch.tensor([3]), cond=torch.randn(1, 1, 8, 8, 8))
    c = _cond_denoiser()
    with pytest.raises(ValueError, match=r"this denoiser is conditioned on a noise level: pass noise_level in \[0, 1\]"):
        c(torch.randn(1, 4, 8, 8), torch.tensor([3]), cond=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"condition shape \(1, 1, 4, 4\) does not match latent \(1, 4, 8, 8\)"):
        c(torch.randn(1, 4, 8, 8), torch.tensor([3]), cond=torch.zeros(1, 1, 4, 4), noise_level=0.1)


def test_class_labels_are_checked_where_they_are_made():
    """Not in the denoiser's forward pass (a host sync per step on a GPU): training labels in ItemStore.labels,
    [0, num_classes - 1]; a user's label in Synthesizer.generate before sampling, [0, num_classes] (last = null)."""
    from medldm.data.datasets import Item, ItemStore
    from medldm.models import ModelBundle
    from medldm.pipelines.synthesize import Synthesizer

    items = [Item(torch.zeros(1, 8, 8), f"s{i}", source=i) for i in range(3)]
    store = ItemStore(items, (8, 8), 4, num_classes=3, class_from="source")
    assert store.labels(np.array([0, 2, 1])).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match=r"class label 2 \(class_from 'source'\) is outside \[0, 1\]: unet\.num_classes = 2"):
        ItemStore(items, (8, 8), 4, num_classes=2, class_from="source").labels(np.array([0, 2]))
    c = _cond_denoiser()  # no check left in forward: an out-of-range label is the caller's to refuse
    c(torch.randn(1, 4, 8, 8), torch.tensor([3]), cond=torch.zeros(1, 1, 8, 8), class_labels=torch.tensor([3]), noise_level=0.1)
    den = build_denoiser(UNetConfig(**{**to_dict(TINY_UNET), "num_classes": 3}), spatial_dims=2, latent_channels=4)
    from medldm.models.card import read_card

    config, extra = {"vae": to_dict(TINY_VAE)}, {"task": "synthesis", "patch_size": [8, 8]}
    bundle = ModelBundle(config=config, vae=build_vae(TINY_VAE), denoiser=den.eval(), extra=extra,
                         card=read_card(config, extra))
    syn = Synthesizer(bundle)
    for bad in (7, -1, 1.0):
        with pytest.raises(ValueError, match=rf"class label {bad!r} is outside \[0, 3\] \(last = null class\)"):
            syn.generate(label=bad, steps=1)


def test_ema_update_copy_and_state_roundtrip():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net(torch.randn(8, 3))  # changes BatchNorm running stats (buffers are copied, not averaged)
    ema.update(net)
    d1 = 2.0 / 11.0  # warm-up: the first update uses decay min(0.9, (1 + 1) / (10 + 1))
    torch.testing.assert_close(ema.shadow["0.weight"], w0 + (1.0 - d1))
    torch.testing.assert_close(ema.shadow["1.running_mean"], net[1].running_mean)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema.copy_to(other)
    torch.testing.assert_close(other[0].weight, w0 + (1.0 - d1))
    restored = EMA(other, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 1
    torch.testing.assert_close(restored.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\)"):
        EMA(net, decay=1.0)
    ema.num_updates = 1000
    assert ema.current_decay() == 0.9  # warm-up over: the configured decay
