"""medldm: medical image enhancement and synthesis with latent diffusion."""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Restore a model folder (config.yaml + *.safetensors) or a shipped model by name, without executing
    code. Keyword arguments go to :func:`medldm.models.folder.load_model` (e.g. ``ema=False``)."""
    # lazy: `import medldm` (run by every medldm import) stays minimal; models.folder imports torch
    from medldm.models.folder import load_model as _load
    from medldm.shipped import resolve_model

    return _load(resolve_model(path), **kwargs)
