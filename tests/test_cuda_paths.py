"""Issue 24: the CUDA paths that would break on the first GPU run, shown on the CPU (CUDA calls stubbed where the
defect is device mapping): resume of the trainer state, the VAE's SSIM loss term, per-rank devices, the latent
cache's encoder batch, the fp16 GradScaler with an idle optimizer, deterministic cuBLAS. tools/gpu_check.py runs
the real thing on a GPU."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from medldm.io.errors import UsageError
from medldm.train import checkpoint
from medldm.train.engine import deterministic_cublas, unscale_and_check


# ------------------------------------------------------------------------------------------------ 1. resume
def test_trainer_state_loads_on_the_cpu_whatever_the_device(tmp_path, monkeypatch):
    """The trainer state is loaded with map_location='cpu' (before: map_location=rt.device put the RNG states on
    cuda:N, and torch.set_rng_state takes CPU ByteTensors only)."""
    net = nn.Linear(3, 2)
    checkpoint.save_checkpoint(tmp_path / "ck", config={}, modules={"net": net}, extra={},
                               trainer_state={"step": 3, "optimizers": {}})
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = checkpoint.load_checkpoint(tmp_path / "ck", modules={"net": net}, map_location="cpu")
    assert seen == ["cpu"] and state["rng"]["torch"].device.type == "cpu"


def test_rng_restore_only_for_devices_that_exist(monkeypatch):
    """A state saved with two GPUs restores on a machine with one (only cuda:0), from tensors wherever they were
    loaded (.cpu() first); on a machine without CUDA no CUDA call is made."""
    state = checkpoint.rng_state()
    state["cuda"] = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((int(s[0]), device, s.device.type)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("all states restored"))
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    a = (torch.rand(3), np.random.rand(3), random.random())
    state = checkpoint.rng_state() | {"cuda": state["cuda"]}
    torch.rand(5), np.random.rand(5), random.random()
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert calls == [(7, 0, "cpu")]
    assert not torch.equal(a[0], b[0])  # restored to the state after a, so b continues the sequence
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    torch.rand(3), np.random.rand(3), random.random()
    want = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(b[0], want[0]) and np.array_equal(b[1], want[1]) and b[2] == want[2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls.clear()
    checkpoint.set_rng_state(state)
    assert calls == []


# ------------------------------------------------------------------------------------------------ 2. SSIM loss
@pytest.mark.parametrize("dims", [2, 3])
def test_vae_ssim_term_has_a_gradient_in_fp32(dims, dipy_files):
    """The VAE stage's SSIM term is differentiable and computed in fp32 under bf16 autocast (before:
    medldm.metrics.ssim, a no-grad metric built from out= ops, so ssim_weight trained nothing)."""
    from medldm.train.engine import make_runtime
    from medldm.train.schema import load_config
    from medldm.train.vae_stage import VAEStage

    cfg = load_config({"task": "synthesis", "spatial_dims": dims,
                       "data": {"train": [str(dipy_files / "S0_10slices.nii.gz")], "patch_size": [16] * dims},
                       "vae": {"channels": [4, 8], "attention_levels": [False, False], "latent_channels": 2,
                               "num_res_blocks": 1, "norm_num_groups": 4},
                       "unet": {"channels": [8, 8], "attention_levels": [False, False], "num_head_channels": 8,
                                "norm_num_groups": 4},
                       "vae_train": {"ssim_weight": 0.5},
                       "engine": {"device": "cpu", "precision": "bf16", "progress": False, "tensorboard": False}})
    rt = make_runtime(cfg.engine)
    stage = VAEStage(cfg, None, rt)  # the losses need no data
    x = torch.rand((2, 1, *[16] * dims)) * 2 - 1
    with rt.autocast():
        out = stage.losses(x, step=0)
    assert out["ssim"].dtype == torch.float32
    grads = torch.autograd.grad(out["ssim"], [p for p in stage.vae.parameters() if p.requires_grad], allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


# ------------------------------------------------------------------------------------------------ 3. devices
@pytest.fixture
def two_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
    return chosen


@pytest.mark.parametrize("name, rank, want", [("cuda", 0, "cuda:0"), ("cuda", 1, "cuda:1"), ("auto", 3, "cuda:1"),
                                              ("cuda:1", 0, "cuda:1"), ("cpu", 1, "cpu")])
def test_cuda_maps_to_this_ranks_gpu(two_gpus, name, rank, want):
    """--device cuda under torchrun: each rank its GPU, cuda:{LOCAL_RANK % device_count}, made current (before: a
    bare 'cuda' put every rank on GPU 0, and enhance never called set_device)."""
    from medldm.cli.common import resolve_device

    assert resolve_device(name, rank) == want
    assert two_gpus == ([] if want == "cpu" else [int(want[-1])])


def test_local_rank_from_the_launcher(two_gpus, monkeypatch):
    """One GPU per process (a launcher that sets CUDA_VISIBLE_DEVICES per rank): LOCAL_RANK 1 of 1 device -> cuda:0,
    never the invalid cuda:1."""
    from medldm.cli.common import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == "cuda:0"
    with pytest.raises(UsageError, match="sees 1 CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("count, want", [(4, 3), (2, 1), (1, 0)])
def test_training_uses_the_same_device_rule(two_gpus, monkeypatch, count, want):
    """``medldm train`` under torchrun (LOCAL_RANK 3): the engine maps ``cuda`` like the commands do,
    cuda:{3 % device_count}, made current (before: cuda:3 whatever the count — an invalid ordinal under a launcher
    that shows each process one GPU); a deterministic run sets cuBLAS's workspace first."""
    import medldm.train.distributed as D
    import medldm.train.engine as E
    from medldm.config import from_mapping
    from medldm.train.schema import EngineConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(E, "init_distributed", lambda kind: D.DistInfo(rank=3, world_size=4, local_rank=3))
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **kw: None)  # global state: not here
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        rt = E.make_runtime(from_mapping(EngineConfig, {"device": "cuda", "deterministic": True}))
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
    assert rt.device == torch.device("cuda", want) and two_gpus == [want]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


# ------------------------------------------------------------------------------------------------ 4. latent cache
def test_latent_cache_batches_by_voxels():
    """16 whole 256 x 256 x 176 volumes are never one encoder call: the batch comes from a voxel budget."""
    from medldm.data.latent_cache import ENCODE_VOXEL_BUDGET, encode_batch, encode_items

    assert encode_batch((1, 256, 256, 176), 16) == 1
    assert encode_batch((1, 128, 128), 16) == 16
    assert encode_batch((1, 64, 64, 64), 16) == min(16, ENCODE_VOXEL_BUDGET // 64**3)
    sizes = []

    class Enc(nn.Module):
        def encode(self, x):
            sizes.append(x.shape[0])
            return x[:, :, ::2, ::2, ::2], torch.ones_like(x[:, :, ::2, ::2, ::2])

    encode_items(Enc(), [torch.zeros(1, 8, 8, 8)] * 10, torch.device("cpu"), voxel_budget=3 * 512)
    assert sizes == [3, 3, 3, 1]


# ------------------------------------------------------------------------------------------------ 5. fp16 scaler
def test_fp16_scaler_skips_an_optimizer_without_gradients():
    """The discriminator's optimizer before adv_start has no gradients: it takes no part in unscale/step (before:
    'No inf checks were recorded for this optimizer' from GradScaler.step). Shown with the CPU GradScaler."""
    gen, disc = nn.Linear(4, 1), nn.Linear(4, 1)
    opts = [torch.optim.AdamW(gen.parameters()), torch.optim.AdamW(disc.parameters())]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(gen(torch.randn(8, 4)).pow(2).mean()).backward()
    active = [o for o in opts if any(p.grad is not None for g in o.param_groups for p in g["params"])]
    assert len(active) == 1
    finite = unscale_and_check(active, scaler, 1.0, torch.tensor(True))
    for o in active:
        scaler.step(o)
    scaler.update()
    assert bool(finite)
    with pytest.raises(AssertionError, match="No inf checks"):  # what the engine did before: step every optimizer
        scaler2 = torch.amp.GradScaler("cpu")
        scaler2.scale(gen(torch.randn(8, 4)).pow(2).mean()).backward()
        for o in opts:
            scaler2.unscale_(o)
        for o in opts:
            scaler2.step(o)


def test_engine_steps_only_optimizers_with_gradients(tmp_path):
    """The engine loop itself: a stage with an optimizer that never gets gradients trains, and the idle optimizer's
    parameters never change."""
    from test_train_gpu_safety import TinyStage, _rt

    from medldm.train.engine import fit

    stage = TinyStage(_rt(), steps=3, log_every=1, grad_accum=1)
    idle = nn.Linear(2, 2)
    before = idle.weight.detach().clone()
    stage.modules["idle"] = idle
    stage.optimizers["idle"] = torch.optim.AdamW(idle.parameters(), lr=0.1)
    w0 = stage.net.weight.detach().clone()
    fit(stage, _rt(), tmp_path, seed=0)
    assert torch.equal(idle.weight, before) and not torch.equal(stage.net.weight, w0)


# ------------------------------------------------------------------------------------------------ 6. deterministic
def test_deterministic_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice stays
    deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
