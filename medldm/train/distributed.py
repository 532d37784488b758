"""Multi-process training with ``torchrun`` (DDP): NCCL on GPUs, gloo on CPU. Rank 0 writes files.

Collectives run on the process group's device (``collective_device``): an NCCL group only takes CUDA tensors
("No backend type associated with device type cpu" otherwise), a gloo group CPU tensors.

Data parallelism does not need a ``DistributedSampler``: each optimiser step's samples are drawn from a
generator seeded by (seed, step, micro-batch, rank) (see ``medldm.data.datasets.step_rng``), so ranks see
different samples, the global batch is ``world_size * batch_size``, and a resumed run draws exactly the
samples the interrupted one would have.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        # long rank-0-only phases (latent cache encoding, validation) must not trip the default 30 min timeout
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP wrapper when distributed (parameters broadcast from rank 0), else the model itself."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def collective_device(group=None) -> torch.device:
    """The device whose tensors the process group's collectives take: the current CUDA device for NCCL, else CPU.

    A mixed group (``"cpu:gloo,cuda:nccl"``) takes both; CPU is used then (no transfer needed for scalars)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across(values: dict[str, float | torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Average scalar logs over ranks (a collective: every rank must call it); floats out, one host read.

    Values may be Python numbers or 0-d tensors on any device (the engine's on-device loss sums)."""
    if not values:
        return {}
    keys = sorted(values)
    if info.enabled:
        dev = collective_device()
    else:  # stay where the tensors are (one transfer below, not one per value)
        dev = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    t = torch.stack([(v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64))
                     .to(device=dev, dtype=torch.float64).reshape(()) for v in (values[k] for k in keys)])
    if info.enabled:
        dist.all_reduce(t)
        t = t / info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def all_finite(flag: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``flag`` (0-d bool, this rank) AND-ed over ranks, so every rank takes the same skip decision."""
    if not info.enabled:
        return flag
    dev = collective_device()
    f = flag.to(device=dev, dtype=torch.float32).reshape(1)
    dist.all_reduce(f, op=dist.ReduceOp.MIN)
    return f[0].to(flag.device) > 0


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dev = collective_device()
        dist.barrier(device_ids=[dev.index] if dev.type == "cuda" else None)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def check_in_sync(modules: dict[str, nn.Module], info: DistInfo) -> None:
    """Raise if the ranks' weights have drifted apart (a cheap checksum per module; a collective)."""
    if not info.enabled:
        return
    dev = collective_device()
    for name, m in modules.items():
        s = torch.stack([p.detach().double().sum() for p in m.parameters()]).sum().reshape(1).to(dev)
        gathered = [torch.zeros_like(s) for _ in range(info.world_size)]
        dist.all_gather(gathered, s)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"DDP ranks hold different {name} weights: {[float(g) for g in gathered]}")
