"""Exponential moving average of model weights (Polyak averaging), kept in fp32."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = d * shadow + (1 - d) * param`` after every ``update``, ``d = min(decay, (1 + n) / (10 + n))``
    at update ``n`` (warm-up); buffers are copied.

    The shadow lives on the model's device in fp32; ``copy_to`` writes it into a model of the same
    architecture (e.g. for sampling or saving the EMA weights).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError("EMA decay must be in [0, 1)")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in unwrap(model).state_dict().items()
        }
        self._param_names = [k for k, _ in unwrap(model).named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current weights."""
        self.num_updates += 1
        state = unwrap(model).state_dict()
        params = set(self._param_names)
        ema_p, cur_p = [], []
        for k, v in state.items():
            if k in params and v.is_floating_point():
                ema_p.append(self.shadow[k])
                cur_p.append(v.detach().float())
            else:
                self.shadow[k].copy_(v)
        if ema_p:
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - self.current_decay())

    def current_decay(self) -> float:
        """The decay of the latest update: ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (warm-up as in
        diffusers' ``EMAModel`` / timm), so the average forgets the random initialisation within the first few
        hundred steps instead of still weighting it 0.999^1000 = 37 % after 1000 steps."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def state_dict(self) -> dict:
        """Serializable state (tensors + decay + number of updates)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` output."""
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        unwrap(model).load_state_dict({k: v for k, v in self.shadow.items()}, strict=True)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model

_unwrap = unwrap  # backward-compatible alias
