"""The engine's GPU-safety rules, checked on CPU: collectives on the process group's device, losses read once per
log row (mean of the per-step losses), non-finite steps skipped (no update, no EMA update), counted and logged,
and a run stopped after too many in a row. ``tools/gpu_check.py`` runs the same paths on a real GPU."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import medldm.train.distributed as D
from medldm.train.engine import NonFiniteLossError, Runtime, adamw, fit, prepare
from medldm.train.logging import read_log


# ------------------------------------------------------------------------------------------- collectives
@pytest.mark.parametrize(("backend", "want"), [("nccl", "cuda:3"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")])
def test_collective_device_follows_the_backend(monkeypatch, backend, want):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert D.collective_device() == torch.device(want)


class _Sent(Exception):
    pass


@pytest.mark.parametrize("fn", ["mean_across", "check_in_sync", "all_finite"])
def test_collectives_get_tensors_on_the_group_device(monkeypatch, fn):
    """With an NCCL group every collective gets tensors on the group's device (here a stand-in device: 'meta',
    since this machine may have no CUDA), never CPU tensors."""
    seen: list[torch.device] = []

    def record(t, *args, **kwargs):
        for x in (t if isinstance(t, list) else [t]) + [a for a in args if isinstance(a, torch.Tensor)]:
            seen.append(x.device)
        raise _Sent

    monkeypatch.setattr(D, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "all_gather", record)
    info = D.DistInfo(rank=0, world_size=2)
    with pytest.raises(_Sent):
        if fn == "mean_across":
            D.mean_across({"loss": torch.tensor(0.5, dtype=torch.float64), "lr": 1e-3}, info)
        elif fn == "check_in_sync":
            D.check_in_sync({"net": nn.Linear(3, 2)}, info)
        else:
            D.all_finite(torch.tensor(True), info)
    assert seen and all(d.type == "meta" for d in seen)


def test_real_one_process_gloo_group(tmp_path):
    """The collectives run for real on a 1-process gloo group (tools/gpu_check.py does the same with NCCL)."""
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        info = types.SimpleNamespace(enabled=True, world_size=1, rank=0)
        row = D.mean_across({"loss": torch.tensor(0.25, dtype=torch.float64), "n": 3.0, "lr": 1e-3}, info)
        assert row == {"loss": 0.25, "n": 3.0, "lr": 1e-3}
        D.check_in_sync({"net": nn.Linear(3, 2)}, info)
        assert bool(D.all_finite(torch.tensor(True), info)) and not bool(D.all_finite(torch.tensor(False), info))
        D.barrier(info)
    finally:
        dist.destroy_process_group()


def test_mean_across_single_process_reads_tensors():
    out = D.mean_across({"a": torch.tensor(1.5, dtype=torch.float64), "b": 2, "lr": 1e-3}, D.DistInfo())
    assert out == {"a": 1.5, "b": 2.0, "lr": 1e-3} and all(type(v) is float for v in out.values())


# ------------------------------------------------------------------------------------------- engine loop
class TinyStage:
    """The smallest stage the engine accepts: a linear regression; records every micro-batch loss it returns."""

    name = "tiny"

    def __init__(self, rt: Runtime, *, steps: int = 6, log_every: int = 3, grad_accum: int = 2,
                 nan_steps: tuple[int, ...] = (), ema: bool = False, grad_clip: float = 1.0):
        from medldm.models import EMA

        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.modules = {"net": self.net}
        self.wrapped = {"net": prepare(self.net, rt, ddp=False)}
        self.optimizers = {"net": adamw(self.net.parameters(), 1e-2, 0.0, rt)}
        self.ema = {"net": EMA(self.net, 0.9)} if ema else {}
        self.tcfg = types.SimpleNamespace(steps=steps, grad_accum=grad_accum, warmup_steps=0, lr_schedule="constant",
                                          grad_clip=grad_clip, log_every=log_every, image_every=0, val_every=0,
                                          ckpt_every=1000)
        self.cfg = types.SimpleNamespace(data=types.SimpleNamespace(num_workers=0))
        self.config: dict = {}
        self.nan_steps = set(nan_steps)
        self.seen: list[tuple[int, float]] = []  # (step, loss) per micro-batch
        self.weights: dict[int, torch.Tensor] = {}  # step -> weights before its update
        self.shadow: dict[int, torch.Tensor] = {}  # step -> EMA weights before its update

    def cpu_batch(self, step: int, micro: int) -> torch.Tensor:
        return torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * step + micro))

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def batch_size(x: torch.Tensor) -> int:
        return x.shape[0]

    def losses(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        self.weights.setdefault(step, self.net.weight.detach().clone())
        if self.ema:
            self.shadow.setdefault(step, self.ema["net"].shadow["weight"].clone())
        loss = (self.wrapped["net"](x) - 1.0).pow(2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        self.seen.append((step, float(loss.detach())))
        return {"loss": loss, "twice": 2 * loss.detach()}

    def validate(self, step: int) -> dict[str, float]:
        return {"val": 0.0}

    def images(self, step: int, path: Path) -> None:
        pass

    def extra(self) -> dict:
        return {}

    def export(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)


def _rt(**kw) -> Runtime:
    return Runtime(device=torch.device("cpu"), amp_dtype=None, dist=D.DistInfo(), progress=False,
                   tensorboard=False, **kw)


def test_logged_mean_is_the_mean_of_the_per_step_losses(tmp_path):
    stage = TinyStage(_rt(), steps=7, log_every=3, grad_accum=2)
    fit(stage, _rt(), tmp_path, seed=0)
    rows = read_log(tmp_path / "tiny" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [3, 6, 7]
    per_step: dict[int, float] = {}
    for s, v in stage.seen:  # a step's loss = mean over its micro-batches
        per_step[s] = per_step.get(s, 0.0) + v / 2
    for r, steps in zip(rows, [range(0, 3), range(3, 6), range(6, 7)], strict=True):
        want = sum(per_step[s] for s in steps) / len(steps)
        assert r["loss"] == pytest.approx(want, rel=1e-12, abs=0)
        assert r["twice"] == pytest.approx(2 * want, rel=1e-6)
        assert r["nonfinite"] == 0
    assert rows[0]["loss"] > rows[-1]["loss"]  # it trained


def test_engine_reads_the_device_once_per_step(tmp_path, monkeypatch):
    """medldm's code turns no tensor into a Python number inside a step (no ``float()`` / ``.item()`` per
    micro-batch): ``tolist`` once per log row, ``bool`` once per step (the finite flag)."""
    import sys

    stage = TinyStage(_rt(), steps=6, log_every=3, grad_accum=3)
    calls = {"__float__": 0, "item": 0, "tolist": 0, "__bool__": 0}
    for name in calls:
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name):
            if "medldm" in Path(sys._getframe(1).f_code.co_filename).parts:  # called from medldm's code
                calls[_name] += 1
            return _orig(self, *a)

        monkeypatch.setattr(torch.Tensor, name, counting)
    fit(stage, _rt(), tmp_path, seed=0)
    monkeypatch.undo()
    assert calls == {"__float__": 0, "item": 0, "tolist": 2, "__bool__": 6}


def test_nan_loss_skips_the_step_and_is_logged(tmp_path):
    stage = TinyStage(_rt(), steps=5, log_every=1, grad_accum=2, nan_steps=(2,), ema=True)
    fit(stage, _rt(), tmp_path, seed=0)
    # the skipped step changed neither the weights nor their EMA; the steps around it did
    assert torch.equal(stage.weights[3], stage.weights[2])
    assert torch.equal(stage.shadow[3], stage.shadow[2])
    assert not torch.equal(stage.weights[2], stage.weights[1]) and not torch.equal(stage.weights[4], stage.weights[3])
    assert not torch.equal(stage.shadow[4], stage.shadow[3])
    assert stage.ema["net"].num_updates == 4
    assert int(stage.optimizers["net"].state[stage.net.weight]["step"]) == 4
    rows = read_log(tmp_path / "tiny" / "train_log.csv")
    assert [r["nonfinite"] for r in rows] == [0, 0, 1, 0, 0]
    assert rows[2]["loss"] != rows[2]["loss"]  # no finite step in that row: NaN, not a made-up value
    assert all(r["loss"] == r["loss"] for i, r in enumerate(rows) if i != 2)


def test_nan_loss_without_grad_clip_and_with_fused_adamw(tmp_path):
    """The skip also holds without gradient clipping and with the fused AdamW used on CUDA (fused runs on CPU)."""
    rt = _rt(fused_adamw=True)
    stage = TinyStage(rt, steps=4, log_every=2, grad_accum=1, nan_steps=(1,), grad_clip=0.0)
    assert stage.optimizers["net"].defaults["fused"]
    fit(stage, rt, tmp_path, seed=0)
    assert torch.equal(stage.weights[2], stage.weights[1])
    assert [r["nonfinite"] for r in read_log(tmp_path / "tiny" / "train_log.csv")] == [1, 0]


def test_too_many_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    rt = _rt(max_nonfinite=3)
    stage = TinyStage(rt, steps=10, log_every=1, grad_accum=1, nan_steps=tuple(range(2, 10)))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps \(up to step 4\).*non-finite"):
        fit(stage, rt, tmp_path, seed=0)
    rows = read_log(tmp_path / "tiny" / "train_log.csv")
    assert [r["nonfinite"] for r in rows] == [0, 0, 1, 1]  # the last skipped step raised before its row


# ------------------------------------------------------------------------------------------- tools/gpu_check.py
def _gpu_check():
    import importlib.util

    path = Path(__file__).parents[1] / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gpu_check().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_dist_part_on_cpu(capsys):
    """Smoke test of the script's logic (its gloo twin of the NCCL part, a few seconds); the full check never runs
    in the tests. One JSON line per part, then the summary."""
    import json

    rc = _gpu_check().main(["--device", "cpu", "--quick", "--skip",
                            "resume,vae_bf16,latent_cache,train,enhance,bench_metrics,bench_train"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    parts = {ln["part"]: ln for ln in lines if "part" in ln}
    assert rc == 0 and lines[-1]["summary"] and lines[-1]["ok"]
    assert parts["dist"]["status"] == "passed" and parts["dist"]["backend"] == "gloo"
    assert parts["dist"]["fit"]["nonfinite"] == [0, 1, 0]
    assert parts["torchrun"]["status"] == "skipped" and "needs 2" in parts["torchrun"]["reason"]
    assert parts["resume"]["status"] == "skipped" and "resume" in lines[-1]["skipped"]


def test_gpu_check_reports_as_it_goes_and_skipped_is_not_failed():
    """Issue 24.7: a line per part as it finishes (a run cut short still reports what finished), a part that does
    not fit the budget is 'skipped' (exit 0), a part that raises is 'failed' (exit 1), the others still run."""
    import json

    gc = _gpu_check()
    now = [0.0]
    lines: list[dict] = []

    def step(seconds, fail=False):
        def fn():
            assert not any(ln.get("summary") for ln in lines)  # earlier lines are out before this part runs
            now[0] += seconds
            if fail:
                raise RuntimeError("boom")
            return {"figure": seconds}
        return fn

    parts = [gc.Part("a", step(5), 1), gc.Part("b", step(3), 50), gc.Part("c", step(1), 1),
             gc.Part("d", step(1), 1, lambda: "one GPU")]
    summary = gc.run_parts(parts, 20, lambda ln: lines.append(json.loads(ln)), clock=lambda: now[0])
    assert [ln.get("part") for ln in lines] == ["a", "b", "c", "d", None]
    assert [ln.get("status") for ln in lines[:4]] == ["passed", "skipped", "passed", "skipped"]
    assert "budget" in lines[1]["reason"] and lines[0]["figure"] == 5
    assert summary["ok"] and summary["skipped"] == ["b", "d"] and lines[-1] == summary
    lines.clear()
    summary = gc.run_parts([gc.Part("x", step(1, fail=True)), gc.Part("y", step(1))], 20,
                           lambda ln: lines.append(json.loads(ln)), clock=lambda: now[0])
    assert not summary["ok"] and summary["failed"] == ["x"] and summary["passed"] == ["y"]
    assert "RuntimeError: boom" in lines[0]["error"]
