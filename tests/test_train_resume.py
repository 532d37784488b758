"""Exact resume: a run killed with SIGKILL and resumed reproduces the loss sequence of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medldm.train.logging import read_log

pytestmark = pytest.mark.slow  # trains networks (tiny, CPU)

CONFIG = Path(__file__).parents[1] / "configs" / "synthesis_2d_tiny.yaml"
SETS = ["vae_train.steps=6", "vae_train.ckpt_every=3", "vae_train.log_every=1",
        "ldm_train.steps=14", "ldm_train.ckpt_every=4", "ldm_train.log_every=1", "ldm_train.image_every=0",
        "ldm_train.val_every=0", "vae_train.val_every=0", "vae_train.grad_accum=2"]


def _cmd(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "medldm", "train", str(CONFIG), "-o", str(out), *extra]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _rows(out: Path, stage: str) -> list[dict]:
    p = out / stage / "train_log.csv"
    return read_log(p) if p.is_file() else []


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, dipy_files):
    from medldm.train import train
    from medldm.train.schema import load_config

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(load_config(CONFIG, SETS), ref)  # uninterrupted reference, in this process (same thread count: 1)

    # Kill the second run with SIGKILL in the middle of stage 2 (after its first checkpoint at step 4).
    err = open(tmp_path / "killed.stderr", "w")  # noqa: SIM115 - closed below, after the kill
    proc = subprocess.Popen(_cmd(cut), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = _rows(cut, "ldm")
        if rows and rows[-1]["step"] >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    err.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(_rows(cut, "ldm")[-1]["step"])
    assert 6 <= killed_at < 14
    assert not (cut / "ldm" / "model").exists()

    res = subprocess.run(_cmd(cut, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ldm: resumed at step" in res.stderr and "vae: resumed at step 6" in res.stderr

    for stage, n in (("vae", 6), ("ldm", 14)):
        a, b = _rows(ref, stage), _rows(cut, stage)
        assert [r["step"] for r in b] == list(range(1, n + 1))
        keys = [k for k in a[0] if k not in ("img_per_s",)]
        assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b], f"{stage} losses differ"
    # the exported networks are bit-identical too
    from safetensors.torch import load_file

    for f in ("denoiser.safetensors", "denoiser_ema.safetensors"):
        x, y = load_file(str(ref / "ldm" / "model" / f)), load_file(str(cut / "ldm" / "model" / f))
        assert all((x[k] == y[k]).all() for k in x), f


def test_resume_refuses_a_different_config(tmp_path, dipy_files):
    from medldm.config import ConfigError
    from medldm.train import train
    from medldm.train.schema import load_config

    cfg = load_config(CONFIG, [*SETS, "stage=vae", "vae_train.steps=2"])
    train(cfg, tmp_path)
    changed = load_config(CONFIG, [*SETS, "stage=vae", "vae_train.steps=2", "data.batch_size=4"])
    with pytest.raises(ConfigError, match="differs from the run's config.yaml in data"):
        train(changed, tmp_path, resume=True)
    # thread count / display may change (another machine); a key the schema gained since (absent from the
    # run's config.yaml) counts as its default, which the run used
    import yaml

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"].pop("contrasts") == []
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    same = load_config(CONFIG, [*SETS, "stage=vae", "vae_train.steps=3", "engine.num_threads=1",
                                "engine.progress=false"])
    train(same, tmp_path, resume=True)
    with pytest.raises(ConfigError, match="in engine"):
        train(load_config(CONFIG, [*SETS, "stage=vae", "vae_train.steps=3", "engine.precision=bf16"]), tmp_path,
              resume=True)


def test_worker_processes_do_not_change_the_run(tmp_path, dipy_files):
    """Batches are a pure function of (seed, step): DataLoader workers give the same losses as none."""
    from medldm.train import train
    from medldm.train.schema import load_config

    logs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(load_config(CONFIG, [*SETS, "stage=vae", "vae_train.steps=4", f"data.num_workers={workers}"]), out)
        logs.append([(r["step"], r["loss"]) for r in read_log(out / "vae" / "train_log.csv")])
    assert logs[0] == logs[1] and len(logs[0]) == 4
