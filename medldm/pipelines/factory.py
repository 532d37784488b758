"""Which enhancer runs a model folder: one place, so ``medldm enhance``, ``medldm listen`` and
``medldm.shipped.enhance`` run every model the same way."""

from __future__ import annotations

from medldm.pipelines.enhance import Enhancer


def make_enhancer(bundle, device: str = "cpu"):
    """The enhancer of a loaded model folder, by its task: :class:`medldm.pipelines.thinslice.ThinSliceEnhancer`
    for ``thinslice`` models, else :class:`Enhancer`. What ``medldm enhance``, ``medldm listen`` and
    ``medldm.shipped.enhance`` build, so every entry point runs a model the same way."""
    if bundle.card.task == "thinslice":
        from medldm.pipelines.thinslice import ThinSliceEnhancer

        return ThinSliceEnhancer(bundle, device=device)
    return Enhancer(bundle, device=device)
