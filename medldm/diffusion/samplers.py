"""Samplers: plain functions over tensors, k-diffusion style (any spatial rank; 2D and 3D alike).

Every sampler takes ``model_fn(x, t) -> network output`` (see ``medldm.diffusion.guidance.make_model_fn``),
the start noise ``x_T`` (N, C, *S), the ``Schedule`` and the descending network times ``ts`` (one network
evaluation each); it returns the clean estimate x0 (N, C, *S). As in k-diffusion (which passes ``sigmas`` in),
the time grid is made in one place, :func:`sampling_times` (its "auto" spacing is chosen per sampler there), and
passed into the sampler; the last step always lands on the clean end of the path (alpha = 1, sigma = 0).
:data:`SAMPLERS` is the one registry: a name (``medldm.models.config.SAMPLER_NAMES``, what a model folder and
``--sampler`` may name) -> its function; :func:`sample` makes the grid and runs one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from medldm.diffusion.schedules import Schedule, alpha_sigma, predict_x0_eps, randn_like
from medldm.models.config import SAMPLER_NAMES

FLOW_SBAR_MAX = 80.0  # largest sigma/alpha of the flow logsnr/karras grids (EDM's sigma_max)
FLOW_SBAR_MIN = 0.04  # smallest one: about sigma/alpha of the default ddpm schedule at t = 0
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
#: the "auto" grid of each sampler on a flow schedule: Euler / DDIM take the uniform rectified-flow grid, the
#: multistep solvers in log-SNR the logsnr grid (on ddpm every sampler's "auto" is logsnr)
FLOW_AUTO_SPACING = {"ddim": "uniform", "euler_flow": "uniform", "dpmpp_2m": "logsnr", "unipc": "logsnr"}


def sampling_times(
    schedule: Schedule, steps: int, t_start: float | None = None, spacing: str = "auto", sampler: str | None = None
) -> list[float]:
    """``steps`` descending network times from ``t_start`` (default: the noisiest time); the sampler then
    takes one last step to the clean end of the path. The one place the time grid is made.

    spacing ("auto": logsnr for ddpm; for flow ``FLOW_AUTO_SPACING[sampler]``, uniform without a sampler):
      * "logsnr": uniform in log(sigma/alpha), the grid of DPM-Solver (Lu et al. 2022); default for ddpm;
      * "karras": (sigma/alpha)**(1/7) uniform (Karras et al. 2022, "Elucidating the Design Space ...", eq. 5);
      * "trailing" (ddpm): ``t_i = round(T - i T / steps) - 1`` (Lin et al. 2023); "linspace" (ddpm);
      * "uniform" (flow): t = 1, 1 - 1/N, ... (rectified-flow Euler); default for flow.
    logsnr/karras grids run from the noisiest time down to sigma/alpha = 0.04 (ddpm: t = 0), so the final
    first-order jump to clean data is tiny; for flow the first call is at t = 1 and the grid starts at
    sigma/alpha = 80. Flow times are then warped by ``schedule.flow_shift`` (Esser et al. 2024). A smaller
    ``t_start`` starts part-way along the path (SDEdit-style refinement).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    flow = schedule.kind == "flow"
    if spacing == "auto":
        spacing = FLOW_AUTO_SPACING.get(sampler or "", "uniform") if flow else "logsnr"
    allowed = ("uniform", "logsnr", "karras") if flow else ("logsnr", "karras", "trailing", "linspace")
    if spacing not in allowed:
        raise ValueError(f"spacing {spacing!r} not available for schedule {schedule.kind!r}; use one of {allowed}")
    n = schedule.num_train_timesteps
    top = (1.0 if t_start is None else min(max(float(t_start), 0.0), 1.0)) if flow else (
        float(n - 1) if t_start is None else min(max(float(t_start), 0.0), n - 1.0)
    )
    if spacing == "uniform":
        ts = [top * (1 - i / steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = [float(max(round((top + 1) * (1 - i / steps)) - 1, 0)) for i in range(steps)]
    elif spacing == "linspace":
        ts = [top * (1 - i / max(steps - 1, 1)) for i in range(steps)]
    elif flow:  # sigma/alpha = t / (1 - t)
        hi = top / (1 - top) if top < 1 else math.inf
        first = [top] if hi > FLOW_SBAR_MAX else []
        grid = _sbar_grid(min(hi, FLOW_SBAR_MAX), FLOW_SBAR_MIN, steps - len(first), spacing)
        ts = first + [v / (1 + v) for v in grid.tolist()]
    else:
        log_sbar = 0.5 * torch.log((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)  # increasing in t
        t_grid = torch.arange(n, dtype=torch.float64)
        hi = float(_interp(torch.tensor([top], dtype=torch.float64), t_grid, log_sbar).exp())
        grid = _sbar_grid(hi, float(log_sbar[0].exp()), steps, spacing)
        ts = _interp(grid.log(), log_sbar, t_grid).clamp(0, top).tolist()
        ts[0] = top
    if flow and schedule.flow_shift != 1.0:
        sh = schedule.flow_shift
        ts = [sh * u / (1 + (sh - 1) * u) for u in ts]
    return [float(t) for t in ts]


def _sbar_grid(hi: float, lo: float, n: int, spacing: str, rho: float = 7.0) -> torch.Tensor:
    """n values of sigma/alpha from hi down to lo: geometric ("logsnr") or Karras-spaced ("karras")."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.float64)
    if n == 1:
        return torch.tensor([hi], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    if spacing == "logsnr":
        return torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy.interp) for increasing ``xp``."""
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return f0 + w * (f1 - f0)


def _coeffs(schedule: Schedule, ts: list[float]) -> tuple[list[float], list[float]]:
    """(alpha, sigma) as Python floats at each time, with the clean end (1, 0) appended."""
    a, s = alpha_sigma(schedule, torch.tensor(ts, dtype=torch.float64))
    return a.tolist() + [1.0], s.tolist() + [0.0]


def _x0_eps(model_fn: ModelFn, schedule: Schedule, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float64)
    out = model_fn(x, tt)
    return predict_x0_eps(schedule, x, torch.tensor(t, dtype=torch.float64), out.to(x.dtype))


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    ts: list[float],
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12).

    ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z`` with
    ``c = eta * sigma_s * sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)`` (the posterior std for eta = 1).
    eta = 0 is deterministic (a first-order solver of the probability-flow ODE; for ``flow`` it is Euler).
    """
    al, si = _coeffs(schedule, ts)
    x = x_T
    for i, t in enumerate(ts):
        x0, eps = _x0_eps(model_fn, schedule, x, t)
        a_t, s_t, a_s, s_s = al[i], si[i], al[i + 1], si[i + 1]
        c = 0.0
        if eta > 0 and s_s > 0:
            r = (a_t * s_s / (a_s * s_t)) if s_t > 0 else 0.0
            c = eta * s_s * math.sqrt(max(1.0 - r * r, 0.0))
        x = a_s * x0 + math.sqrt(max(s_s * s_s - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * randn_like(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    ts: list[float],
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Alg. 2): second-order multistep in lambda = log(alpha / sigma), data prediction.

    ``x_s = (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) D``, ``h = lambda_s - lambda_t``,
    ``D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``, ``r = h_{i-1} / h``; first order on the first and last step
    (as in k-diffusion). Deterministic; ``generator`` is accepted for a uniform signature.
    """
    del generator
    al, si = _coeffs(schedule, ts)
    lam = [_lambda(a, s) for a, s in zip(al, si, strict=True)]
    x, prev_x0, h_prev = x_T, None, None
    for i, t in enumerate(ts):
        x0, _ = _x0_eps(model_fn, schedule, x, t)
        s_t, a_s, s_s = si[i], al[i + 1], si[i + 1]
        if s_s == 0.0:
            x = x0  # last step lands on the data prediction
        else:
            h = lam[i + 1] - lam[i]
            ratio = s_s / s_t
            decay = math.exp(-h) if math.isfinite(h) else 0.0  # e^{-h} = alpha_t sigma_s / (alpha_s sigma_t)
            if prev_x0 is None or h_prev is None or not math.isfinite(h_prev):
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = ratio * x + a_s * (1.0 - decay) * d
            h_prev = h
        prev_x0 = x0
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_euler_flow(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    ts: list[float],
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE ``dx/dt = v(x, t)`` from t = 1 to 0 (Liu et al. 2022,
    "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow")."""
    del generator
    if schedule.kind != "flow":
        raise ValueError("sample_euler_flow needs a schedule='flow' model; use 'ddim' or 'dpmpp_2m'")
    ts = [*ts, 0.0]
    x = x_T
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, eps = _x0_eps(model_fn, schedule, x, t)
        x = x + (s - t) * (eps - x0)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_unipc(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    ts: list[float],
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """UniPC-2, B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
    Framework for Fast Sampling of Diffusion Models"; the multistep form of diffusers' UniPCMultistepScheduler).

    Each network call serves twice: UniC corrects the point it was evaluated at (no extra call), then UniP takes
    the next second-order step. First order on the first step and into the clean end. Deterministic.
    """
    del generator
    al, si = _coeffs(schedule, ts)
    lam = [_lambda(a, s) for a, s in zip(al, si, strict=True)]
    outs: list[torch.Tensor] = []  # x0 predictions at ts[0..i]
    x, x_from, order_used = x_T, None, 1
    for i, t in enumerate(ts):
        m, _ = _x0_eps(model_fn, schedule, x, t)
        if x_from is not None:  # UniC: correct x_i with m_i, the step (i-1 -> i) taken from x_from
            x = _unipc(x_from, outs[-1], i - 1, i, outs[-2:-1], al, si, lam, order_used, m_t=m)
        outs.append(m)
        order_used = 2 if len(outs) >= 2 and si[i + 1] > 0 else 1
        x_from = x
        x = _unipc(x, m, i, i + 1, outs[-2:-1], al, si, lam, order_used)
        if callback is not None:
            callback(i, x, m)
    return x


def _unipc(x, m0, s, t, older, al, si, lam, order, m_t=None):
    """One UniP (m_t None) or UniC step from index s to t; ``older`` = [x0 prediction at s - 1] for order 2."""
    h = lam[t] - lam[s]
    hh = -h
    h_phi_1 = math.expm1(hh) if math.isfinite(hh) else -1.0  # e^{-h} - 1
    b_h = h_phi_1
    x_ = (si[t] / si[s]) * x - al[t] * h_phi_1 * m0
    use2 = order == 2 and older and math.isfinite(h) and math.isfinite(lam[s - 1])
    if not use2:
        return x_ if m_t is None else x_ - al[t] * b_h * 0.5 * (m_t - m0)
    rk = (lam[s - 1] - lam[s]) / h
    d1 = (older[0] - m0) / rk
    if m_t is None:
        return x_ - al[t] * b_h * 0.5 * d1  # UniP-2: rho = 1/2
    h_phi_k = h_phi_1 / hh - 1.0
    b1 = h_phi_k / b_h
    b2 = (h_phi_k / hh - 0.5) * 2.0 / b_h
    # solve [[1, 1], [rk, 1]] rho = [b1, b2]
    rho0 = (b1 - b2) / (1.0 - rk)
    rho1 = b1 - rho0
    return x_ - al[t] * b_h * (rho0 * d1 + rho1 * (m_t - m0))

def _lambda(a: float, s: float) -> float:
    """Half log-SNR, +-inf at the ends of the path."""
    if a <= 0.0:
        return -math.inf
    if s <= 0.0:
        return math.inf
    return math.log(a) - math.log(s)


#: the one sampler registry: name -> function; the names are ``medldm.models.config.SAMPLER_NAMES`` (what a
#: model folder's ``diffusion.sampler`` and ``--sampler`` may name, listed there without importing torch)
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "euler_flow": sample_euler_flow,
}
if tuple(SAMPLERS) != SAMPLER_NAMES:  # pragma: no cover - a sampler added on one side only
    raise ImportError(f"medldm.diffusion.samplers.SAMPLERS {tuple(SAMPLERS)} != SAMPLER_NAMES {SAMPLER_NAMES}")


def sample(
    name: str,
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int,
    generator: torch.Generator | None = None,
    t_start: float | None = None,
    spacing: str = "auto",
    **kwargs,
) -> torch.Tensor:
    """Run sampler ``name`` (one of :data:`SAMPLERS`) on the grid ``sampling_times(schedule, steps, t_start,
    spacing, name)``; extra kwargs go to it (e.g. ``eta``, ``callback``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    ts = sampling_times(schedule, steps, t_start, spacing, sampler=name)
    return SAMPLERS[name](model_fn, x_T, schedule, ts, generator=generator, **kwargs)


def start_noise(
    shape: tuple[int, ...], schedule: Schedule, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` drawn on the generator's device (so a seed gives the same noise on CPU and GPU
    when the generator is a CPU one), moved to ``device``."""
    dev = generator.device if generator is not None else (device or "cpu")
    return torch.randn(shape, generator=generator, device=dev, dtype=dtype).to(device or dev)
