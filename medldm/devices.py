"""Which device a process runs on: the one rule shared by training (``medldm.train.engine.make_runtime``) and the
commands (``medldm.cli.common.resolve_device`` for enhance / listen / synthesize ``--device``).

``cuda`` (or ``auto`` on a GPU machine) is this process's GPU, ``cuda:{local_rank % device_count}``: under
``torchrun --nproc_per_node=K`` on a K-GPU machine that is ``cuda:LOCAL_RANK``; a launcher that shows each process
one GPU (``CUDA_VISIBLE_DEVICES`` per rank) gets ``cuda:0`` in every process, never an invalid ordinal. An
explicit ``cuda:K`` is taken as given, checked against the devices this process sees.
"""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device this machine cannot give; the message says what to use instead."""


def resolve(name: str, local_rank: int = 0) -> torch.device:
    """``'auto' | 'cpu' | 'cuda' | 'cuda:K'`` -> this process's device (``local_rank``: the launcher's
    ``LOCAL_RANK``, 0 without one). Raises :class:`DeviceError`."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise DeviceError("use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError("no CUDA device here; use cpu")
    n = torch.cuda.device_count()
    if name in ("auto", "cuda"):
        return torch.device("cuda", local_rank % n)
    try:
        idx = int(name.split(":", 1)[1])
    except ValueError:
        raise DeviceError("use auto, cpu, cuda or cuda:N") from None
    if not 0 <= idx < n:
        raise DeviceError(f"this process sees {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", idx)


def select(name: str, local_rank: int = 0) -> torch.device:
    """:func:`resolve`, and a CUDA device made the process's current one (``torch.cuda.set_device``), so kernels,
    NCCL and ``torch.cuda`` calls without an index use it."""
    device = resolve(name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device.index)
    return device
