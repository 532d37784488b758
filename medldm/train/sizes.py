"""Size check of a training config before anything is built: the networks it describes, built on the meta
device, against the parameter budget of model folders (:mod:`medldm.models.budget`; ``$MEDLDM_MAX_PARAMS``).
The ranges of the ``vae`` / ``unet`` sections are checked where the config is parsed (``TrainingConfig``)."""

from __future__ import annotations

from medldm.config import ConfigError
from medldm.io.errors import CaseError
from medldm.models import build_denoiser, build_vae
from medldm.models.budget import MAX_PARAMS_ENV, max_params, meta_shapes, numel
from medldm.models.refiner import build_from_spec
from medldm.train.refine_stage import refiner_spec_of


def check_sizes(cfg) -> dict[str, int]:
    """Parameters of each network ``cfg`` trains (``{"vae": n, "denoiser": n[, "refiner": n]}``); ConfigError
    (exit 2 in the CLI) when they exceed :func:`medldm.models.budget.max_params` together, or a network cannot
    be built from the config. Nothing is allocated."""
    builds = {"vae": lambda: build_vae(cfg.vae),
              "denoiser": lambda: build_denoiser(cfg.unet, cfg.spatial_dims, cfg.vae.latent_channels)}
    if cfg.refine.enabled:
        builds["refiner"] = lambda: build_from_spec(refiner_spec_of(cfg))
    try:
        budget = max_params()
    except CaseError as exc:
        raise ConfigError(exc.line()) from None
    counts = {}
    for name, build in builds.items():
        try:
            counts[name] = sum(numel(s) for s in meta_shapes(build).values())
        except Exception as exc:  # MONAI / torch reject some combinations with their own error types
            raise ConfigError(f"the {name} section cannot be built: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    total = sum(counts.values())
    if total > budget:
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items())
        raise ConfigError(f"the networks of this config have {total:,} parameters ({parts}), more than the "
                          f"{budget:,} allowed (a model folder that large would be refused too) — make vae.channels "
                          f"/ unet.channels smaller, or set {MAX_PARAMS_ENV} if the model really is that large")
    return counts
