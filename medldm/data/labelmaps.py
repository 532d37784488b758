"""Label maps with new anatomy for mask-conditioned synthesis (issue 23 item 3; docs/synthesis.md, "Label maps").

Synthetic image/label pairs made from the *training* label maps add no new anatomy: a segmenter sees the same
shapes again. :func:`new_label_maps` makes maps that are not training maps by random, anatomically mild
transformations of real maps:

* a **smooth random deformation**: a displacement field drawn as Gaussian noise on a coarse control grid
  (``control`` points per axis), upsampled smoothly (cubic) to the image and scaled so the largest displacement
  is ``max_shift`` of the image side (default 6 %);
* an isotropic **scaling** by a factor drawn uniformly from ``scale`` (default 0.9-1.1) about the image centre,
  and a small **rotation** (up to ``rotate`` degrees, in-plane for 2D, about the last axis for 3D);
* a **left-right flip** with probability 1/2 (first array axis: left-right on RAS-ordered arrays).

Labels are resampled by nearest neighbour (no new label values; outside the image = background 0). Whether the
results are copies is for the audit's memorization test to say (``medldm audit`` with the maps as synthetic and the
real maps as training images); ``tests/test_synthesis_labelmaps.py`` checks it.

:func:`mni_tissue_labels` gives real tissue labels where a registry ships them: the ICBM 2009a grey- and
white-matter probability maps inside nilearn's package data (no download), on the MNI152 T1 template's grid.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes

from medldm.data.tissue import FOREGROUND_FRACTION


def _affine_grid(shape: tuple[int, ...], rng: np.random.Generator, scale: tuple[float, float], rotate: float,
                 flip: bool) -> torch.Tensor:
    """(1, *shape, dims) sampling grid in [-1, 1] of a random scaling, rotation and flip about the centre."""
    dims = len(shape)
    s = rng.uniform(*scale)
    a = math.radians(rng.uniform(-rotate, rotate))
    m = np.eye(dims) / s
    rot = np.eye(dims)
    rot[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    m = rot @ m
    if flip and rng.random() < 0.5:
        m = m @ np.diag([-1.0] + [1.0] * (dims - 1))
    theta = torch.zeros(1, dims, dims + 1)
    # grid_sample's coordinates run (x = last axis, ..., first axis): reverse the axis order
    theta[0, :, :dims] = torch.from_numpy(m[::-1, ::-1].copy()).float()
    return F.affine_grid(theta, [1, 1, *shape], align_corners=False)


def _displacement(shape: tuple[int, ...], rng: np.random.Generator, control: int, max_shift: float) -> torch.Tensor:
    """(1, *shape, dims) smooth random displacement in grid units, largest magnitude ``2 * max_shift``."""
    dims = len(shape)
    coarse = torch.from_numpy(rng.standard_normal((1, dims, *([control] * dims)))).float()
    mode = "bicubic" if dims == 2 else "trilinear"
    field = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    peak = field.norm(dim=1).max().clamp_min(1e-8)
    field = field / peak * (2.0 * max_shift)  # [-1, 1] spans the side: 2 * fraction
    return torch.movedim(field, 1, -1)


def deform_labels(labels: np.ndarray | torch.Tensor, rng: np.random.Generator, *, max_shift: float = 0.06,
                  control: int = 5, scale: tuple[float, float] = (0.9, 1.1), rotate: float = 10.0,
                  flip: bool = True) -> np.ndarray:
    """One random smooth deformation + scaling + rotation (+ flip) of an integer label map (2D or 3D), resampled
    by nearest neighbour; the same shape and dtype int64, 0 outside the source."""
    lab = torch.as_tensor(np.asarray(labels)).long()
    if lab.ndim not in (2, 3):
        raise ValueError(f"label map of shape {tuple(lab.shape)}: need a 2D or 3D map")
    if not (0 <= max_shift < 0.5 and control >= 2 and 0 < scale[0] <= scale[1]):
        raise ValueError("deform_labels: need 0 <= max_shift < 0.5, control >= 2, 0 < scale[0] <= scale[1]")
    shape = tuple(lab.shape)
    grid = _affine_grid(shape, rng, scale, rotate, flip) + _displacement(shape, rng, control, max_shift)
    out = F.grid_sample(lab[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out[0, 0].round().long().numpy()


def new_label_maps(maps: Sequence[np.ndarray], n: int, *, seed: int = 0, **kwargs) -> Iterator[tuple[int, np.ndarray]]:
    """``n`` new label maps, one at a time (bounded memory): ``(source index, map)``, map i from source
    ``i % len(maps)`` with its own seed (``seed + i``), so map i is the same whatever ``n`` is."""
    if not maps:
        raise ValueError("new_label_maps: no source maps")
    for i in range(n):
        src = i % len(maps)
        yield src, deform_labels(maps[src], np.random.default_rng(seed + i), **kwargs)


def _nilearn_data() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        raise FileNotFoundError("nilearn is not installed: the MNI152 tissue maps ship inside it "
                                "(pip install 'medldm[data]')")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def mni_tissue_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real tissue labels of the MNI152 2009a T1 template: ``(labels int64 (197, 233, 189), T1 float32, affine)``.

    0 = outside the head (the T1 below 10 % of its range, as :func:`medldm.data.tissue.tissue_labels`, holes
    filled; the template is skull-stripped, so "head" is the brain); 1 = inside it but neither grey nor white
    matter (mostly CSF: ventricles, sulci); 2 = grey matter;
    3 = white matter — each head voxel takes the most probable of (1 - p_GM - p_WM, p_GM, p_WM) from the ICBM
    2009a probability maps. On T1 the class order matches the intensity classes (GM darker than WM). Measured: class
    1 is 0.02 % of the volume (nilearn's GM and WM maps together cover nearly all of the skull-stripped brain,
    ventricles included), so in practice these are background / GM / WM."""
    d = _nilearn_data()
    t1img = nib.load(str(d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    t1 = np.asarray(t1img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).dataobj, np.float32)
    wm = np.asarray(nib.load(str(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).dataobj, np.float32)
    lo, hi = float(t1.min()), float(t1.max())
    head = binary_fill_holes(t1 > lo + FOREGROUND_FRACTION * (hi - lo))  # the dark ventricles are inside
    prob = np.stack([np.clip(1.0 - gm - wm, 0, 1), gm, wm])
    lab = np.where(head | (gm + wm > 0.5), 1 + prob.argmax(0), 0).astype(np.int64)
    return lab, t1, np.asarray(t1img.affine)
