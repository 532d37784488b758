"""medldm: medical image enhancement and synthesis with latent diffusion."""

__version__ = "0.1.0"


def load_model(path):
    """Restore a model folder (config.yaml + *.safetensors) without executing code."""
    from medldm.models.folder import load_model as _load

    return _load(path)
