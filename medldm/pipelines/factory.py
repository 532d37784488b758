"""Which runner runs a model folder: one place, so ``medldm enhance`` / ``synthesize`` / ``listen``,
``medldm.shipped`` and the demo run every model the same way (opened by :func:`medldm.shipped.open_model`)."""

from __future__ import annotations

from typing import Literal

from medldm.pipelines.enhance import Enhancer
from medldm.pipelines.synthesize import Synthesizer
from medldm.pipelines.thinslice import ThinSliceEnhancer


def make_enhancer(bundle, device: str = "cpu"):
    """The enhancer of a loaded model folder, by its task: :class:`ThinSliceEnhancer` for ``thinslice`` models,
    else :class:`Enhancer` (which refuses a synthesis model with a one-line ``CaseError``)."""
    if bundle.card.task == "thinslice":
        return ThinSliceEnhancer(bundle, device=device)
    return Enhancer(bundle, device=device)


def make_runner(bundle, kind: Literal["enhance", "synthesize"], device: str = "cpu"):
    """The runner of a loaded model folder for a command: an enhancer (``make_enhancer``) or a
    :class:`Synthesizer`; a ``CaseError`` (one line, what to use instead) when the folder's task does not fit."""
    return Synthesizer(bundle, device=device) if kind == "synthesize" else make_enhancer(bundle, device=device)
