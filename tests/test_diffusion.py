"""Schedules, parametrisation conversions and the training loss."""

from __future__ import annotations

import math

import pytest
import torch

from medldm.diffusion import (
    DiffusionConfig,
    alpha_sigma,
    diffusion_loss,
    make_schedule,
    model_time,
    output_from_x0_eps,
    predict_x0_eps,
    q_sample,
    training_target,
)
from medldm.diffusion.schedules import drop_labels, loss_weight, sample_train_times

CONFIGS = {
    "eps": DiffusionConfig(),
    "v": DiffusionConfig(prediction="v"),
    "x0": DiffusionConfig(prediction="x0"),
    "flow": DiffusionConfig(schedule="flow", prediction="flow"),
}


def test_ddpm_schedule_values():
    sch = make_schedule(DiffusionConfig())
    assert sch.betas.shape == (1000,) and sch.betas.dtype == torch.float64
    assert math.isclose(sch.betas[0].item(), 0.0015) and math.isclose(sch.betas[-1].item(), 0.0195)
    assert (sch.alphas_cumprod.diff() < 0).all()
    assert 1e-5 < sch.alphas_cumprod[-1].item() < 1e-3  # nearly pure noise at t = T-1
    cos = make_schedule(DiffusionConfig(beta_schedule="cosine"))
    assert (cos.betas <= 0.999).all() and cos.alphas_cumprod[0] > 0.999
    a, s = alpha_sigma(sch, torch.tensor([0.0, 10.5, 999.0]))
    torch.testing.assert_close(a**2 + s**2, torch.ones(3, dtype=torch.float64))
    mid = 0.5 * (sch.alphas_cumprod[10] + sch.alphas_cumprod[11])
    assert math.isclose(a[1].item() ** 2, mid.item(), rel_tol=1e-12)
    flow = make_schedule(CONFIGS["flow"])
    a, s = alpha_sigma(flow, torch.tensor([0.0, 0.25, 1.0]))
    assert a.tolist() == [1.0, 0.75, 0.0] and s.tolist() == [0.0, 0.25, 1.0]
    assert model_time(flow, torch.tensor([0.5])).item() == 500.0


def test_config_validation():
    with pytest.raises(ValueError, match=r"diffusion\.schedule: expected one of 'ddpm', 'flow', got 'edm'"):
        DiffusionConfig(schedule="edm")
    with pytest.raises(ValueError, match=r"diffusion\.prediction: 'flow' goes with schedule 'flow'"):
        DiffusionConfig(schedule="flow", prediction="eps")
    with pytest.raises(ValueError, match=r"diffusion\.cfg_dropout: must be in \[0, 1\)"):
        DiffusionConfig(cfg_dropout=1.0)


@pytest.mark.parametrize(("section", "needle"), [
    ({"sampler": "euler"}, "diffusion.sampler: expected one of 'ddim', 'dpmpp_2m', 'unipc', 'euler_flow', got 'euler'; "
                           "did you mean 'euler_flow'?"),
    ({"predicton": "v"}, "diffusion.predicton: unknown key; did you mean 'diffusion.prediction'?"),
    ({"num_train_timesteps": 1.5}, "diffusion.num_train_timesteps: expected int, got 1.5"),
    ({"sampling_steps": 0}, "diffusion.sampling_steps: expected an integer in 1..100000, got 0"),
    ({"beta_start": float("nan")}, "diffusion.beta_start: expected a finite number, got nan"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "diffusion.beta_start / beta_end: need 0 < beta_start <= beta_end < 1"),
    ({"schedule": "flow"}, "diffusion.prediction: 'flow' goes with schedule 'flow'"),
    ([1, 2], "diffusion: expected a section"),
])
def test_config_from_yaml_uses_the_validated_mechanism(section, needle):
    """The diffusion section is checked by medldm.config like every other section: key, type, nearest choice."""
    from medldm.config import ConfigError
    from medldm.diffusion import load_diffusion_config

    with pytest.raises(ConfigError) as e:
        load_diffusion_config(section)
    assert needle in str(e.value)


def test_config_from_yaml_defaults_and_choices():
    from medldm.diffusion import SAMPLERS, load_diffusion_config
    from medldm.diffusion.config import SAMPLER_NAMES

    assert load_diffusion_config(None) == DiffusionConfig()
    cfg = load_diffusion_config({"schedule": "flow", "prediction": "flow", "sampler": "euler_flow", "beta_end": 1e-2})
    assert cfg == DiffusionConfig(schedule="flow", prediction="flow", sampler="euler_flow", beta_end=0.01)
    assert set(SAMPLER_NAMES) == set(SAMPLERS)  # every configurable sampler exists, and only those


@pytest.mark.parametrize("name", list(CONFIGS))
def test_target_and_prediction_round_trip(name):
    """A network that outputs exactly ``training_target`` lets ``predict_x0_eps`` recover x0 and eps."""
    sch = make_schedule(CONFIGS[name])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 5, 5, 5, generator=g, dtype=torch.float64)  # 3D works the same
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 200, 500, 800, 990]) if name != "flow" else torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.99])
    x_t = q_sample(sch, x0, t, eps)
    target = training_target(sch, x0, eps, t)
    x0_hat, eps_hat = predict_x0_eps(sch, x_t, t, target)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(output_from_x0_eps(sch, x0_hat, eps_hat, t), target)


def test_v_target_is_time_derivative_of_angle_path():
    """v = d x / d phi with alpha = cos phi, sigma = sin phi (Salimans & Ho 2022)."""
    sch = make_schedule(CONFIGS["v"])
    x0, eps = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([400])
    a, s = alpha_sigma(sch, t)
    phi = torch.atan2(s, a)
    dphi = 1e-6
    x_plus = torch.cos(phi + dphi) * x0 + torch.sin(phi + dphi) * eps
    x_minus = torch.cos(phi - dphi) * x0 + torch.sin(phi - dphi) * eps
    torch.testing.assert_close(training_target(sch, x0, eps, t), (x_plus - x_minus) / (2 * dphi), atol=1e-6, rtol=0)


class _Oracle(torch.nn.Module):
    """Knows the data is a single point x*: returns the exact target (optionally perturbed)."""

    num_classes = 0

    def __init__(self, sch, x_star, bias=0.0):
        super().__init__()
        self.sch, self.x_star, self.bias = sch, x_star, bias

    def forward(self, x_t, t, cond=None, class_labels=None, noise_level=None):
        tt = t.double() / (self.sch.num_train_timesteps if self.sch.kind == "flow" else 1)
        a, s = alpha_sigma(self.sch, tt)
        a, s = (v.reshape(-1, 1, 1, 1).to(x_t) for v in (a, s))
        x0 = self.x_star.expand_as(x_t)
        eps = (x_t - a * x0) / s.clamp_min(1e-12)
        return output_from_x0_eps(self.sch, x0, eps, tt) + self.bias


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_is_zero_for_the_exact_denoiser(name):
    sch = make_schedule(CONFIGS[name])
    x_star = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = x_star.expand(8, -1, -1, -1)
    exact = diffusion_loss(_Oracle(sch, x_star), sch, x0, generator=torch.Generator().manual_seed(2))
    off = diffusion_loss(_Oracle(sch, x_star, bias=0.1), sch, x0, generator=torch.Generator().manual_seed(2))
    assert exact.item() < 1e-10
    assert math.isclose(off.item(), 0.01, rel_tol=1e-6)


def test_loss_is_seeded_and_sees_its_inputs():
    calls = {}

    class Spy(torch.nn.Module):
        num_classes = 4

        def forward(self, x_t, t, cond=None, class_labels=None, noise_level=None):
            calls.update(t=t, labels=class_labels, cond=cond, level=noise_level)
            return torch.zeros_like(x_t)

    sch = make_schedule(DiffusionConfig(cfg_dropout=0.5))
    x0 = torch.zeros(2000, 1, 1, 1)
    labels = torch.randint(0, 4, (2000,), generator=torch.Generator().manual_seed(0))
    cond, lev = torch.ones(2000, 3, 1, 1), torch.full((2000,), 0.3)
    a = diffusion_loss(Spy(), sch, x0, cond=cond, class_labels=labels, noise_level=lev, generator=torch.Generator().manual_seed(5))
    dropped = calls["labels"] == 4
    assert 0.45 < dropped.float().mean().item() < 0.55  # cfg_dropout
    assert torch.equal(calls["labels"][~dropped], labels[~dropped])
    assert calls["cond"] is cond and calls["level"] is lev
    assert calls["t"].min() >= 0 and calls["t"].max() <= 999 and calls["t"].float().std() > 200
    b = diffusion_loss(Spy(), sch, x0, cond=cond, class_labels=labels, noise_level=lev, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()
    diffusion_loss(Spy(), sch, x0)  # no labels given: all samples get the null class
    assert (calls["labels"] == 4).all()


def test_min_snr_weights_and_flow_times():
    sch = make_schedule(DiffusionConfig(min_snr_gamma=5.0))
    t = torch.tensor([0, 100, 999])
    w = loss_weight(sch, t)
    a, s = alpha_sigma(sch, t)
    snr = (a / s) ** 2
    torch.testing.assert_close(w, snr.clamp(max=5.0) / snr)
    assert w[0] < 0.01 and w[-1] == 1.0
    assert loss_weight(make_schedule(DiffusionConfig()), t) is None
    shifted = make_schedule(DiffusionConfig(schedule="flow", prediction="flow", flow_shift=3.0))
    u = sample_train_times(shifted, 4000, torch.Generator().manual_seed(0))
    assert 0 <= u.min() and u.max() <= 1 and u.mean() > 0.6  # shift > 1 favours noisy times
    lab = drop_labels(torch.zeros(1000, dtype=torch.long), 9, 0.0)
    assert (lab == 0).all()


def test_tiny_denoiser_training_reduces_loss():
    """End to end on CPU: a tiny LatentDenoiser learns to denoise two fixed latents (loss falls)."""
    from medldm.models import UNetConfig, build_denoiser

    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = UNetConfig(channels=(16, 32), attention_levels=(False, False), num_res_blocks=1, num_head_channels=8, norm_num_groups=8)
        net = build_denoiser(cfg, spatial_dims=2, latent_channels=2)
        sch = make_schedule(DiffusionConfig(prediction="v"))
        x0 = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)).repeat(4, 1, 1, 1)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(4)
        eval_loss = []
        for step in range(60):
            loss = diffusion_loss(net, sch, x0, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (0, 59):
                with torch.no_grad():
                    eval_loss.append(diffusion_loss(net, sch, x0, generator=torch.Generator().manual_seed(9)).item())
        assert eval_loss[1] < 0.6 * eval_loss[0]
    finally:
        torch.set_num_threads(n)
