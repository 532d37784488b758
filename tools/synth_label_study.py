"""Image/label pairs of mr-synth-mask-2d for the utility + realism study (issue 23 items 3-4).

    python tools/synth_label_study.py N new|train [OUT]

Real slices as tools/audit_mask_utility.py makes them (train: MNI152 + nibabel anatomical, plus the heudiconv b0
when runs/shipped_data holds it
held-out: 4 subjects no model trained on) and N pairs: ``new`` from label maps that
are not training maps (medldm.data.labelmaps.new_label_maps of the training slices' tissue labels), ``train`` from
the training maps themselves (the protocol of issue 13). Then: medldm audit --synthetic OUT/syn --train OUT/train
--holdout OUT/holdout -o OUT/report --utility --modality MR."""
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import audit_mask_utility as amu

from medldm.data.labelmaps import new_label_maps
from medldm.data.tissue import tissue_labels
from medldm.io.nifti import save_nifti
from medldm.models import load_model
from medldm.pipelines.synthesize import Synthesizer
from medldm.shipped import resolve_model

torch.set_num_threads(1)
mode = sys.argv[2] if len(sys.argv) > 2 else "new"
out = Path(sys.argv[3] if len(sys.argv) > 3 else f"runs/synth_study_{mode}")
if out.exists():
    raise SystemExit(f"{out} exists: choose another OUT")
syn = Synthesizer(load_model(resolve_model("mr-synth-mask-2d")))
size = list(syn.size)
t0 = time.time()
train = [e for e in amu.TRAIN if not e.startswith("runs/") or Path(e).exists()]
maps = []
for role, entries in (("train", train), ("holdout", amu.HOLDOUT)):
    for j, entry in enumerate(entries):
        for k, sl in enumerate(amu.slices(entry, size, syn.f)):
            stem = f"s{j}_{k:02d}"
            amu.save2d((sl.numpy() + 1) / 2, out / role / f"subject{j}" / f"{stem}.nii.gz")  # one subfolder per subject
            if role == "train":
                maps.append(tissue_labels(sl, syn.mask_classes).numpy())
print("train", train, "maps", len(maps), flush=True)
n = int(sys.argv[1]) if len(sys.argv) > 1 else len(maps)
gen = new_label_maps(maps, n, seed=100) if mode == 'new' else ((i % len(maps), maps[i % len(maps)]) for i in range(n))
for i, (_src, m) in enumerate(gen):
    img, _ = syn.generate(seed=i, mask=m)
    save_nifti(img, out / "syn" / f"synth_{i:05d}.nii.gz")
    amu.save2d(m, out / "syn" / f"synth_{i:05d}_labels.nii.gz", np.uint8)
print(f"{n} pairs from new label maps in {time.time() - t0:.0f} s", flush=True)
