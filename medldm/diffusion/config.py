"""The diffusion section of a model folder / training YAML: :class:`DiffusionConfig`, defined with the other
configs a model folder holds in :mod:`medldm.models.config` (so ``medldm.models`` parses a folder without importing
this package); re-exported here where the diffusion code reads it."""

from medldm.models.config import (
    BETA_SCHEDULES,
    MAX_SAMPLING_STEPS,
    MAX_TRAIN_TIMESTEPS,
    PREDICTIONS,
    SAMPLER_NAMES,
    SCHEDULES,
    DiffusionConfig,
    load_diffusion_config,
)

__all__ = ["BETA_SCHEDULES", "MAX_SAMPLING_STEPS", "MAX_TRAIN_TIMESTEPS", "PREDICTIONS", "SAMPLER_NAMES",
           "SCHEDULES", "DiffusionConfig", "load_diffusion_config"]
