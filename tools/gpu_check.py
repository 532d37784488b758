"""One command that runs every CUDA path of medldm and prints one JSON summary (stdout; progress on stderr).

    python tools/gpu_check.py                   # on a GPU machine (make gpu-check); about 5-10 minutes
    python tools/gpu_check.py --device cpu --quick   # the script's own logic on CPU (a minute or two)

Parts (each reports ``ok``, ``seconds`` and ``error``; one failing part does not stop the others):

* ``train``: every ``configs/*_tiny.yaml`` trains ``--steps`` (20) steps per stage with bf16 autocast,
  channels-last and ``torch.compile`` (sr_2d_tiny also trains its refiner): final losses, non-finite steps,
  validation metrics, peak GPU memory.
* ``dist``: a 1-process NCCL group (gloo on CPU) from a FileStore: ``collective_device``, ``mean_across``,
  ``check_in_sync``, ``all_finite``, ``barrier``, and the engine's ``fit`` on a DDP-wrapped conv net with grad
  accumulation (``no_sync``) and one injected NaN step (skipped: weights unchanged, ``nonfinite`` logged).
* ``enhance``: ``medldm enhance`` (the CLI, in this process) on a synthetic 512x512x300 CT-like volume with a 3D
  model (denoise_3d_tiny trained above) and a 2D model (shipped ``mr-denoise-2d``): seconds, peak GPU memory.
* ``bench_metrics`` / ``bench_train``: the GPU parts of ``tools/bench_metrics.py`` and ``tools/bench_train.py``
  (subprocesses, their output kept).

Exit status: 0 all parts ok, 1 some part failed, 2 no CUDA device (unless ``--device cpu``). Never part of CI.
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


def part(fn):
    """Run one part: its dict plus ok / seconds / error (traceback tail on stderr)."""

    def run(*a, **kw) -> dict:
        t0 = time.perf_counter()
        try:
            out = {"ok": True, **(fn(*a, **kw) or {})}
        except Exception as e:  # noqa: BLE001 - every failure goes into the summary
            traceback.print_exc(file=sys.stderr)
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out

    return run


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
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: train,dist,enhance,bench_metrics,"
                                              "bench_train")
    ap.add_argument("--enhance-steps", type=int, default=0, help="sampler steps for enhance (default 20; --quick 2)")
    ap.add_argument("--volume", default="", help="enhance volume shape XxYxZ (default 512x512x300; --quick 64x64x12)")
    ap.add_argument("--batch-size", type=int, default=32, help="enhance --batch-size")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile in training (default: on for cuda, off for cpu)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds; benchmarks get what is left")
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
    skip = {s for s in args.skip.split(",") if s}
    names = [n for n in args.configs.split(",") if n] or sorted(p.stem for p in (ROOT / "configs").glob("*_tiny.yaml"))
    t_start = time.perf_counter()
    summary: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({args.threads} threads)",
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "quick": args.quick,
        "compile": args.compile, "precision": "bf16", "channels_last": cuda,
    }
    tmp_ctx = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="gpu_check_")
    with tmp_ctx as tmp_s:
        tmp = Path(tmp_s)
        tmp.mkdir(parents=True, exist_ok=True)
        if "dist" not in skip:
            log(f"dist: 1-process {'NCCL' if cuda else 'gloo'} group")
            (tmp / "dist").mkdir(exist_ok=True)
            summary["dist"] = part(dist_check)(tmp / "dist", args)
        if "train" not in skip:
            summary["train"] = {}
            for name in names:
                log(f"train {name}: {args.steps} steps per stage")
                summary["train"][name] = part(train_config)(name, tmp / "runs" / name, args)
        if "enhance" not in skip:
            src = tmp / "ct.nii"
            log(f"enhance: synthetic CT {shape}")
            summary["enhance"] = {"volume": list(shape)}
            made = part(lambda: {"path": str(ct_volume(src, shape))})()
            if not made["ok"]:
                summary["enhance"]["volume_error"] = made["error"]
            model3d = tmp / "runs" / "denoise_3d_tiny" / "model"
            cases = {"3d": str(model3d), "2d": "mr-denoise-2d"}
            for key, model in cases.items():
                if key == "3d" and not (model3d / "config.yaml").is_file():
                    summary["enhance"][key] = {"ok": False, "error": "no denoise_3d_tiny model (train part skipped "
                                                                     "or failed)", "seconds": 0.0}
                    continue
                log(f"enhance {key}: {model}")
                summary["enhance"][key] = part(enhance_case)(model, src, tmp / f"out_{key}.nii", args, enh_steps)
        left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
        if "bench_metrics" not in skip:
            log("bench_metrics")
            cmd = ["tools/bench_metrics.py", "--device", args.device, "--skimage-n", "0"]
            cmd += ["--repeats", "1", "--size", "64", "--batch", "4", "--cuda-batch", "8", "--vol", "32",
                    "--vol-batch", "1"] if args.quick else ["--repeats", "3"]
            summary["bench_metrics"] = part(bench)(cmd, left())
        if "bench_train" not in skip:
            log("bench_train")
            jp = tmp / "bench_train.json"
            cmd = ["tools/bench_train.py", "--json", str(jp)]
            cmd += ["--case", "unet2d", "--steps", "1", "--warmup", "1", "--repeats", "1", "--threads",
                    str(args.threads)] if args.quick else ["--steps", "20", "--warmup", "5", "--repeats", "2"]
            summary["bench_train"] = part(bench)(cmd, left(), jp)
    parts = [v for k, v in summary.items() if isinstance(v, dict) and "ok" in v]
    parts += list(summary.get("train", {}).values())
    parts += [v for k, v in summary.get("enhance", {}).items() if isinstance(v, dict)]
    summary["ok"] = bool(parts) and all(p["ok"] for p in parts)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
