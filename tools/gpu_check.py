"""One command that runs every CUDA path of medldm, printing one JSON line per part as it finishes (stdout, flushed:
a run cut short still reports what finished) and a last summary line; progress on stderr.

    python tools/gpu_check.py                   # on a GPU machine (make gpu-check); within --budget (570 s)
    python tools/gpu_check.py --device cpu --quick   # the script's own logic on CPU (a minute or two)

Each part reports ``status``: ``passed``, ``failed`` (with ``error``) or ``skipped`` (with ``reason``: not enough
of ``--budget`` left for it, ``--skip``, or nothing to run it on, e.g. one GPU for the two-rank part). One failing
part does not stop the others. In order of importance (the first ones finish first):

* ``resume``: a VAE stage with everything the tiny configs leave off (SSIM loss, patch adversarial loss from step 2,
  ``grad_accum`` 2, VAE EMA, 2 DataLoader workers with ``pin_memory``) in fp16 (GradScaler, the discriminator idle
  before ``adv_start``) and ``engine.deterministic``: trained uninterrupted, and again stopped after its first
  checkpoint and resumed from that checkpoint on the same device; the two runs' logged losses are compared.
* ``vae_bf16``: the same stage in bf16 (autocast) with ``torch.compile``.
* ``devices``: ``--device cuda`` mapped per rank (``cuda:{LOCAL_RANK % n}``), set current.
* ``latent_cache``: the latent cache encodes 3D volumes within its voxel budget (encoder calls, peak memory).
* ``dist``: a 1-process NCCL group (gloo on CPU): the collectives and the engine's ``fit`` on a DDP-wrapped conv
  net with grad accumulation (``no_sync``) and one injected NaN step (skipped: weights unchanged, logged).
* ``torchrun``: ``torchrun --nproc_per_node=2 -m medldm train`` on a tiny config (skipped with one GPU).
* ``train:<config>``: every ``configs/*_tiny.yaml`` trains ``--steps`` (20) steps per stage with bf16 autocast,
  channels-last and ``torch.compile``: final losses, non-finite steps, peak GPU memory.
* ``enhance:3d`` / ``enhance:2d``: ``medldm enhance`` on a synthetic 512x512x300 CT-like volume with a 3D model
  (denoise_3d_tiny trained above) and the shipped ``mr-denoise-2d``: seconds, peak GPU memory.
* ``bench_metrics`` / ``bench_train``: the GPU parts of ``tools/bench_metrics.py`` and ``tools/bench_train.py``.

Exit status: 0 no part failed (skipped parts are not failures), 1 some part failed, 2 no CUDA device (unless
``--device cpu``). Never part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


class Part:
    """One check: ``fn()`` returns a dict of figures (raises on failure); ``min_seconds``: what it needs of the
    budget (skipped when less is left); ``skip_reason()``: a reason it cannot run here, or None."""

    def __init__(self, name: str, fn, min_seconds: float = 0.0, skip_reason=None):
        self.name, self.fn, self.min_seconds, self.skip_reason = name, fn, min_seconds, skip_reason or (lambda: None)


def run_parts(parts: list[Part], budget: float, emit=None, clock=time.perf_counter) -> dict:
    """Run ``parts`` in order within ``budget`` seconds; ``emit(line)`` gets one JSON line per part as it finishes
    (default: print to stdout, flushed) and the summary line last. Returns the summary."""
    emit = emit or (lambda line: print(line, flush=True))
    t0 = clock()
    status: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for p in parts:
        left = budget - (clock() - t0)
        reason = p.skip_reason()
        rec: dict = {"part": p.name}
        if reason is None and left < p.min_seconds:
            reason = f"{left:.0f} s of the {budget:.0f} s budget left, the part needs about {p.min_seconds:.0f} s"
        if reason is not None:
            rec.update(status="skipped", reason=reason, seconds=0.0)
        else:
            log(p.name)
            t = clock()
            try:
                rec.update(status="passed", **(p.fn() or {}))
            except Exception as e:  # noqa: BLE001 - every failure goes into its line
                traceback.print_exc(file=sys.stderr)
                rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
            rec["seconds"] = round(clock() - t, 2)
        status[rec["status"]].append(p.name)
        emit(json.dumps(rec, default=str))
    summary = {"summary": True, **status, "ok": not status["failed"], "seconds": round(clock() - t0, 1)}
    emit(json.dumps(summary))
    return summary


def _peak_reset(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(cuda: bool) -> float | None:
    import torch

    if not cuda:
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


# ------------------------------------------------------------------------------------------------ training
def train_config(name: str, out: Path, args) -> dict:
    from medldm.train import train
    from medldm.train.logging import read_log
    from medldm.train.schema import load_config

    cuda = args.device == "cuda"
    s = args.steps
    sets = [f"vae_train.steps={s}", f"ldm_train.steps={s}", f"vae_train.ckpt_every={s}", f"ldm_train.ckpt_every={s}",
            f"vae_train.log_every={max(s // 4, 1)}", f"ldm_train.log_every={max(s // 4, 1)}",
            "vae_train.val_every=0", "ldm_train.val_every=0", "vae_train.image_every=0", "ldm_train.image_every=0",
            "ldm_train.val_max_items=2", "vae_train.val_max_items=4", "ldm_train.val_sampling_steps=2",
            f"engine.device={args.device}", "engine.precision=bf16", "engine.channels_last=true",
            f"engine.compile={str(args.compile).lower()}", "engine.progress=false", "engine.tensorboard=false",
            f"engine.num_threads={0 if cuda else args.threads}"]
    if name == "sr_2d_tiny":
        sets += ["refine.enabled=true", f"refine.steps={s}", f"refine.ckpt_every={s}", "refine.val_every=0",
                 "refine.image_every=0", f"refine.log_every={max(s // 4, 1)}", "refine.val_max_items=2"]
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", sets)
    _peak_reset(cuda)
    summary = train(cfg, out)
    res: dict = {"steps_per_stage": s, "precision": summary.get("precision"), "device": summary.get("device"),
                 "compile": args.compile, "channels_last": cuda, "peak_mem_gib": _peak_gib(cuda)}
    for stage in ("vae", "ldm", "refine"):
        p = out / stage / "train_log.csv"
        if not p.is_file():
            continue
        rows = read_log(p)
        res[stage] = {"first_loss": rows[0].get("loss"), "last_loss": rows[-1].get("loss"),
                      "nonfinite_steps": int(sum(r.get("nonfinite", 0) for r in rows)),
                      "val": summary.get(stage)}
        if not all(r.get("loss") == r.get("loss") for r in rows):
            raise RuntimeError(f"{stage}: NaN loss in the log")
    return res


# ------------------------------------------------------------------------------------------------ what the tiny configs leave off
def vae_full_config(args, precision: str, steps: int, compile_: bool):
    """A VAE stage with SSIM, the adversarial loss from step 2, grad_accum 2, EMA, DataLoader workers + pin_memory."""
    from medldm.train.schema import load_config

    every = max(steps // 2, 1)
    sets = ["stage=vae", f"vae_train.steps={steps}", f"vae_train.ckpt_every={every}", "vae_train.log_every=1",
            "vae_train.val_every=0", "vae_train.image_every=0", "vae_train.ssim_weight=0.1", "vae_train.adv_weight=0.01",
            "vae_train.adv_start=2", "vae_train.grad_accum=2", "vae_train.ema_decay=0.9", "data.num_workers=2",
            f"engine.device={args.device}", f"engine.precision={precision}", f"engine.compile={str(compile_).lower()}",
            f"engine.deterministic={str(args.device == 'cuda').lower()}", "engine.progress=false",
            "engine.tensorboard=false", f"engine.num_threads={0 if args.device == 'cuda' else args.threads}"]
    return load_config(ROOT / "configs" / "synthesis_2d_tiny.yaml", sets)


def resume_check(tmp: Path, args, precision: str) -> dict:
    """Uninterrupted run vs the same run stopped after its first checkpoint and resumed on the same device."""
    from medldm.train import train
    from medldm.train.logging import read_log

    cuda = args.device == "cuda"
    steps = 4 if args.quick else 8
    if precision == "fp16" and not cuda:
        precision = "bf16"  # fp16 needs CUDA; on CPU the script checks its own logic
    cfg = vae_full_config(args, precision, steps, compile_=False)
    _peak_reset(cuda)
    train(cfg, tmp / "ref")
    train(cfg, tmp / "cut", stop_after=steps // 2)
    if (tmp / "cut" / "vae" / "model").exists():
        raise RuntimeError("the stopped run finished: nothing to resume")
    train(cfg, tmp / "cut", resume=True)
    a, b = read_log(tmp / "ref" / "vae" / "train_log.csv"), read_log(tmp / "cut" / "vae" / "train_log.csv")
    if [r["step"] for r in a] != [r["step"] for r in b]:
        raise RuntimeError(f"resumed steps {[r['step'] for r in b]} != {[r['step'] for r in a]}")
    keys = [k for k in ("loss", "l1", "ssim", "adv_g", "adv_d") if k in a[-1]]
    diff = max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b, strict=True) for k in keys if k in x and k in y)
    for k in ("ssim", "adv_g", "adv_d"):
        if k not in a[-1]:
            raise RuntimeError(f"the {k} loss term is not in the log")
    return {"precision": precision, "steps": steps, "stopped_at": steps // 2, "terms": keys,
            "max_loss_difference_after_resume": diff, "bitwise_equal": diff == 0.0,
            "nonfinite_steps": int(sum(r.get("nonfinite", 0) for r in b)), "peak_mem_gib": _peak_gib(cuda)}


def vae_bf16_check(tmp: Path, args) -> dict:
    from medldm.train import train
    from medldm.train.logging import read_log

    cuda = args.device == "cuda"
    steps = 4 if args.quick else 8
    _peak_reset(cuda)
    train(vae_full_config(args, "bf16", steps, compile_=args.compile), tmp / "bf16")
    rows = read_log(tmp / "bf16" / "vae" / "train_log.csv")
    if not all(r.get("loss") == r.get("loss") for r in rows):
        raise RuntimeError("NaN loss in the log")
    return {"first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "compile": args.compile,
            "peak_mem_gib": _peak_gib(cuda)}


def devices_check(args) -> dict:
    import torch

    from medldm.cli.common import resolve_device

    if args.device != "cuda":
        return {"mapped": {"auto": resolve_device("cpu")}}
    n = torch.cuda.device_count()
    mapped = {f"cuda@rank{r}": resolve_device("cuda", r) for r in range(max(2, n))}
    for r, dev in enumerate(mapped.values()):
        if dev != f"cuda:{r % n}":
            raise RuntimeError(f"rank {r} mapped to {dev}")
    if torch.cuda.current_device() != (max(2, n) - 1) % n:
        raise RuntimeError("resolve_device did not make the device current")
    return {"devices": n, "mapped": mapped}


def latent_cache_check(args) -> dict:
    import torch

    from medldm.data.latent_cache import encode_batch, encode_items
    from medldm.models import build_vae
    from medldm.models.config import VAEConfig

    cuda = args.device == "cuda"
    dev = torch.device(args.device)
    side = 32 if args.quick else 160
    vae = build_vae(VAEConfig(spatial_dims=3, channels=(16, 32, 32), attention_levels=(False, False, False),
                              latent_channels=4, num_res_blocks=1, norm_num_groups=8)).to(dev)
    calls = []
    real = vae.encode

    def counted(x):
        calls.append(int(x.shape[0]))
        return real(x)

    vae.encode = counted
    items = [torch.rand(1, side, side, side) * 2 - 1 for _ in range(6)]
    _peak_reset(cuda)
    encode_items(vae, items, dev, None, batch_size=16)
    want = encode_batch((1, side, side, side), 16)
    if max(calls) > want:
        raise RuntimeError(f"encoder calls of {calls} volumes, budget allows {want}")
    return {"volume": [side] * 3, "encoder_calls": calls, "peak_mem_gib": _peak_gib(cuda)}


def torchrun_check(tmp: Path, args) -> dict:
    cfg = ROOT / "configs" / "denoise_2d_tiny.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medldm",
           "train", str(cfg), "-o", str(tmp / "ddp"), "--set", "vae_train.steps=4", "ldm_train.steps=4",
           "refine.steps=4", "engine.progress=false", "engine.tensorboard=false"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {res.stderr[-1500:]}")
    return {"command": " ".join(cmd[2:]), "model": (tmp / "ddp" / "ldm" / "model").is_dir()}


# ------------------------------------------------------------------------------------------------ NCCL / gloo
def dist_check(tmp: Path, args) -> dict:
    import torch
    import torch.distributed as dist
    from torch import nn

    from medldm.train import distributed as D
    from medldm.train.engine import Runtime, fit
    from medldm.train.logging import read_log

    cuda = args.device == "cuda"
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    kw = {"device_id": device} if cuda else {}
    dist.init_process_group(backend, init_method=f"file://{tmp / 'store'}", rank=0, world_size=1, **kw)
    try:
        class OneRank(D.DistInfo):  # a real group of one process, treated as distributed
            @property
            def enabled(self) -> bool:
                return True

        info = OneRank(rank=0, world_size=1)
        res: dict = {"backend": dist.get_backend(), "collective_device": str(D.collective_device())}
        row = D.mean_across({"loss": torch.tensor(0.5, device=device, dtype=torch.float64), "lr": 1e-3}, info)
        if row != {"loss": 0.5, "lr": 1e-3}:
            raise RuntimeError(f"mean_across gave {row}")
        D.check_in_sync({"net": nn.Linear(3, 2).to(device)}, info)
        if not bool(D.all_finite(torch.tensor(True, device=device), info)):
            raise RuntimeError("all_finite(True) is False")
        D.barrier(info)
        res["collectives"] = "mean_across, check_in_sync, all_finite, barrier"

        rt = Runtime(device=device, amp_dtype=torch.bfloat16, dist=info, channels_last=cuda, compile=args.compile,
                     fused_adamw=cuda, progress=False, tensorboard=False)
        stage = _ConvStage(rt, nan_step=3)
        fit(stage, rt, tmp / "fit", seed=0)
        rows = read_log(tmp / "fit" / stage.name / "train_log.csv")
        res["fit"] = {"steps": stage.tcfg.steps, "grad_accum": stage.tcfg.grad_accum, "ddp": True,
                      "losses": [r.get("loss") for r in rows], "nonfinite": [r.get("nonfinite") for r in rows]}
        if [r.get("nonfinite") for r in rows] != [0, 1, 0]:
            raise RuntimeError(f"the injected NaN step was not logged once: {res['fit']['nonfinite']}")
        if not torch.equal(stage.weights[3], stage.weights[4]):
            raise RuntimeError("the skipped (NaN) step changed the weights")
        return res
    finally:
        dist.destroy_process_group()


class _ConvStage:
    """A stage of one conv net (DDP-wrapped by ``prepare``), for ``fit`` on the 1-process group."""

    name = "convnet"

    def __init__(self, rt, nan_step: int):
        import torch
        from torch import nn

        from medldm.models import EMA
        from medldm.train.engine import adamw, prepare

        torch.manual_seed(0)
        self.rt, self.nan_step = rt, nan_step
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 1, 3, padding=1))
        self.modules = {"net": self.net}
        self.wrapped = {"net": prepare(self.net, rt)}
        self.optimizers = {"net": adamw(self.net.parameters(), 1e-3, 0.0, rt)}
        self.ema = {"net": EMA(self.net, 0.9)}
        self.tcfg = types.SimpleNamespace(steps=6, grad_accum=2, warmup_steps=0, lr_schedule="constant", grad_clip=1.0,
                                          log_every=2, image_every=0, val_every=0, ckpt_every=3)
        self.cfg = types.SimpleNamespace(data=types.SimpleNamespace(num_workers=0))
        self.config: dict = {}
        self.weights: dict = {}

    def cpu_batch(self, step: int, micro: int):
        import torch

        return torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(100 * step + micro))

    def to_device(self, x):
        return self.rt.to(x)

    @staticmethod
    def batch_size(x) -> int:
        return x.shape[0]

    def losses(self, x, step: int) -> dict:
        self.weights.setdefault(step, self.net[0].weight.detach().clone())
        y = self.wrapped["net"](x)
        loss = (y.float() - x.float()).abs().mean()
        if step == self.nan_step:
            loss = loss * float("nan")
        return {"loss": loss}

    def validate(self, step: int) -> dict:
        return {}

    def images(self, step: int, path: Path) -> None:
        pass

    def extra(self) -> dict:
        return {}

    def export(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------------ enhance
def ct_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    """A synthetic CT-like volume (int16 HU): air, a body ellipse of soft tissue with noise, a bone ring and a few
    low-contrast lesions; 0.7 x 0.7 x 1 mm voxels."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.65) ** 2
    sl = np.full(shape[:2], -1000.0, np.float32)
    sl[r < 1.0] = 700.0
    sl[r < 0.85] = 40.0
    for cx, cy, rad, hu in ((0.2, 0.1, 0.08, 70.0), (-0.3, -0.2, 0.05, 15.0), (0.0, 0.35, 0.04, 90.0)):
        sl[(x - cx) ** 2 + (y - cy) ** 2 < rad**2] = hu
    vol = np.repeat(sl[:, :, None], shape[2], axis=2)
    vol += rng.normal(0.0, 20.0, size=shape).astype(np.float32) * (vol > -900)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.round(vol).astype(np.int16), affine), str(path))
    return path


def enhance_case(model: str, src: Path, out: Path, args, steps: int) -> dict:
    from medldm.cli import main as cli

    cuda = args.device == "cuda"
    _peak_reset(cuda)
    t0 = time.perf_counter()
    err = io.StringIO()
    with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(err):
        rc = cli(["enhance", "-m", model, "-i", str(src), "-o", str(out), "--device", args.device,
                  "--steps", str(steps), "--batch-size", str(args.batch_size), "--overwrite", "--quiet"])
    dt = time.perf_counter() - t0
    if rc != 0 or not out.exists():
        raise RuntimeError(f"medldm enhance exited {rc}: {err.getvalue()[-1500:]}")
    import nibabel as nib
    import numpy as np

    img = nib.load(str(out))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return {"model": model, "shape": list(img.shape), "steps": steps, "seconds_enhance": round(dt, 2),
            "peak_mem_gib": _peak_gib(cuda), "finite": bool(np.isfinite(data).all())}


# ------------------------------------------------------------------------------------------------ benchmarks
def bench(cmd: list[str], timeout: float, json_out: Path | None = None) -> dict:
    if timeout < 20:
        raise TimeoutError("skipped: no time left in --budget")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    out: dict = {"command": " ".join(["python", *cmd]), "output": res.stdout.strip().splitlines()[-40:]}
    if json_out is not None and json_out.is_file():
        out["results"] = json.loads(json_out.read_text())
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {res.stderr[-1500:]}")
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (2 steps, a 64x64x12 volume, short benchmarks): checks this script itself")
    ap.add_argument("--steps", type=int, default=0, help="training steps per stage (default 20; --quick 2)")
    ap.add_argument("--configs", default="", help="comma-separated tiny config names (default: configs/*_tiny.yaml)")
    ap.add_argument("--skip", default="", help="comma-separated parts (or prefixes, e.g. train) to skip")
    ap.add_argument("--enhance-steps", type=int, default=0, help="sampler steps for enhance (default 20; --quick 2)")
    ap.add_argument("--volume", default="", help="enhance volume shape XxYxZ (default 512x512x300; --quick 64x64x12)")
    ap.add_argument("--batch-size", type=int, default=32, help="enhance --batch-size")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile in training (default: on for cuda, off for cpu)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for all parts (those that do not fit are "
                                                                 "skipped, in order)")
    ap.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); run it on a GPU machine, or "
              "check the script's logic on CPU with: python tools/gpu_check.py --device cpu --quick",
              file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    args.compile = cuda if args.compile is None else args.compile
    args.steps = args.steps or (2 if args.quick else 20)
    enh_steps = args.enhance_steps or (2 if args.quick else 20)
    shape = tuple(int(v) for v in (args.volume or ("64x64x12" if args.quick else "512x512x300")).split("x"))
    if not cuda:
        torch.set_num_threads(args.threads)
    skip = [s for s in args.skip.split(",") if s]
    names = [n for n in args.configs.split(",") if n] or sorted(p.stem for p in (ROOT / "configs").glob("*_tiny.yaml"))
    print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({args.threads} threads)",
                      "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "quick": args.quick,
                      "budget_s": args.budget, "gpus": torch.cuda.device_count() if cuda else 0}), flush=True)
    tmp_ctx = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="gpu_check_")
    with tmp_ctx as tmp_s:
        tmp = Path(tmp_s)
        tmp.mkdir(parents=True, exist_ok=True)

        def sub(name: str) -> Path:
            (tmp / name).mkdir(parents=True, exist_ok=True)
            return tmp / name

        src = tmp / "ct.nii"
        model3d = tmp / "runs" / "denoise_3d_tiny" / "model"

        def enhance(key: str, model) -> dict:
            if not src.exists():
                ct_volume(src, shape)
            return enhance_case(str(model), src, tmp / f"out_{key}.nii", args, enh_steps)

        def two() -> str | None:
            n = torch.cuda.device_count() if cuda else 0
            return None if n >= 2 else f"{n} GPU(s): the two-rank run needs 2"

        parts = [
            Part("resume", lambda: resume_check(sub("resume"), args, "fp16"), 60),
            Part("vae_bf16", lambda: vae_bf16_check(sub("bf16"), args), 40),
            Part("devices", lambda: devices_check(args), 1),
            Part("latent_cache", lambda: latent_cache_check(args), 10),
            Part("dist", lambda: dist_check(sub("dist"), args), 20),
            Part("torchrun", lambda: torchrun_check(sub("torchrun"), args), 90, two),
            *[Part(f"train:{n}", lambda n=n: train_config(n, tmp / "runs" / n, args), 30) for n in names],
            Part("enhance:3d", lambda: enhance("3d", model3d), 30,
                 lambda: None if (model3d / "config.yaml").is_file() else "no denoise_3d_tiny model (its train part "
                                                                          "was skipped or failed)"),
            Part("enhance:2d", lambda: enhance("2d", "mr-denoise-2d"), 30),
        ]
        t_start = time.perf_counter()
        left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
        bm = ["tools/bench_metrics.py", "--device", args.device, "--skimage-n", "0"]
        bm += ["--repeats", "1", "--size", "64", "--batch", "4", "--cuda-batch", "8", "--vol", "32",
               "--vol-batch", "1"] if args.quick else ["--repeats", "3"]
        jp = tmp / "bench_train.json"
        bt = ["tools/bench_train.py", "--json", str(jp)]
        bt += ["--case", "unet2d", "--steps", "1", "--warmup", "1", "--repeats", "1", "--threads",
               str(args.threads)] if args.quick else ["--steps", "20", "--warmup", "5", "--repeats", "2"]
        parts += [Part("bench_metrics", lambda: bench(bm, left()), 20), Part("bench_train", lambda: bench(bt, left(), jp), 20)]
        for p in parts:
            if any(p.name == s or p.name.startswith(s + ":") for s in skip):
                p.skip_reason = lambda: "--skip"
        summary = run_parts(parts, args.budget)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
