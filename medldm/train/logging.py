"""Training logs: a CSV file (always), TensorBoard (when the ``tensorboard`` package is installed), PNG grids."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medldm.io.atomic import atomic_file


class MetricLog:
    """Append-only CSV of ``step`` + named scalars; a resumed run first drops rows past its checkpoint step.

    A row with keys not seen before (e.g. the adversarial terms from ``adv_start`` on) widens the header; the
    file is rewritten once then, earlier rows getting empty cells.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.fields: list[str] | None = None
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # tensorboard is optional
                self.tb = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            self.fields = header

    def truncate_after(self, step: int) -> None:
        """Keep only rows with ``step <= step`` (resume: the rows after the checkpoint will be redone)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: _fmt(v) for k, v in values.items()}}
        if self.fields is None:
            self.fields = list(row)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        elif any(k not in self.fields for k in row):
            with open(self.path, newline="") as f:
                old_rows = list(csv.DictReader(f))
            self.fields = self.fields + [k for k in row if k not in self.fields]
            with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.fields)
                w.writerows([[r.get(k, "") for k in self.fields] for r in old_rows])
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])
            f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(f"{self.path.stem}/{k}", float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a CSV log as dicts of floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _fmt(v: float) -> float | str:
    v = float(v)
    return repr(v) if math.isfinite(v) else "nan"


def save_grid(rows: list[torch.Tensor], path: str | Path, lo: float = -1.0, hi: float = 1.0) -> Path:
    """PNG grid: each row a batch (B, 1, *S) of 2D images (3D: the middle slice along the last axis).

    Values are windowed to ``[lo, hi]`` (the model range by default)."""
    tiles = []
    for r in rows:
        r = r.detach().float().cpu()
        if r.ndim == 5:
            r = r[..., r.shape[-1] // 2]
        # array (X, Y) -> display rows = Y (anterior/superior up), columns = X
        tiles.append(torch.cat([im.T.flip(0) for im in r[:, 0]], dim=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=lo) for t in tiles]
    grid = torch.cat(tiles, dim=0).numpy()
    img = np.clip((grid - lo) / (hi - lo), 0, 1)
    img = (img * 255).round().astype(np.uint8)
    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")
    return path
