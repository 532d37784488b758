"""Samplers against analytic data distributions whose exact denoiser is known in closed form.

For Gaussian data N(mu, s^2) the probability-flow ODE maps the standardized noisy value
z = (x_t - a_t mu) / sqrt(a_t^2 s^2 + sigma_t^2) to the clean value mu + s z exactly, so a deterministic
sampler's error is measurable per sample.
"""

from __future__ import annotations

import math

import pytest
import torch

from medldm.diffusion import (
    DiffusionConfig,
    alpha_sigma,
    make_model_fn,
    make_schedule,
    output_from_x0_eps,
    sample,
    sample_ddim,
    sample_euler_flow,
    sample_many,
    sampling_times,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MU, S = 0.5, 1.0
DDPM = {"eps": DiffusionConfig(), "v": DiffusionConfig(prediction="v"), "x0": DiffusionConfig(prediction="x0")}
FLOW = DiffusionConfig(schedule="flow", prediction="flow")


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def gaussian_model(schedule, mu=MU, s=S):
    """Exact network output for data N(mu, s^2) i.i.d. per element, under the schedule's parametrisation."""

    def fn(x, t):
        a, sg = (_bc(v, x) for v in alpha_sigma(schedule, t.double()))
        x0 = mu + a * s * s / (a * a * s * s + sg * sg) * (x - a * mu)
        return output_from_x0_eps(schedule, x0, (x - a * x0) / sg.clamp_min(1e-12), t.double())

    return fn


def mixture_model(schedule, weights, means, stds):
    """Exact network output for a 1D Gaussian mixture."""
    w, m, sd = (torch.tensor(v, dtype=torch.float64) for v in (weights, means, stds))

    def fn(x, t):
        a, sg = (_bc(v, x)[..., None] for v in alpha_sigma(schedule, t.double()))
        xe = x[..., None]
        var = a * a * sd**2 + sg * sg
        logp = torch.log(w) - 0.5 * torch.log(var) - 0.5 * (xe - a * m) ** 2 / var
        r = torch.softmax(logp, dim=-1)
        x0 = (r * (m + a * sd**2 / var * (xe - a * m))).sum(-1)
        a0, s0 = a[..., 0], sg[..., 0]
        return output_from_x0_eps(schedule, x0, (x - a0 * x0) / s0.clamp_min(1e-12), t.double())

    return fn


def _start(schedule, z, mu=MU, s=S):
    a, sg = (float(v) for v in alpha_sigma(schedule, torch.tensor(schedule.t_max)))
    return a * mu + math.sqrt(a * a * s * s + sg * sg) * z



@pytest.fixture(scope="module")
def z():
    return torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(-1, 1, 1)


def _err(name, cfg, z, steps, **kw):
    sch = make_schedule(cfg)
    out = sample(name, gaussian_model(sch), _start(sch, z), sch, steps, **kw)
    return (out - (MU + S * z)).abs().max().item()


@pytest.mark.parametrize("cfg", [DDPM["eps"], FLOW], ids=["ddpm", "flow"])
def test_ddim_first_order_dpmpp_second_order(cfg, z):
    """Deterministic DDIM halves its error per doubling of steps; DPM-Solver++(2M) quarters it (or better)."""
    ddim = [_err("ddim", cfg, z, n) for n in (20, 40, 80)]
    dpm = [_err("dpmpp_2m", cfg, z, n, spacing="logsnr") for n in (10, 20, 40)]
    assert 1.6 < ddim[0] / ddim[1] < 2.5 and 1.6 < ddim[1] / ddim[2] < 2.5, ddim
    assert dpm[0] / dpm[1] > 2.8 and dpm[1] / dpm[2] > 3.5, dpm
    assert _err("dpmpp_2m", cfg, z, 20) < 0.05  # 20 steps: within 1.5 % of the +-3.5 range
    assert _err("dpmpp_2m", cfg, z, 20) < _err("ddim", cfg, z, 20) / 5
    unipc = [_err("unipc", cfg, z, n) for n in (10, 20)]
    assert unipc[0] / unipc[1] > 5 and unipc[1] < 0.6 * _err("dpmpp_2m", cfg, z, 20), unipc  # corrector: order > 2


def test_thousand_step_ddim_matches_ode_solution(z):
    assert _err("ddim", DDPM["eps"], z, 1000, spacing="trailing") < 0.01
    assert _err("euler_flow", FLOW, z, 1000) < 0.01


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc"])
def test_parametrisations_agree(name, z):
    """eps-, v- and x0-prediction networks that encode the same denoiser give the same samples."""
    outs = []
    for cfg in DDPM.values():
        sch = make_schedule(cfg)
        g = torch.Generator().manual_seed(3)
        outs.append(sample(name, gaussian_model(sch), _start(sch, z), sch, 12, generator=g))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-9, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-9, rtol=0)


def test_euler_flow_is_ddim_on_flow(z):
    sch = make_schedule(FLOW)
    x = _start(sch, z)
    torch.testing.assert_close(
        sample_euler_flow(gaussian_model(sch), x, sch, sampling_times(sch, 7)),
        sample_ddim(gaussian_model(sch), x, sch, sampling_times(sch, 7)), atol=1e-9, rtol=0
    )
    ddpm = make_schedule(DDPM["eps"])
    with pytest.raises(ValueError, match="flow"):
        sample_euler_flow(gaussian_model(ddpm), x, ddpm, sampling_times(ddpm, 3))


@pytest.mark.parametrize(("cfg", "name"), [(DDPM["v"], "dpmpp_2m"), (FLOW, "dpmpp_2m"), (DDPM["eps"], "unipc")],
                         ids=["ddpm-v-dpmpp", "flow-dpmpp", "ddpm-eps-unipc"])
def test_mixture_distribution_few_steps(cfg, name):
    """A bimodal mixture sampled with 20 steps from N(0, I): right mode weights, means and spreads."""
    sch = make_schedule(cfg)
    w, m, sd = (0.3, 0.7), (-2.0, 1.5), (0.3, 0.5)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(8000, 1, 1, generator=g, dtype=torch.float64)  # ddpm: marginal ~ N(0, 1) at t = T-1
    out = sample(name, mixture_model(sch, w, m, sd), x_t, sch, 20).flatten()
    mean = sum(wi * mi for wi, mi in zip(w, m, strict=True))
    std = math.sqrt(sum(wi * (si**2 + mi**2) for wi, mi, si in zip(w, m, sd, strict=True)) - mean**2)
    assert abs(out.mean().item() - mean) < 0.04 and abs(out.std().item() - std) < 0.03
    left, right = out[out < 0], out[out >= 0]
    assert abs(len(left) / len(out) - 0.3) < 0.015
    assert abs(left.median().item() + 2.0) < 0.03 and abs(right.median().item() - 1.5) < 0.03
    iqr = [torch.quantile(v, 0.75) - torch.quantile(v, 0.25) for v in (left, right)]
    assert abs(iqr[0].item() / 1.349 - 0.3) < 0.03 and abs(iqr[1].item() / 1.349 - 0.5) < 0.03


def test_ancestral_ddim_distribution():
    """eta = 1 DDIM on all 1000 training steps is DDPM ancestral sampling: it samples N(mu, s^2)."""
    sch = make_schedule(DDPM["eps"])
    g = torch.Generator().manual_seed(1)
    x_t = _start(sch, torch.randn(3000, 1, 1, generator=g, dtype=torch.float64))
    out = sample_ddim(gaussian_model(sch), x_t, sch, sampling_times(sch, 1000, spacing="trailing"), eta=1.0, generator=g)
    assert abs(out.mean().item() - MU) < 0.05
    assert abs(out.std().item() - S) < 0.05
    ts = sampling_times(sch, 5)
    again = sample_ddim(gaussian_model(sch), x_t, sch, ts, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(again, sample_ddim(gaussian_model(sch), x_t, sch, ts, eta=1.0, generator=g))


def test_samplers_run_in_3d_and_keep_shape():
    sch = make_schedule(DDPM["eps"])
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    for name in ("ddim", "dpmpp_2m", "unipc"):
        out = sample(name, gaussian_model(sch), x, sch, 4)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_sampling_times():
    sch = make_schedule(DDPM["eps"])
    for spacing in ("logsnr", "karras", "trailing", "linspace"):
        ts = sampling_times(sch, 10, spacing=spacing)
        assert len(ts) == 10 and ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert sampling_times(sch, 1) == [999.0]
    assert sampling_times(sch, 3, t_start=300)[0] == 300
    flow = make_schedule(FLOW)
    assert sampling_times(flow, 4) == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError):
        sampling_times(flow, 4, spacing="trailing")
    # "auto" is chosen per sampler here, in the one grid function (the samplers take the grid as given)
    assert sampling_times(flow, 4, sampler="euler_flow") == sampling_times(flow, 4, spacing="uniform")
    assert sampling_times(flow, 4, sampler="dpmpp_2m") == sampling_times(flow, 4, spacing="logsnr")
    assert sampling_times(sch, 4, sampler="euler_flow") == sampling_times(sch, 4, spacing="logsnr")
    with pytest.raises(ValueError):
        sample("nope", gaussian_model(sch), torch.zeros(1), sch, 2)


class _ToyDenoiser(torch.nn.Module):
    """Output = x * (1 + class) + noise_level + cond: lets CFG arithmetic be checked exactly."""

    num_classes = 3

    def forward(self, x, t, cond=None, class_labels=None, noise_level=None):
        lab = class_labels.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        out = x * (1 + lab) + noise_level.reshape(-1, *([1] * (x.ndim - 1)))
        return out + cond if cond is not None else out


def test_classifier_free_guidance_formula():
    sch = make_schedule(DDPM["eps"])
    x, cond = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    d = _ToyDenoiser()
    fn = make_model_fn(d, sch, cond=cond, class_labels=1, guidance=3.0, noise_level=0.2)
    out_c, out_u = x * 2 + 0.2 + cond, x * 4 + 0.2 + cond  # null class = 3
    torch.testing.assert_close(fn(x, torch.tensor(10.0)), out_u + 3.0 * (out_c - out_u))
    plain = make_model_fn(d, sch, cond=cond, class_labels=torch.tensor([0, 2]), noise_level=0.2)
    torch.testing.assert_close(plain(x, torch.tensor(10.0)), x * torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1) + 0.2 + cond)
    with pytest.raises(ValueError, match="class_labels"):
        make_model_fn(d, sch, guidance=2.0)


def test_sample_many_mean_std_and_posterior_mean_beats_one_sample():
    """Posterior mean of K ancestral samples has lower MSE to the truth than any single sample."""
    torch.manual_seed(0)
    xs = torch.randn(5, 100, dtype=torch.float64)
    mean, std = sample_many(5, lambda i: xs[i])
    torch.testing.assert_close(mean, xs.mean(0))
    torch.testing.assert_close(std, xs.std(0))
    sch = make_schedule(DDPM["eps"])
    g = torch.Generator().manual_seed(5)
    x0 = MU + S * torch.randn(1, 1, 2000, generator=g, dtype=torch.float64)
    t = 300
    a, sg = (float(v) for v in alpha_sigma(sch, torch.tensor(float(t))))
    x_t = a * x0 + sg * torch.randn(x0.shape, generator=g, dtype=torch.float64)

    def draw(i):
        return sample_ddim(gaussian_model(sch), x_t, sch, sampling_times(sch, 30, t_start=t), eta=1.0, generator=g)

    mean, std = sample_many(8, draw)
    one = draw(0)
    assert ((mean - x0) ** 2).mean() < 0.7 * ((one - x0) ** 2).mean()
    post_std = S * sg / math.sqrt(a * a * S * S + sg * sg)  # exact posterior std of x0 given x_t
    assert abs(std.mean().item() / post_std - 1) < 0.2
