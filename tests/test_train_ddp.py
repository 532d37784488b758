"""Multi-process training (DDP, gloo backend on CPU) launched with torchrun's module entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medldm.train.logging import read_log

pytestmark = pytest.mark.slow  # trains networks (tiny, CPU)

CONFIG = Path(__file__).parents[1] / "configs" / "denoise_2d_tiny.yaml"


def test_ddp_two_processes_gloo(tmp_path, dipy_files):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "medldm", "train", str(CONFIG), "-o", str(out),
           "--set", "vae_train.steps=6", "--set", "ldm_train.steps=6", "--set", "vae_train.log_every=1",
           "--set", "ldm_train.log_every=1", "--set", "ldm_train.image_every=6", "--set", "vae_train.ckpt_every=3",
           "--set", "ldm_train.ckpt_every=3", "--set", "ldm_train.val_max_items=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    for stage in ("vae", "ldm"):
        rows = read_log(out / stage / "train_log.csv")
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the log
        assert all(r["loss"] == r["loss"] for r in rows)
    # rank 0 wrote the model; the engine checked at every checkpoint that both ranks hold identical weights
    from medldm.models import load_model

    bundle = load_model(out / "ldm" / "model")
    assert bundle.denoiser is not None and all(torch.isfinite(p).all() for p in bundle.denoiser.parameters())
    assert (out / "ldm" / "images" / "step_0000006.png").is_file()
