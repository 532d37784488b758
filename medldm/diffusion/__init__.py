"""Diffusion core: schedules, losses, samplers (plain functions over tensors), guidance, posterior statistics.

Public API::

    DiffusionConfig, load_diffusion_config(section)            # medldm.diffusion.config (validated dataclass)
    make_schedule(cfg) -> Schedule; q_sample, training_target, predict_x0_eps, diffusion_loss
    make_model_fn(denoiser, schedule, cond=, class_labels=, guidance=, noise_level=) -> model_fn(x, t)
    sample(name, model_fn, x_T, schedule, steps, generator=None, **kw); sample_ddim / sample_dpmpp_2m /
    sample_unipc / sample_euler_flow; sampling_times(schedule, steps)
    sample_many(k, draw) -> (mean, std)
"""

from medldm.diffusion.config import DiffusionConfig, load_diffusion_config
from medldm.diffusion.guidance import make_model_fn
from medldm.diffusion.posterior import sample_many
from medldm.diffusion.samplers import (
    SAMPLERS,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler_flow,
    sample_unipc,
    sampling_times,
    start_noise,
)
from medldm.diffusion.schedules import (
    Schedule,
    alpha_sigma,
    diffusion_loss,
    make_schedule,
    model_time,
    output_from_x0_eps,
    predict_x0_eps,
    q_sample,
    training_target,
)

__all__ = [
    "SAMPLERS",
    "DiffusionConfig",
    "Schedule",
    "alpha_sigma",
    "diffusion_loss",
    "load_diffusion_config",
    "make_model_fn",
    "make_schedule",
    "model_time",
    "output_from_x0_eps",
    "predict_x0_eps",
    "q_sample",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler_flow",
    "sample_many",
    "sample_unipc",
    "sampling_times",
    "start_noise",
    "training_target",
]
