"""Did the shipped mask model's image/label pairs help a downstream segmenter? (issue 13, item 3)

An augmentation study as a user would run it, with `medldm synthesize --mask` and `medldm audit --utility`:

* **real training subjects** (labelled data the study has; all three are training scans of mr-synth-mask-2d, as a
  user's own data would be): MNI152 2009a T1 (nilearn), nibabel's anatomical.nii (T1) and one heudiconv b0 DWI
  mosaic (T2w EPI; runs/shipped_data, `python tools/prepare_shipped_data.py`);
* **held-out real subjects** (used by no shipped model): dipy's S0_10slices (b0), aniso_vox (T2w) and
  test_piesno (diffusion MR), pydicom's MR_small (T2w SE);
* slices with >= 15 % foreground, at most 6 per scan, evenly spread, each fitted to the model's 128 x 128 grid as
  training fits them (`medldm.data.datasets.make_items`), saved as 2D NIfTI; labels: the tissue classes medldm
  derives (`medldm.data.tissue`, background + 3 intensity clusters), the maps the model was trained on;
* **synthetic pairs**: `medldm synthesize -m mr-synth-mask-2d --mask <map> -n 2` for the label map of every real
  training slice (2 images per map, seeds 0-1);
* `medldm audit --synthetic syn --train train --holdout holdout --utility`: memorization, diversity, realism and
  the utility test (segmenter trained on real / real + synthetic / synthetic only, Dice on the held-out slices,
  paired difference with a 95 % BCa bootstrap interval).

    python tools/audit_mask_utility.py [-m mr-synth-mask-2d] [-o runs/mask_utility] [--steps 300]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

TRAIN = ("pkg://nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "pkg://nibabel/tests/data/anatomical.nii", "runs/shipped_data/heudiconv_b0dwi_for_fmap_00001.nii.gz")
HOLDOUT = ("pkg://dipy/data/files/S0_10slices.nii.gz", "pkg://dipy/data/files/aniso_vox.nii.gz",
           "pkg://dipy/data/files/test_piesno.nii.gz", "pkg://pydicom/data/test_files/MR_small.dcm")
PER_SCAN = 6


def slices(entry: str, size: list[int], factor: int) -> list[torch.Tensor]:
    """Up to PER_SCAN slices (model range, fitted to ``size``) of a scan with >= 15 % foreground."""
    from medldm.data.datasets import LoadNormalize, make_items, resolve_path

    vol = LoadNormalize("MR")({"path": str(resolve_path(entry)), "id": entry, "source": 0})
    if vol["image"].ndim == 4:
        vol["image"] = vol["image"][..., 0]
    items = make_items([vol], spatial_dims=2, slice_axis=2, patch=size, factor=factor, resize_to=size,
                       min_foreground=0.15)
    pick = np.unique(np.linspace(0, len(items) - 1, min(PER_SCAN, len(items))).round().astype(int))
    return [items[int(i)].image[0] for i in pick]


def save2d(arr, path: Path, dtype=np.float32) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype)[:, :, None], np.eye(4)), str(path))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="mr-synth-mask-2d")
    ap.add_argument("-o", "--out", default="runs/mask_utility")
    ap.add_argument("--steps", type=int, default=300, help="segmenter steps (audit --utility-steps)")
    ap.add_argument("-n", type=int, default=2, help="synthetic images per label map")
    args = ap.parse_args()
    from medldm.data.tissue import tissue_labels
    from medldm.models import load_model
    from medldm.pipelines.synthesize import Synthesizer
    from medldm.shipped import resolve_model

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    syn = Synthesizer(load_model(resolve_model(args.model)))
    size = list(syn.size)
    for role, entries in (("train", TRAIN), ("holdout", HOLDOUT)):
        for j, entry in enumerate(entries):
            for k, sl in enumerate(slices(entry, size, syn.f)):
                stem = f"s{j}_{k:02d}"
                save2d((sl.numpy() + 1) / 2, out / role / f"{stem}.nii.gz")
                if role == "train":
                    save2d(tissue_labels(sl, syn.mask_classes).numpy(), out / "maps" / f"{stem}.nii.gz", np.uint8)
    for m in sorted((out / "maps").glob("*.nii.gz")):
        stem = m.name.split(".")[0]
        tmp = out / "syn_runs" / stem
        subprocess.run([sys.executable, "-m", "medldm", "synthesize", "-m", args.model, "--mask", str(m), "-n",
                        str(args.n), "-o", str(tmp), "--quiet"], check=True)
        for f in sorted(tmp.glob("synth_*.nii.gz")):
            (out / "syn").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out / "syn" / f"{stem}_{f.name}")
    cmd = [sys.executable, "-m", "medldm", "audit", "--synthetic", str(out / "syn"), "--train", str(out / "train"),
           "--holdout", str(out / "holdout"), "-o", str(out / "report"), "--utility", "--utility-steps",
           str(args.steps), "--modality", "MR"]
    print(" ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    raise SystemExit(main())
