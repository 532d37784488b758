"""``medldm demo``: the main job on real held-out scans, offline, on a CPU.

Takes real MR scans shipped by registry packages (``medldm.samples``), scales each to [0, 1] by its own
0.5-99.5th percentiles (recorded), degrades it (Gaussian noise at 5 % of the range; anti-aliased x2
in-plane down-sampling; thick slices of 4 on reformatted scans, :func:`prepare_thinslice_references`), runs the
enhancement methods (the shipped models of :mod:`medldm.shipped` through ``medldm.shipped.enhance``, and the
classical baselines), evaluates them all with ``medldm.eval`` (data_range R = 1), draws samples from the shipped
synthesis models (slice-position classes; images that follow a tissue label map derived from a held-out slice),
and writes one HTML page with the tables and image panels: ``OUT/report.html``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

# Held-out real MR: never used to train shipped models (see docs/models.md).
DEMO_SAMPLES = ("mr-brain-s0", "mr-abdomen", "mr-shoulder")
NOISE_SIGMA = 0.05  # fraction of the intensity range (issue 6 quality goal)
SR_SCALE = 2
DENOISE_BASELINES = ("gaussian", "nlm")
#: run when the optional ``bm3d`` package is installed (``medldm[bm3d]``; ``make demo`` installs it with the test
#: extra): the strongest classical denoiser, the one the shipped denoiser is measured against (issue 12)
OPTIONAL_DENOISE_BASELINES = ("bm3d",)
SR_BASELINES = ("nearest", "linear", "bicubic", "bspline")
DENOISE_MODELS = ("mr-denoise-2d",)  # shipped models (medldm.shipped), run when installed
SR_MODELS = ("mr-sr2x-2d",)
SYNTH_MODEL = "mr-synth-2d"
# thick -> thin slices (issue 12): the protocol of docs/training_logs/mr-thinslice-4x/eval_heldout.py
THIN_FACTOR = 4
THIN_BASELINES = ("linear", "bicubic", "bspline")  # along Z (--axis through); bicubic = Keys cubic, "cubic along z"
THIN_MODELS = ("mr-thinslice-4x",)
THIN_EVAL_AXIS = 1  # 2D metrics per slice along array axis 1 of the reformatted volume: the original image planes
PIESNO = "dipy-piesno"  # a 3D held-out scan (96 x 96 x 14 at 1 mm) where both reformats are used and fused
PIESNO_PATH = "pkg://dipy/data/files/test_piesno.nii.gz"
REFORMAT_SLICES = (0, 2, 1)  # (X, Y, S) -> (X, S, Y): a 2D slice's (or slice stack's) Y axis becomes Z
REFORMAT_PIESNO = (1, 2, 0)  # (X, Y, Z) -> (Y, Z, X): X becomes Z
# mask -> image (issue 13): a tissue label map derived from a held-out real slice
MASK_MODEL = "mr-synth-mask-2d"
MASK_SAMPLE = "mr-brain-s0"  # the held-out brain scan; its middle slice gives the label map
MASK_SAMPLES = 3  # generated images per label map (seeds SEED .. SEED + 2)


@dataclass
class Task:
    name: str  # "denoise" | "sr" | "thin"
    title: str
    degraded: str  # method name of the degraded input, first column of the tables
    methods: dict[str, Path] = field(default_factory=dict)  # method -> prediction folder
    timings: dict[str, float] = field(default_factory=dict)
    axis: int = 2  # array axis of the per-slice 2D metrics
    note: str = ""  # what was done, for the report (HTML)


def _crop(img, sizes: tuple[int, int, int]):
    """Crop (X, Y, Z) to at most ``sizes`` around the centre, affine updated."""
    import torch

    shape = tuple(int(n) for n in img.shape)
    keep = [min(int(s), n) for s, n in zip(sizes, shape, strict=True)]
    off = [(n - k) // 2 for n, k in zip(shape, keep, strict=True)]
    out = img[tuple(slice(o, o + k) for o, k in zip(off, keep, strict=True))].clone()
    aff = np.asarray(img.affine, dtype=np.float64).copy()
    aff[:3, 3] = aff[:3, :3] @ np.array(off, float) + aff[:3, 3]
    out.affine = torch.as_tensor(aff)
    return out


def _center_crop(img, size: int, max_slices: int):
    """Crop (X, Y, Z) to at most size x size x max_slices around the centre, affine updated."""
    return _crop(img, (size, size, max_slices))


def prepare_references(out: Path, *, quick: bool, scans: dict[str, Path] | None = None) -> dict[str, Path]:
    """Load each held-out sample (or each of ``scans``: name -> scan path), scale to [0, 1] (0.5-99.5th
    percentiles), save OUT/ref/<name>.nii.gz."""
    from medldm.data.intensity import fit_normalization, normalize
    from medldm.io.nifti import save_nifti
    from medldm.io.reader import load_scan
    from medldm.samples import available_samples

    have = dict(scans) if scans is not None else available_samples()
    refs: dict[str, Path] = {}
    for name in (have if scans is not None else DEMO_SAMPLES):
        if name not in have:
            print(f"demo: sample {name} not installed, skipped (pip install -e .[data])")
            continue
        img = load_scan(have[name])
        if quick:
            img = _center_crop(img, 96, 2)
        even = [(n // SR_SCALE) * SR_SCALE for n in img.shape[:2]]
        if even != list(img.shape[:2]):  # x2 up-sampling of the low-res input lands on the same grid
            img = _center_crop(img, min(even), img.shape[2])
        params = fit_normalization(img, "MR", out_range=(0.0, 1.0))
        ref = normalize(img, params)
        ref.meta["original_dtype"] = "float32"
        ref.meta["normalization"] = params
        refs[name] = save_nifti(ref, out / "ref" / f"{name}.nii.gz", dtype="float32")
    if not refs:
        raise RuntimeError("no demo sample scans installed: pip install -e .[data]")
    return refs


def thinslice_scans(scans: dict[str, Path] | None = None) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """The thick -> thin references: name -> (scan path, axis permutation of the reformat).

    By default the held-out demo scans (``DEMO_SAMPLES``: 2D slices, or slices 53 mm apart), reformatted
    (X, S, Y) so a real high-resolution in-plane axis (Y) becomes Z, plus dipy's ``test_piesno.nii.gz`` (3D,
    1 mm isotropic; used by no shipped model), reformatted (Y, Z, X): X becomes Z. ``scans`` (name -> path) replace
    them, each reformatted (X, S, Y). Samples whose package is missing are left out (a message says which)."""
    from medldm.data.datasets import resolve_path
    from medldm.samples import available_samples

    if scans is not None:
        return {n: (Path(p), REFORMAT_SLICES) for n, p in scans.items()}
    have = available_samples()
    out = {}
    for name in DEMO_SAMPLES:
        if name in have:
            out[name] = (have[name], REFORMAT_SLICES)
        else:
            print(f"demo: sample {name} not installed, skipped (pip install -e .[data])")
    piesno = resolve_path(PIESNO_PATH) if importlib.util.find_spec("dipy") is not None else None
    if piesno is not None and piesno.is_file():
        out[PIESNO] = (piesno, REFORMAT_PIESNO)
    else:
        print(f"demo: {PIESNO} ({PIESNO_PATH}) not installed, skipped (pip install dipy)")
    return out


def reformat(img, perm: tuple[int, int, int]):
    """The scan ``img`` (X, Y, Z) with its array axes permuted by ``perm`` and the affine's columns with them: the
    same voxels at the same world positions, another axis as Z (a fresh MetaTensor, float32)."""
    import torch
    from monai.data import MetaTensor

    arr = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32)
    aff = np.asarray(img.affine, dtype=np.float64)[:, [*perm, 3]]
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr.transpose(*perm))), affine=torch.as_tensor(aff))


def prepare_thinslice_references(ref_dir: Path, *, quick: bool = False, scans: dict[str, Path] | None = None,
                                 names: tuple[str, ...] = ()) -> dict[str, Path]:
    """The thick -> thin references (issue 12 protocol; ``medldm demo`` and
    docs/training_logs/mr-thinslice-4x/eval_heldout.py): each scan of :func:`thinslice_scans` (``names``: only
    those) reformatted (:func:`reformat`), ``quick``: centre-cropped to at most 96 x 2 x 96, Z cropped (centred) to a
    multiple of ``THIN_FACTOR``, scaled to [0, 1] by its own 0.5-99.5th percentiles; saved as
    ``ref_dir/<name>.nii.gz`` (float32). Returns name -> path."""
    from medldm.data.intensity import fit_normalization, normalize
    from medldm.io.nifti import save_nifti
    from medldm.io.reader import load_scan

    table = thinslice_scans(scans)
    refs: dict[str, Path] = {}
    for name in names or tuple(table):
        path, perm = table[name]
        vol = reformat(load_scan(path), perm)
        if quick:
            vol = _crop(vol, (96, 2, 96))
        z = vol.shape[2]
        vol = _crop(vol, (vol.shape[0], vol.shape[1], z - z % THIN_FACTOR))
        params = fit_normalization(vol, "MR", out_range=(0.0, 1.0))
        ref = normalize(vol, params)
        ref.meta["original_dtype"] = "float32"
        refs[name] = save_nifti(ref, Path(ref_dir) / f"{name}.nii.gz", dtype="float32")
    return refs


def _save(img, path: Path) -> None:
    from medldm.io.nifti import save_nifti

    save_nifti(img, path, dtype="float32")


def _installed(packages: tuple[str, ...]) -> tuple[str, ...]:
    """The optional baseline packages among ``packages`` that are importable (a baseline of the same name)."""
    import importlib.util

    return tuple(p for p in packages if importlib.util.find_spec(p) is not None)


def _models(names: tuple[str, ...]) -> dict[str, Path]:
    """The shipped models among ``names`` that are installed: name -> model folder."""
    from medldm.shipped import installed_models

    have = installed_models()
    return {n: have[n].path for n in names if n in have}


def _enhance(model: Path, img, seed: int):
    """The demo's model run: ``medldm.shipped.enhance`` with the pipeline's defaults only (window, batch size,
    sampler, steps), so ``medldm enhance -m NAME --seed SEED`` on the saved input gives the same output
    (tests/test_inference_path.py)."""
    from medldm.shipped import enhance

    return enhance(model, img, seed=seed)


def run_denoise(out: Path, refs: dict[str, Path], seed: int) -> Task:
    from medldm.data.degrade import gaussian_noise
    from medldm.eval.baselines import denoise_scan
    from medldm.io.reader import load_scan

    task = Task("denoise", f"Denoising: Gaussian noise, sigma = {NOISE_SIGMA:g} x intensity range", "noisy")
    root = out / "denoise"
    models = _models(DENOISE_MODELS)
    baselines = (*DENOISE_BASELINES, *_installed(OPTIONAL_DENOISE_BASELINES))
    for i, (name, path) in enumerate(refs.items()):
        ref = load_scan(path)
        noisy = gaussian_noise(ref, NOISE_SIGMA, seed + i)
        _save(noisy, root / "noisy" / f"{name}.nii.gz")
        for method in baselines:
            t0 = time.perf_counter()
            den, _ = denoise_scan(noisy, method)
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(den, root / method / f"{name}.nii.gz")
        for method, folder in models.items():
            t0 = time.perf_counter()
            den = _enhance(folder, noisy, seed)
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(den, root / method / f"{name}.nii.gz")
    task.methods = {"noisy": root / "noisy", **{m: root / m for m in (*baselines, *models)}}
    return task


def run_sr(out: Path, refs: dict[str, Path], seed: int = 0) -> Task:
    from medldm.data.degrade import downsample
    from medldm.eval.baselines import upsample_scan
    from medldm.io.reader import load_scan

    task = Task("sr", f"Super-resolution x{SR_SCALE} in-plane (anti-aliased down-sampling)", "nearest")
    root = out / "sr"
    models = _models(SR_MODELS)
    for name, path in refs.items():
        ref = load_scan(path)
        low = downsample(ref, SR_SCALE, method="gaussian")
        _save(low, root / "input" / f"{name}.nii.gz")
        for method in SR_BASELINES:
            t0 = time.perf_counter()
            up = upsample_scan(low, SR_SCALE, method)
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(up, root / method / f"{name}.nii.gz")
        for method, folder in models.items():
            t0 = time.perf_counter()
            up = _enhance(folder, low, seed)
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(up, root / method / f"{name}.nii.gz")
    task.methods = {m: root / m for m in (*SR_BASELINES, *models)}
    return task


def run_thinslice(out: Path, refs: dict[str, Path], seed: int = 0, *, quick: bool = False) -> Task:
    """Thick -> thin slices x4 on the references of :func:`prepare_thinslice_references` (OUT/thin/ref): thick
    slices of ``THIN_FACTOR`` along Z (box profile, ``medldm degrade --kind thick --level 4 --axis 2``), the
    interpolation baselines along Z (``medldm baseline --task sr --scale 4 --axis through``) and the shipped
    thin-slice model (``medldm.shipped.enhance``, the pipeline of ``medldm enhance -m mr-thinslice-4x``)."""
    from medldm.data.degrade import thick_slices
    from medldm.eval.baselines import upsample_scan
    from medldm.io.reader import load_scan

    note = (f"Thick slices: each thick slice is the mean of {THIN_FACTOR} adjacent thin slices along Z (box slice "
            f"profile; <code>medldm degrade --kind thick --level {THIN_FACTOR} --axis 2</code>), so the input has "
            f"1/{THIN_FACTOR} of the slices over the same extent, and each method returns the thin grid. The "
            "demo's scans are 2D slices (or slices 53 mm apart), so a real high-resolution in-plane axis is made "
            "Z by reformatting: each scan (X, Y, S) is stored as (X, S, Y) (array axes permuted with the affine: "
            "the same voxels at the same world positions)"
            + (f"; {PIESNO} (dipy's test_piesno.nii.gz, 96 x 96 x 14 at 1 mm, used by no shipped model) as "
               "(Y, Z, X)" if PIESNO in refs else "")
            + f". Z is cropped (centred) to a multiple of "
            f"{THIN_FACTOR} before the scaling to [0, 1]. Baselines interpolate along Z "
            f"(<code>medldm baseline --task sr --scale {THIN_FACTOR} --axis through</code>; bicubic = Keys cubic "
            "convolution, the &quot;cubic along z&quot;); the model runs on the reformats in which Z is in-plane. "
            f"PSNR / SSIM per 2D slice along array axis {THIN_EVAL_AXIS} of the reformatted volume, i.e. in the "
            "original image planes (<code>medldm evaluate --axis 1</code>); protocol of "
            "docs/training_logs/mr-thinslice-4x/eval_heldout.py"
            + (" (here --quick: centre crops of at most 96 x 2 x 96 of the reformatted scans)." if quick else "."))
    task = Task("thin", f"Thick -> thin slices x{THIN_FACTOR} (box profile, through-plane)", THIN_BASELINES[0],
                axis=THIN_EVAL_AXIS, note=note)
    root = out / task.name
    models = _models(THIN_MODELS)
    for name, path in refs.items():
        ref = load_scan(path)
        thick = thick_slices(ref, THIN_FACTOR, axis=2)
        _save(thick, root / "thick" / f"{name}.nii.gz")
        for method in THIN_BASELINES:
            t0 = time.perf_counter()
            up = upsample_scan(thick, THIN_FACTOR, method, axis="through")
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(up, root / method / f"{name}.nii.gz")
        for method, folder in models.items():
            t0 = time.perf_counter()
            up = _enhance(folder, thick, seed)
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(up, root / method / f"{name}.nii.gz")
    task.methods = {m: root / m for m in (*THIN_BASELINES, *models)}
    return task


def evaluate_task(out: Path, task: Task, refs_dir: Path) -> dict:
    from medldm.eval.evaluate import convention_from
    from medldm.eval.pairing import pair_folders
    from medldm.eval.run import EvalOptions, evaluate

    pairing = pair_folders(refs_dir, list(task.methods.items()))
    opts = EvalOptions(convention_from(data_range=1.0), axis=task.axis, slices_per_case=1)
    status, summary = evaluate(pairing, opts,
                               out / task.name / "report", command=f"medldm demo ({task.name})", quiet=True)
    if status:
        raise RuntimeError(f"demo evaluation of {task.name} failed: see {out / task.name / 'report' / 'run_report.json'}")
    return summary


def _volume_rows(out: Path, task: Task) -> dict[str, dict[str, dict[str, float]]]:
    """method -> case -> {"psnr", "ssim"}: mean over the case's slices of the 2D metrics
    (from the task report's metrics.csv)."""
    import csv

    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    with open(out / task.name / "report" / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["level"] == "slice":
                per = acc.setdefault(r["method"], {}).setdefault(r["case"], {"psnr": [], "ssim": []})
                for k in per:
                    per[k].append(float(r[k]))
    return {m: {c: {k: float(np.mean(v)) for k, v in per.items()} for c, per in cases.items()}
            for m, cases in acc.items()}


def _table(out: Path, task: Task, summary: dict) -> str:
    values = _volume_rows(out, task)
    cases = sorted(values[task.degraded])
    head = "".join(f"<th>{escape(c)}</th>" for c in cases)
    rows = []
    for m in task.methods:
        per = values.get(m, {})
        cells = "".join(f"<td>{per[c]['psnr']:.2f} / {per[c]['ssim']:.4f}</td>" if c in per else "<td>n/a</td>"
                        for c in cases)
        mean = summary["methods"][m]
        t = task.timings.get(m)
        rows.append(f"<tr><td>{escape(m)}</td>{cells}<td><b>{mean['psnr']['slice_mean']['mean']:.2f} / "
                    f"{mean['ssim']['slice_mean']['mean']:.4f}</b></td><td>{'' if t is None else f'{t:.1f}'}</td></tr>")
    conv = escape(summary["convention"]["text"])
    return (f"<table><caption>{escape(task.title)}: PSNR (dB) / SSIM per held-out scan (2D, mean over its "
            f"slices along array axis {task.axis}) and their mean; "
            f"{conv}</caption><tr><th>method</th>{head}<th>mean</th><th>time (s)</th></tr>"
            + "".join(rows) + "</table>")


def _tile(plane, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """A 2D array (X, Y) -> uint8 gray tile, rows = Y (as the panels show slices): window [lo, hi], by default
    the plane's own 0.5-99.5th percentiles."""
    from medldm.eval.panels import to_gray

    plane = np.asarray(plane, dtype=np.float64)
    if lo is None or hi is None:
        lo, hi = (float(v) for v in np.percentile(plane, [0.5, 99.5]))
    return np.rot90(to_gray(plane, lo, hi if hi > lo else lo + 1))


def _save_strip(tiles: list[np.ndarray], path: Path) -> Path:
    """Tiles of one height side by side (4-pixel gaps), enlarged by an integer factor to >= 128 rows, as PNG."""
    from PIL import Image

    from medldm.eval.panels import save_png

    gap = np.zeros((tiles[0].shape[0], 4), dtype=tiles[0].dtype)
    row = np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1)
    scale = max(1, 128 // tiles[0].shape[0])
    return save_png(Image.fromarray(np.kron(row, np.ones((scale, scale), dtype=row.dtype))), path)


def class_name(syn, label: int) -> str:
    """The name of synthesis class ``label``: ``Synthesizer.class_names`` when the model folder records them
    (``position-2``, ``T1/position-2``), else ``position-K`` for a slice-position model, ``class K`` otherwise."""
    names = list(getattr(syn, "class_names", None) or [])
    if 0 <= label < len(names):
        return str(names[label])
    if (syn.bundle.extra or {}).get("class_from") == "slice_position":
        return f"position-{label}"
    return f"class {label}"


def run_synthesis(out: Path, n: int, seed: int) -> dict | None:
    """``n`` samples of the shipped synthesis model as one PNG panel (OUT/synth/samples.png) plus the NIfTI
    files; None when the model is not installed. A class-conditional model (mr-synth-2d: slice-position bins)
    cycles through its classes: sample i has class i mod K (``labels``: each sample's class name)."""
    from medldm.shipped import open_model

    models = _models((SYNTH_MODEL,))
    if not models:
        return None
    t0 = time.perf_counter()
    syn = open_model(models[SYNTH_MODEL], "synthesize").runner
    tiles, labels = [], []
    for i in range(n):
        label = i % syn.num_classes if syn.num_classes else None
        img, _ = syn.generate(seed=seed + i, label=label)
        _save(img, out / "synth" / f"sample_{i:02d}.nii.gz")
        tiles.append(_tile(img[:, :, 0]))
        labels.append(None if label is None else class_name(syn, label))
    path = _save_strip(tiles, out / "synth" / "samples.png")
    return {"model": SYNTH_MODEL, "file": path.relative_to(out).as_posix(), "n": n, "seed": seed,
            "steps": syn.dcfg.sampling_steps, "classes": int(syn.num_classes), "labels": labels,
            "size": list(syn.size), "seconds": time.perf_counter() - t0}


def mask_from_slice(syn, scan: Path, name: str):
    """The tissue label map medldm derives from the middle slice (along Z) of ``scan`` for the mask-conditioned
    synthesizer ``syn``, the way training derives its conditions: the scan normalized as training data
    (``medldm.data.datasets.LoadNormalize``), its slices fitted to the model's training size like training items
    (``make_items``: padded to a square and resized to ``resize_to``), then ``medldm.data.tissue.tissue_labels``
    (background + intensity clusters, darkest first).

    Returns (labels int64 (X, Y), the real slice (X, Y) in the model range, the 4x4 RAS affine of that grid, the
    slice index)."""
    from medldm.data.datasets import LoadNormalize, make_items
    from medldm.data.tissue import tissue_labels
    from medldm.io.geometry import resized_affine
    from medldm.io.reader import load_scan

    ex = dict(syn.bundle.extra or {})
    resize = ex.get("resize_to")
    patch = list(ex.get("patch_size") or syn.size)
    vol = LoadNormalize("MR")({"path": str(scan), "id": name, "source": 0})
    shape = [int(s) for s in vol["image"].shape]
    k = shape[2] // 2
    item = make_items([vol], spatial_dims=2, slice_axis=2, patch=patch, factor=syn.f, resize_to=resize)[k]
    real = item.image[0]
    # the grid of the item: slice k, padded symmetrically to a square and resized (pixel-area convention), then
    # padded symmetrically to the item's size (medldm.data.datasets._fit)
    aff = np.asarray(load_scan(scan).affine, dtype=np.float64).copy()
    aff[:3, 3] += aff[:3, 2] * k
    size = shape[:2]
    if resize is not None:
        side = max(size)
        aff[:3, 3] -= aff[:3, :2] @ np.array([(side - s) // 2 for s in size], float)
        aff = resized_affine(aff, (side, side, 1), (*resize, 1))
        size = list(resize)
    aff[:3, 3] -= aff[:3, :2] @ np.array([(int(t) - s) // 2 for s, t in zip(size, real.shape, strict=True)], float)
    return tissue_labels(real, syn.mask_classes), real, aff, k


def run_mask_synthesis(out: Path, seed: int, *, n: int = MASK_SAMPLES, model: str | Path | None = None,
                       scan: tuple[str, Path] | None = None) -> dict | None:
    """Mask -> image: the tissue label map of a held-out real slice (:func:`mask_from_slice`; ``scan`` = (name,
    path), default the demo sample ``MASK_SAMPLE``), ``n`` images generated from it (seeds ``seed`` ..
    ``seed + n - 1``) by the mask-conditioned synthesis model ``model`` (default: the shipped ``MASK_MODEL``;
    None is returned when it is not installed) through ``Synthesizer.generate(mask=, affine=)``, the call of
    ``medldm synthesize --mask``, and one PNG panel: label map | generated images | real slice (OUT/mask/).
    OUT/mask holds the label map (``labels.nii.gz``, written as ``synthesize`` writes its copies) and the images
    under the names and in the format ``medldm synthesize -m MODEL --mask OUT/mask/labels.nii.gz -n N --seed SEED
    -o DIR`` gives them (the same images: tests/test_demo.py)."""
    import torch
    from monai.data import MetaTensor

    from medldm.io.nifti import save_nifti
    from medldm.samples import available_samples
    from medldm.shipped import open_model, resolve_model

    if model is None:
        folder = _models((MASK_MODEL,)).get(MASK_MODEL)
        if folder is None:
            return None
        model = MASK_MODEL
    else:
        folder = resolve_model(model)
    if scan is None:
        have = available_samples()
        if MASK_SAMPLE not in have:
            print(f"demo: sample {MASK_SAMPLE} not installed, mask -> image example skipped (pip install dipy)")
            return None
        scan = (MASK_SAMPLE, have[MASK_SAMPLE])
    t0 = time.perf_counter()
    syn = open_model(folder, "synthesize").runner
    labels, real, affine, k = mask_from_slice(syn, scan[1], scan[0])
    root = out / "mask"
    dtype = np.uint8 if syn.mask_classes <= 255 else np.int16
    meta = {"original_ndim": 2, "original_dtype": np.dtype(dtype).name}
    lab_path = save_nifti(MetaTensor(labels[:, :, None].float(), affine=torch.as_tensor(affine), meta=meta),
                          root / "labels.nii.gz", dtype=dtype)
    _save(MetaTensor(real[:, :, None].float().clone(), affine=torch.as_tensor(affine), meta={"original_ndim": 2}),
          root / "real.nii.gz")
    tiles = [_tile(labels, 0, syn.mask_classes - 1)]
    for i in range(n):
        img, _ = syn.generate(seed=seed + i, mask=labels, affine=affine)
        save_nifti(img, root / f"synth_{i:05d}.nii.gz")  # as medldm synthesize writes it
        tiles.append(_tile(img[:, :, 0]))
    tiles.append(_tile(real))
    path = _save_strip(tiles, root / "panel.png")
    rel = lab_path.relative_to(out).as_posix()
    return {"model": str(model), "file": path.relative_to(out).as_posix(), "labels": rel, "n": n, "seed": seed,
            "scan": scan[0], "slice": k, "classes": syn.mask_classes, "size": list(labels.shape),
            "steps": syn.dcfg.sampling_steps, "sampler": syn.dcfg.sampler, "seconds": time.perf_counter() - t0,
            "command": f"medldm synthesize -m {model} --mask {rel} -n {n} --seed {seed} -o DIR"}


def _synthesis_html(synth: dict) -> str:
    if synth.get("classes"):
        names = synth["labels"]
        each = "; ".join(f"{i + 1}: {escape(str(c))}" for i, c in enumerate(names))
        what = (f"Left to right, sample i (seed {synth['seed']} + i) of class i mod {synth['classes']}, by class "
                f"name: {each}. ")
        if all("position-" in str(c) for c in names):
            what += ("The classes are slice-position bins along the head axis: each training volume's slices split "
                     "into equal bins along its slice axis, position-0 holding the first"
                     + (" (per contrast: CONTRAST/position-B)" if any("/" in str(c) for c in names) else "")
                     + ". ")
    else:
        what = f"Unconditional samples, seeds {synth['seed']}..{synth['seed'] + synth['n'] - 1}. "
    return (f"<h2>Synthesis: {synth['n']} samples of {escape(synth['model'])}</h2>"
            f"<figure><img src='{escape(synth['file'])}' alt='synthetic MR slices'><figcaption>{what}"
            f"{synth['size'][0]} x {synth['size'][1]}, {synth['steps']} sampler steps, {synth['seconds']:.1f} s; "
            "each shown between its own 0.5-99.5th percentiles. Files: <code>synth/sample_*.nii.gz</code>."
            "</figcaption></figure>")


def _mask_html(mask: dict) -> str:
    from medldm.samples import SAMPLES

    src = escape(mask["scan"]) + (f" ({escape(SAMPLES[mask['scan']].description)})" if mask["scan"] in SAMPLES else "")
    last = mask["seed"] + mask["n"] - 1
    return (f"<h2>Mask -&gt; image: {mask['n']} images of {escape(mask['model'])} from one label map</h2>"
            f"<figure><img src='{escape(mask['file'])}' alt='tissue label map, synthetic images, real slice'>"
            f"<figcaption>Left to right: the tissue label map medldm derives from slice {mask['slice']} of the "
            f"{'held-out ' if mask['scan'] in DEMO_SAMPLES else ''}{src} (normalized as training data, padded to a square and resized to {mask['size'][0]} x "
            f"{mask['size'][1]}, then background + {mask['classes'] - 1} intensity clusters, darkest first: "
            f"medldm.data.tissue; shown as gray levels 0..{mask['classes'] - 1}) | {mask['n']} images generated "
            f"from it (seeds {mask['seed']}..{last}, {mask['steps']} {escape(mask['sampler'])} steps, "
            f"{mask['seconds']:.1f} s in all) | the real slice the map came from (each image between its own "
            "0.5-99.5th percentiles). The classes are intensity clusters, not anatomy: on a b0 or T2-weighted scan "
            "the brightest class is CSF, on T1 it is white matter. "
            f"Run in this folder, <code>{escape(mask['command'])}</code> makes the same images as the files "
            f"<code>mask/synth_*.nii.gz</code> beside the label map.</figcaption></figure>")


def write_index(out: Path, tasks: list[tuple[Task, dict]], refs: dict[str, Path], wall: float,
                synth: dict | None = None, mask: dict | None = None) -> Path:
    from medldm.eval.style import PAGE_END, page_head
    from medldm.io.atomic import atomic_file
    from medldm.samples import SAMPLES

    parts = [page_head("medldm demo"),
             f"<h1>medldm demo</h1><p>This report: <code>{escape(str((out / 'report.html').resolve()))}</code>. "
             f"Run time {wall:.0f} s.</p>",
             "<p>Held-out real MR scans (never used to train shipped models), each scaled to [0, 1] by its own "
             "0.5–99.5th intensity percentiles:</p><ul>"]
    parts += [f"<li>{escape(n)}: {escape(SAMPLES[n].description)} (package {escape(SAMPLES[n].pip)})</li>"
              if n in SAMPLES else f"<li>{escape(n)}</li>" for n in refs]
    parts.append("</ul>")
    shipped = [m for task, _ in tasks for m in task.methods if m.startswith("mr-")]
    if shipped:
        parts.append(f"<p>Shipped models ({escape(', '.join(shipped))}) are small models trained in under an hour "
                     "each on a 2-core CPU, on a few real scans (mostly brain); <code>medldm models</code> and "
                     "docs/models.md give their training data, validation figures and known gaps. The classical "
                     "baselines are the reference.</p>")
    for task, summary in tasks:
        parts.append(f"<h2>{escape(task.title)}</h2>")
        if task.note:
            parts.append(f"<p>{task.note}</p>")
        parts.append(_table(out, task, summary))
        parts.append(f"<p>Full report with per-case and per-slice tables: "
                     f"<a href='{task.name}/report/report.html'>{task.name}/report/report.html</a></p>")
        panels = json.loads((out / task.name / "report" / "panels.json").read_text())["panels"]
        for p in panels:
            parts.append(f"<figure><img src='{task.name}/report/{escape(p['file'])}' alt='{escape(p['case'])}'>"
                         f"<figcaption>{escape(p['case'])}, slice {p['slice']} along array axis {task.axis}: "
                         f"reference | {escape(' | '.join(task.methods))} | |method − reference| of each "
                         f"(0–{p['dmax']:g})"
                         "</figcaption></figure>")
    if synth is not None:
        parts.append(_synthesis_html(synth))
    if mask is not None:
        parts.append(_mask_html(mask))
    parts.append(PAGE_END)
    path = out / "report.html"
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path


def run_demo(out: str | Path = "demo_out", *, quick: bool = False, seed: int = 0,
             scans: dict[str, Path] | None = None, mask_model: str | Path | None = None) -> Path:
    """Run the whole demo; returns the path of OUT/report.html. ``scans`` (name -> path) replaces the held-out
    demo samples (``python tools/shipped_models.py validate`` runs the same protocol on the models' validation
    scans): the thick -> thin task then uses them (reformatted (X, S, Y), without piesno) and the mask example
    the first of them. ``mask_model``: the mask-conditioned synthesis model of the mask -> image example (a model
    or run folder, or a shipped name; default: the shipped ``mr-synth-mask-2d`` when installed, else no example)."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refs = prepare_references(out, quick=quick, scans=scans)
    thin_refs = prepare_thinslice_references(out / "thin" / "ref", quick=quick, scans=scans)
    tasks = []
    for run, refs_dir in ((lambda: run_denoise(out, refs, seed), out / "ref"),
                          (lambda: run_sr(out, refs, seed), out / "ref"),
                          (lambda: run_thinslice(out, thin_refs, seed, quick=quick), out / "thin" / "ref")):
        task = run()
        tasks.append((task, evaluate_task(out, task, refs_dir)))
    synth = run_synthesis(out, n=4 if quick else 8, seed=seed)
    first = next(iter(scans.items())) if scans else None
    mask = run_mask_synthesis(out, seed=seed, model=mask_model, scan=first)
    return write_index(out, tasks, refs, time.perf_counter() - t0, synth, mask)
