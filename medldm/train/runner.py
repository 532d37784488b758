"""Run the stages of a training config end to end."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from medldm.config import ConfigError, read_yaml, save_config, to_mapping
from medldm.io.atomic import atomic_dir, atomic_file
from medldm.train.schema import load_config

log = logging.getLogger(__name__)


#: engine keys that change speed or display only (a CPU computes the same with any thread count): a resumed run may
#: change them, e.g. on a machine with another number of cores
RESUME_FREE_ENGINE_KEYS = ("num_threads", "progress", "tensorboard")


def _check_resume(cfg: Any, out: Path, resume: bool) -> None:
    saved = out / "config.yaml"
    started = any((out / s / "checkpoint").exists() for s in ("vae", "ldm"))
    if started and not resume:
        raise ConfigError(f"{out}: holds an earlier run — add --resume to continue it, or choose another -o folder")
    if resume and saved.is_file():
        old, new = read_yaml(saved), to_mapping(cfg)
        try:  # keys added to the schema since the run started take their defaults, as they did in that run
            old = to_mapping(load_config(saved))
        except (ConfigError, ValueError):
            pass  # compared as written
        for m in (old, new):  # how fast the machine runs it, not what it computes: free to change on resume
            if isinstance(m.get("engine"), dict):
                m["engine"] = {k: v for k, v in m["engine"].items() if k not in RESUME_FREE_ENGINE_KEYS}
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ("vae_train", "ldm_train", "refine"))
        if diff:
            raise ConfigError(f"{out}: --resume with a config that differs from the run's config.yaml in "
                              f"{', '.join(diff)} — resume with the same config (only vae_train, ldm_train, refine and "
                              f"engine.{', engine.'.join(RESUME_FREE_ENGINE_KEYS)} may change)")


def train(cfg: Any, out_dir: str | Path, *, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train the stage(s) of ``cfg`` (a TrainingConfig) into ``out_dir``; returns the summary dict."""
    # lazy: medldm.train (so train.schema, read by --help and train --print-config) stays free of torch
    from medldm.train.data import build_data
    from medldm.train.distributed import barrier, cleanup
    from medldm.train.engine import fit, make_runtime
    from medldm.train.sizes import check_sizes

    check_sizes(cfg)  # before anything is built or written
    out = Path(out_dir)
    rt = make_runtime(cfg.engine)
    try:
        if rt.dist.is_main:
            _check_resume(cfg, out, resume)
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        barrier(rt.dist)
        data = build_data(cfg, out, quiet=not rt.dist.is_main)
        summary: dict[str, Any] = {"device": str(rt.device), "world_size": rt.dist.world_size,
                                   "precision": str(rt.amp_dtype or "fp32"), "train_scans": len(data.train_scans),
                                   "val_scans": len(data.val_scans)}
        if cfg.stage in ("vae", "both"):
            # lazy: as above
            from medldm.train.vae_stage import VAEStage

            stage = VAEStage(cfg, data, rt)
            summary["vae"] = fit(stage, rt, out, seed=cfg.seed, resume=resume, stop_after=stop_after)
            if stop_after is not None and not (out / "vae" / "model").exists():
                return summary
        if cfg.stage in ("ldm", "both"):
            # lazy: as above
            from medldm.train.ldm_stage import LDMStage

            vae_dir = Path(cfg.vae_path) if cfg.vae_path else out / "vae" / "model"
            if not (vae_dir / "config.yaml").is_file():
                raise ConfigError(f"{vae_dir}: no trained VAE — run stage 'vae' (or 'both') first, or set vae_path")
            stage = LDMStage(cfg, data, rt, vae_dir, out)
            summary["ldm"] = fit(stage, rt, out, seed=cfg.seed, resume=resume, stop_after=stop_after)
            if stop_after is not None and not (out / "ldm" / "model").exists():
                return summary
            if cfg.refine.enabled:
                # lazy: as above
                from medldm.train.refine_stage import RefineStage

                rstage = RefineStage(cfg, data, rt, out / "ldm" / "model", out)
                summary["refine"] = fit(rstage, rt, out, seed=cfg.seed, resume=resume, stop_after=stop_after)
                if stop_after is not None and not (out / "refine" / "model").exists():
                    return summary
        if cfg.stage == "refine":
            from medldm.train.refine_stage import RefineStage

            rstage = RefineStage(cfg, data, rt, Path(cfg.ldm_path), out)
            summary["refine"] = fit(rstage, rt, out, seed=cfg.seed, resume=resume, stop_after=stop_after)
            if stop_after is not None and not (out / "refine" / "model").exists():
                return summary
        last = next((out / s / "model" for s in ("refine", "ldm", "vae") if (out / s / "model").is_dir()), None)
        if rt.dist.is_main and last is not None:
            publish(last, out / "model")
            summary["model"] = str(out / "model")
        if rt.dist.is_main:
            with atomic_file(out / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
            log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k in ("vae", "ldm", "refine", "model")}))
        return summary
    finally:
        cleanup(rt.dist)


def publish(src: Path, dest: Path) -> None:
    """Make ``dest`` (OUT_DIR/model) the final model folder: hard links to ``src``'s files (copies where the
    file system has no links), appearing atomically."""
    with atomic_dir(dest) as tmp:
        for f in sorted(src.iterdir()):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
