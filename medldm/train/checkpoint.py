"""Checkpoints: a model folder (``config.yaml`` + ``<module>.safetensors`` [+ ``<module>_ema.safetensors``] +
``extra.json``) plus ``trainer_state.pt`` (optimizer states, step, EMA counters, RNG states of torch / numpy /
python / CUDA). The whole folder appears atomically (written beside, then renamed), so a run killed at any
instant leaves the previous checkpoint intact. Loading uses safetensors and ``torch.load(weights_only=True)``
only: nothing executes code.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from medldm.io.atomic import atomic_dir
from medldm.models.ema import _unwrap
from medldm.models.folder import save_model_folder

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """RNG states as tensors / plain Python values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`. The generator states are CPU ByteTensors whatever device they were loaded to
    (``torch.set_rng_state`` and ``torch.cuda.set_rng_state`` take nothing else); CUDA states are restored for the
    devices that exist here (a run resumed on fewer GPUs restores the first ones; on a CPU machine none)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def save_checkpoint(path: str | Path, *, config: dict, modules: dict[str, nn.Module], extra: dict,
                    trainer_state: dict[str, Any], ema: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically. ``ema``: name -> ``EMA`` object (saved as ``<name>_ema``)."""
    path = Path(path)
    ema = ema or {}
    with atomic_dir(path) as tmp:
        ema_modules = {}
        for name, e in ema.items():
            ema_modules[f"{name}_ema"] = _ShadowModule(e.shadow)
        save_model_folder(tmp / "m", config=config, modules={**modules, **ema_modules}, extra=extra)
        for f in (tmp / "m").iterdir():
            shutil.move(str(f), tmp / f.name)
        (tmp / "m").rmdir()
        state = dict(trainer_state)
        state["ema"] = {name: {"decay": e.decay, "num_updates": e.num_updates} for name, e in ema.items()}
        state["rng"] = rng_state()
        torch.save(state, tmp / STATE_FILE)
    return path


def load_checkpoint(path: str | Path, *, modules: dict[str, nn.Module], ema: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights (strict) into ``modules`` and EMA shadows; return the trainer state (RNG NOT yet applied)."""
    path = Path(path)
    for name, m in modules.items():
        _unwrap(m).load_state_dict(load_file(str(path / f"{name}.safetensors"), device=str(map_location)))
    # the trainer state stays on the CPU: RNG states must be CPU tensors, and each optimizer's load_state_dict
    # moves its moments to its parameters' device
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    for name, e in (ema or {}).items():
        shadow = load_file(str(path / f"{name}_ema.safetensors"), device=str(map_location))
        e.load_state_dict({"decay": state["ema"][name]["decay"], "num_updates": state["ema"][name]["num_updates"],
                           "shadow": shadow})
    return state


class _ShadowModule(nn.Module):
    """Adapter so an EMA shadow dict is saved through ``save_model_folder`` like a module."""

    def __init__(self, shadow: dict[str, torch.Tensor]):
        super().__init__()
        self._shadow = shadow

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return dict(self._shadow)
