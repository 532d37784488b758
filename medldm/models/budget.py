"""The parameter budget of networks built from a config: one rule for model folders (``load_model``) and
training configs (``medldm train``, ``--dry-run``), checked before anything is allocated.

The networks are built on torch's ``meta`` device (shapes only, no memory) and their parameters counted
against ``$MEDLDM_MAX_PARAMS`` (default 500 million: 2 GB of float32 weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from medldm.io.errors import CaseError

MAX_PARAMS_ENV = "MEDLDM_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 500_000_000  # parameters over all networks of a folder (2 GB of float32 weights)


def max_params() -> int:
    """Most parameters a model folder or training config may ask for: ``$MEDLDM_MAX_PARAMS`` (e.g. ``2e9``) or
    500 million."""
    raw = os.environ.get(MAX_PARAMS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PARAMS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 1 and value < 1e15):
        raise CaseError(f"{MAX_PARAMS_ENV}={raw!r}", "not a positive parameter count",
                        f"set it to a number such as 2e9, or unset it (default {DEFAULT_MAX_PARAMS:.0e})")
    return int(value)


def meta_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """``{state-dict name: shape}`` of the network ``build()`` makes, built on the meta device (no memory).
    Exceptions of ``build`` propagate (MONAI / torch reject some combinations with their own error types)."""
    with torch.device("meta"):
        net = build()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    del net
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
