"""Maintainer tooling for the shipped model folders (``medldm/assets/models/<name>/``, see docs/models.md).

Users never need this: ``medldm.shipped`` resolves shipped model names, and ``medldm models`` lists them.

    python tools/shipped_models.py export RUN_DIR NAME --wall-s S   # copy a finished training run into the package
    python tools/shipped_models.py validate OUT                      # the demo's protocol on the validation scans
    python tools/shipped_models.py heldout DEMO_OUT                  # record a `medldm demo` run's figures in the cards
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from medldm.io.errors import CaseError
from medldm.shipped import CARD_FILE, SHIPPED, card, installed_models

#: files of a trained model folder that the package ships (the rest of a run stays in the run folder)
SHIPPED_FILES = ("config.yaml", "extra.json", "vae.safetensors", "denoiser_ema.safetensors", "refiner.safetensors")


def export(run_dir: str | Path, name: str, *, wall_s: float, hardware: str, stage: str | None = None) -> Path:
    """Copy RUN_DIR/model (a finished ``medldm train`` run; or RUN_DIR/<stage>/model, the model after that stage)
    to the package as shipped model ``name`` and write its card from the run's config.yaml and validation logs.
    Only :data:`SHIPPED_FILES` are copied, weights as float16."""
    import yaml

    from medldm.io.atomic import atomic_dir, atomic_file
    from medldm.models.refiner import IGNORED_KEYS

    run = Path(run_dir)
    src = run / stage / "model" if stage else run / "model"
    if not (src / "config.yaml").is_file():
        raise CaseError(src, "not a finished training run (no model/config.yaml)", "wait for `medldm train` to finish")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    meta = SHIPPED[name]
    dest = meta.path
    vae_card: dict = {}  # read before the folder is replaced below (a model re-exported on its own VAE)
    if cfg.get("stage") == "ldm" and cfg.get("vae_path") and (Path(cfg["vae_path"]) / CARD_FILE).is_file():
        vae_card = json.loads((Path(cfg["vae_path"]) / CARD_FILE).read_text())
    with atomic_dir(dest) as tmp:
        for f in SHIPPED_FILES:
            if (src / f).is_file():
                if f.endswith(".safetensors"):
                    _save_half(src / f, tmp / f)
                else:
                    shutil.copy2(src / f, tmp / f)
        if (tmp / "extra.json").is_file():  # scan ids as pkg:// paths, not this machine's site-packages
            text = re.sub(r'"[^"]*?/site-packages/', '"pkg://', (tmp / "extra.json").read_text())
            extra = json.loads(text)
            if isinstance(extra.get("refiner"), dict):  # runs from before it was dropped: the unread dotted path
                for key in IGNORED_KEYS:
                    extra["refiner"].pop(key, None)
            (tmp / "extra.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    stages = ("vae", "ldm", "refine")
    stages = stages[: stages.index(stage) + 1] if stage else stages
    if "refine" not in stages:
        cfg["refine"] = {"enabled": False}
    stage_dirs = {s: run / s for s in stages}
    if cfg.get("stage") == "ldm" and cfg.get("vae_path"):  # the VAE came from elsewhere: record where and its steps
        if vae_card:  # a shipped model folder: its card has the VAE's steps and validation
            cfg["vae_train"] = {"steps": (vae_card.get("steps") or {}).get("vae")}
        else:  # RUN/vae/model of another training run
            vae_run = Path(cfg["vae_path"]).parents[1]
            cfg["vae_train"] = yaml.safe_load((vae_run / "config.yaml").read_text())["vae_train"]
            stage_dirs["vae"] = vae_run / "vae"
    card_data = {
        "name": name, "task": meta.task, "description": meta.description,
        "command": f"medldm train {meta.config} -o runs/{name}",
        "train": cfg["data"]["train"], "val": cfg["data"]["val"],
        "steps": {"vae": cfg["vae_train"]["steps"], "ldm": cfg["ldm_train"]["steps"],
                  **({"refine": cfg["refine"]["steps"]} if (cfg.get("refine") or {}).get("enabled") else {})},
        "batch_size": cfg["data"]["batch_size"], "patch_size": cfg["data"]["patch_size"],
        "wall_s": float(wall_s), "hardware": hardware,
        "validation": {s: _last_row(d / "val_log.csv") for s, d in stage_dirs.items() if (d / "val_log.csv").is_file()},
    }
    if vae_card:
        whose = (f"the previous version of {name}'s" if vae_card.get("name") == name
                 else f"shared with {vae_card.get('name')}")
        card_data["vae"] = (f"{whose} (vae_path: {cfg['vae_path']}; {card_data['steps']['vae']} steps): not "
                            "retrained here")
        if "vae" in (vae_card.get("validation") or {}):
            card_data["validation"] = {"vae": vae_card["validation"]["vae"], **card_data["validation"]}
    with atomic_file(dest / CARD_FILE) as tmp_card:
        tmp_card.write_text(json.dumps(card_data, indent=2))
    dest.chmod(0o755)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


def _last_row(csv_path: Path) -> dict[str, float]:
    """The last row of a training log CSV (validation metrics at the end of a stage)."""
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


def record_heldout(demo_out: str | Path) -> dict[str, dict]:
    """Read a ``medldm demo`` run's metrics (OUT/<task>/report/metrics.csv) and store, in each shipped model's
    card, its mean 2D PSNR/SSIM on the held-out scans beside those of the degraded input and the baselines."""
    import csv

    from medldm.io.atomic import atomic_file

    out = Path(demo_out)
    recorded = {}
    for name, meta in installed_models().items():
        # the denoiser: Gaussian (card "heldout") and Rician (card "heldout_rician") noise; every method blind
        dirs = {"denoise": ("denoise", "denoise-rician"), "sr": ("sr",), "thinslice": ("thin",)}.get(meta.task, ())
        c = card(name)
        for task_dir in dirs:
            metrics = out / task_dir / "report" / "metrics.csv"
            if not metrics.is_file():
                continue
            acc: dict[str, dict[str, list[tuple[float, float]]]] = {}
            with open(metrics, newline="") as f:
                for r in csv.DictReader(f):
                    if r["level"] == "slice":
                        acc.setdefault(r["method"], {}).setdefault(r["case"], []).append(
                            (float(r["psnr"]), float(r["ssim"])))
            if name not in acc:
                continue
            table = {m: {k: _mean([_mean([v[i] for v in vals]) for vals in cases.values()])
                         for i, k in enumerate(("psnr", "ssim"))} for m, cases in acc.items()}
            key = "heldout_rician" if task_dir.endswith("rician") else "heldout"
            c[key] = {"command": "medldm demo", "convention": "2D PSNR/SSIM per slice, data_range R = 1 on each "
                      "scan scaled to [0, 1] by its 0.5-99.5th percentiles; mean over scans of the per-scan "
                      "slice means (the demo table's mean column); every method blind (estimates the noise "
                      "level); bm4d and ants on the whole volume" + (", bm3d/bm4d/nlm with the exact Rician bias "
                      "correction, ants with its Rician model" if key == "heldout_rician" else ""),
                      "scans": sorted(_demo_cases(metrics)), "methods": table}
            recorded[name if key == "heldout" else f"{name} (rician)"] = table
        if any(k in c for k in ("heldout", "heldout_rician")):
            with atomic_file(meta.path / CARD_FILE) as tmp:
                tmp.write_text(json.dumps(c, indent=2))
    return recorded


def validate(out: str | Path, name: str = "mr-denoise-2d") -> Path:
    """Run the demo's protocol (same degradations, baselines, metrics and report) on the validation scans of a
    shipped model's training config (other subjects, never trained on): the figures used to choose settings,
    so the held-out demo scans are measured once. Returns OUT/report.html."""
    from medldm.data.datasets import resolve_path
    from medldm.demo import run_demo

    scans = {Path(s).name.split(".")[0]: resolve_path(s) for s in card(name)["val"]}
    return run_demo(out, scans=scans)


def _save_half(src: Path, dest: Path) -> None:
    """Copy a safetensors file with its floating tensors as float16 (half the package size; ``load_state_dict``
    casts them back into the float32 parameters; outputs change by ~1e-3 of the range, far below the noise)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(dest))


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _demo_cases(metrics_csv: Path) -> set[str]:
    import csv

    with open(metrics_csv, newline="") as f:
        return {r["case"] for r in csv.DictReader(f) if r["level"] == "slice"}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import platform

    p = argparse.ArgumentParser(prog="python tools/shipped_models.py", description="maintain the shipped model folders")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="copy a finished training run into the package")
    e.add_argument("run_dir")
    e.add_argument("name", choices=sorted(SHIPPED))
    e.add_argument("--wall-s", type=float, required=True, help="wall time of the training run (seconds)")
    e.add_argument("--stage", choices=("vae", "ldm", "refine"), help="ship the model after this stage "
                   "(default: the run's final model)")
    e.add_argument("--hardware", default=f"{_cpu_name() or platform.machine()}, 2 cores shared with other jobs, no GPU")
    h = sub.add_parser("heldout", help="record the held-out figures of a `medldm demo` run in the model cards")
    h.add_argument("demo_out")
    v = sub.add_parser("validate", help="the demo's protocol on the validation scans of the shipped models")
    v.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "export":
        print(export(args.run_dir, args.name, wall_s=args.wall_s, hardware=args.hardware, stage=args.stage))
    elif args.cmd == "validate":
        print(validate(args.out))
    else:
        print(json.dumps(record_heldout(args.demo_out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
