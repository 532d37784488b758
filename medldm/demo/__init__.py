"""``medldm demo``: the main job on real held-out scans, offline, on a CPU.

Takes real MR scans shipped by registry packages (``medldm.samples``), scales each to [0, 1] by its own
0.5-99.5th percentiles (recorded), degrades it (Gaussian and Rician noise at 5 % of the range; anti-aliased x2
in-plane down-sampling; thick slices of 4 on reformatted scans, :func:`prepare_thinslice_references`), runs the
enhancement methods (the shipped models of :mod:`medldm.shipped` through ``medldm.shipped.enhance``, and the
classical baselines), evaluates them all with ``medldm.eval`` (data_range R = 1), draws samples from the shipped
synthesis models (slice-position classes; images that follow a tissue label map derived from a held-out slice),
and writes one HTML page with the tables and image panels: ``OUT/report.html`` (:mod:`medldm.demo.report`).

Every task is one loop (:func:`run_methods`): for each scan, degrade it, then time each baseline, then each
model, printing one progress line per method.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medldm.data.datasets import LoadNormalize, make_items, resolve_path
from medldm.data.degrade import downsample, gaussian_noise, rician_noise, thick_slices
from medldm.data.tissue import tissue_labels
from medldm.demo.report import _mask_html, _save_strip, _synthesis_html, _tile, write_index  # noqa: F401 (API)
from medldm.demo.scans import (  # noqa: F401 (API: tools/, tests)
    DEMO_SAMPLES,
    PIESNO,
    PIESNO_PATH,
    REFORMAT_PIESNO,
    REFORMAT_SLICES,
    SR_SCALE,
    THIN_FACTOR,
    _center_crop,
    _crop,
    prepare_references,
    prepare_thinslice_references,
    reformat,
    thinslice_scans,
)
from medldm.eval.audit_frd import missing as frd_missing
from medldm.eval.audit_frd import radiomics_frd
from medldm.eval.audit_load import to_grid
from medldm.eval.audit_utility import unit_range
from medldm.eval.baselines import denoise_scan, upsample_scan
from medldm.eval.evaluate import convention_from
from medldm.eval.pairing import pair_folders
from medldm.eval.run import EvalOptions, evaluate
from medldm.io.geometry import resized_affine
from medldm.io.nifti import save_nifti
from medldm.io.reader import load_scan
from medldm.samples import available_samples, sample_path
from medldm.shipped import enhance, installed_models, open_model, resolve_model

NOISE_SIGMA = 0.05  # fraction of the intensity range (issue 6 quality goal)
NOISE_KINDS = ("gaussian", "rician")  # one denoising task each: zero-mean noise, magnitude MR
DENOISE_BASELINES = ("gaussian", "nlm")
#: run when their optional package is installed (``medldm[bm3d]``, ``medldm[ants]``; ``make demo`` installs them
#: with the test extra): BM3D (2D) and the 3D baselines a user denoising a volume compares with (issue 22): BM4D,
#: ANTs DenoiseImage. On Rician rows BM3D/BM4D (and NLM) are followed by the exact Rician bias correction and ANTs
#: uses its Rician model (``medldm.eval.baselines``); every method is blind (estimates the noise level itself).
OPTIONAL_DENOISE_BASELINES = ("bm3d", "bm4d", "ants")
SR_BASELINES = ("nearest", "linear", "bicubic", "bspline")
DENOISE_MODELS = ("mr-denoise-2d", "mr-denoise-25d")  # shipped models (medldm.shipped), run when installed
SR_MODELS = ("mr-sr2x-2d",)
SYNTH_MODEL = "mr-synth-2d"
THIN_BASELINES = ("linear", "bicubic", "bspline")  # along Z (--axis through); bicubic = Keys cubic, "cubic along z"
THIN_MODELS = ("mr-thinslice-4x",)
THIN_EVAL_AXIS = 1  # 2D metrics per slice along array axis 1 of the reformatted volume: the original image planes
# mask -> image (issue 13): a tissue label map derived from a held-out real slice
MASK_MODEL = "mr-synth-mask-2d"
#: real slices the samples' radiomics are compared with: two held-out brain scans (two subjects) that no
#: synthesis model trained on
REALISM_REAL = ("mr-brain-s0", PIESNO)
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


def _save(img, path: Path) -> None:

    save_nifti(img, path, dtype="float32")


def _installed(packages: tuple[str, ...]) -> tuple[str, ...]:
    """The optional baseline packages among ``packages`` that are importable (a baseline of the same name)."""
    return tuple(p for p in packages if importlib.util.find_spec(p) is not None)


def _models(names: tuple[str, ...]) -> dict[str, Path]:
    """The shipped models among ``names`` that are installed: name -> model folder."""
    have = installed_models()
    return {n: have[n].path for n in names if n in have}


def _enhance(model: Path, img, seed: int):
    """The demo's model run: ``medldm.shipped.enhance`` with the pipeline's defaults only (window, batch size,
    sampler, steps), so ``medldm enhance -m NAME --seed SEED`` on the saved input gives the same output
    (tests/test_inference_path.py)."""
    return enhance(model, img, seed=seed)


def run_methods(task: Task, root: Path, refs: dict[str, Path], degrade, baselines: dict, models: dict[str, Path],
                seed: int, input_dir: str) -> None:
    """The one loop of every task: for each reference scan, ``degrade(ref, i)`` saved to ``root/input_dir``, then
    each baseline (``name -> fn(degraded)``), then each shipped model (``medldm.shipped.enhance``), each timed
    (``task.timings``, summed over the scans), saved to ``root/<method>/<scan>.nii.gz`` and reported on one
    progress line."""
    methods = {**baselines, **{m: (lambda img, f=folder: _enhance(f, img, seed)) for m, folder in models.items()}}
    for i, (name, path) in enumerate(refs.items()):
        degraded = degrade(load_scan(path), i)
        _save(degraded, root / input_dir / f"{name}.nii.gz")
        for method, fn in methods.items():
            print(f"demo: {task.name}: {name} ({i + 1}/{len(refs)}): {method} ...", end="", flush=True)
            t0 = time.perf_counter()
            res = fn(degraded)
            dt = time.perf_counter() - t0
            task.timings[method] = task.timings.get(method, 0.0) + dt
            print(f" {dt:.1f} s", flush=True)
            _save(res, root / method / f"{name}.nii.gz")
    task.methods.update({m: root / m for m in methods})


def run_denoise(out: Path, refs: dict[str, Path], seed: int, noise: str = "gaussian") -> Task:
    """Denoising with ``noise`` (``gaussian``: folder OUT/denoise; ``rician``: magnitude MR, OUT/denoise-rician)
    at ``NOISE_SIGMA`` of the range; every method blind."""
    add = gaussian_noise if noise == "gaussian" else rician_noise
    name = "denoise" if noise == "gaussian" else f"denoise-{noise}"
    what = "Gaussian noise" if noise == "gaussian" else "Rician noise (magnitude MR)"
    task = Task(name, f"Denoising: {what}, sigma = {NOISE_SIGMA:g} x intensity range", "noisy",
                note="Every method blind: each estimates the noise level itself. BM4D and ANTs DenoiseImage work "
                     "on the whole volume (3D), BM3D and NLM slice by slice"
                     + ("; on Rician noise NLM, BM3D and BM4D are followed by the exact Rician bias correction "
                        "(inverse of the Rician mean, Koay &amp; Basser 2006) and ANTs uses its Rician noise model"
                        if noise == "rician" else "") + ".")
    task.methods["noisy"] = out / name / "noisy"
    baselines = {m: (lambda img, m=m: denoise_scan(img, m, noise=noise)[0])
                 for m in (*DENOISE_BASELINES, *_installed(OPTIONAL_DENOISE_BASELINES))}
    # magnitude MR is never negative: the reference scaled by its percentiles may dip below 0 (Rician: clamped)
    run_methods(task, out / name, refs,
                lambda ref, i: add(ref.clamp(min=0) if noise == "rician" else ref, NOISE_SIGMA, seed + i), baselines,
                _models(DENOISE_MODELS), seed, "noisy")
    return task


def run_sr(out: Path, refs: dict[str, Path], seed: int = 0) -> Task:

    task = Task("sr", f"Super-resolution x{SR_SCALE} in-plane (anti-aliased down-sampling)", "nearest")
    baselines = {m: (lambda img, m=m: upsample_scan(img, SR_SCALE, m)) for m in SR_BASELINES}
    run_methods(task, out / "sr", refs, lambda ref, i: downsample(ref, SR_SCALE, method="gaussian"), baselines,
                _models(SR_MODELS), seed, "input")
    return task


def run_thinslice(out: Path, refs: dict[str, Path], seed: int = 0, *, quick: bool = False) -> Task:
    """Thick -> thin slices x4 on the references of :func:`prepare_thinslice_references` (OUT/thin/ref): thick
    slices of ``THIN_FACTOR`` along Z (box profile, ``medldm degrade --kind thick --level 4 --axis 2``), the
    interpolation baselines along Z (``medldm baseline --task sr --scale 4 --axis through``) and the shipped
    thin-slice model (``medldm.shipped.enhance``, the pipeline of ``medldm enhance -m mr-thinslice-4x``)."""
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
    baselines = {m: (lambda img, m=m: upsample_scan(img, THIN_FACTOR, m, axis="through")) for m in THIN_BASELINES}
    run_methods(task, out / task.name, refs, lambda ref, i: thick_slices(ref, THIN_FACTOR, axis=2), baselines,
                _models(THIN_MODELS), seed, "thick")
    return task


def evaluate_task(out: Path, task: Task, refs_dir: Path) -> dict:
    pairing = pair_folders(refs_dir, list(task.methods.items()))
    opts = EvalOptions(convention_from(data_range=1.0), axis=task.axis, slices_per_case=1)
    status, summary = evaluate(pairing, opts,
                               out / task.name / "report", command=f"medldm demo ({task.name})", quiet=True)
    if status:
        raise RuntimeError(f"demo evaluation of {task.name} failed: see {out / task.name / 'report' / 'run_report.json'}")
    return summary



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
    models = _models((SYNTH_MODEL,))
    if not models:
        return None
    t0 = time.perf_counter()
    syn = open_model(models[SYNTH_MODEL], "synthesize").runner
    tiles, labels, images = [], [], []
    for i in range(n):
        label = i % syn.num_classes if syn.num_classes else None
        img, _ = syn.generate(seed=seed + i, label=label)
        _save(img, out / "synth" / f"sample_{i:02d}.nii.gz")
        tiles.append(_tile(img[:, :, 0]))
        labels.append(None if label is None else class_name(syn, label))
        images.append(np.asarray(img[:, :, 0], np.float32))
    path = _save_strip(tiles, out / "synth" / "samples.png")
    print("demo: synthesis realism (radiomics)", flush=True)
    return {"model": SYNTH_MODEL, "file": path.relative_to(out).as_posix(), "n": n, "seed": seed,
            "steps": syn.dcfg.sampling_steps, "classes": int(syn.num_classes), "labels": labels,
            "size": list(syn.size), "seconds": time.perf_counter() - t0,
            "realism": realism(images, int(syn.size[0]), seed)}


def realism(synthetic: list[np.ndarray], size: int, seed: int) -> dict:
    """The audit's radiomics breakdown (``medldm.eval.audit_frd.radiomics_frd``: FRD, the real-vs-real reference
    by subject, the features that separate samples from real) of the demo's samples against the slices of two
    held-out brain scans no synthesis model trained on (:data:`REALISM_REAL`), each image on the samples' grid
    and scaled to [0, 1] by its own 0.5-99.5th percentiles. A handful of images: an illustration of what
    ``medldm audit`` reports, not a measurement (docs/models.md has the audit's figures)."""
    why = frd_missing()
    if why:
        return {"skipped": why}
    real, subjects = [], []
    for name in REALISM_REAL:
        path = resolve_path(PIESNO_PATH) if name == PIESNO else sample_path(name)
        vol = np.asarray(load_scan(path), np.float32)
        for k in range(vol.shape[2]):
            sl = vol[:, :, k]
            if float((sl > 0.1 * sl.max()).mean()) < 0.05:  # (nearly) empty slices tell nothing
                continue
            real.append(unit_range(to_grid(sl, size)))
            subjects.append(name)
    return radiomics_frd(real, subjects, [unit_range(to_grid(s, size)) for s in synthetic], seed=seed)



def mask_from_slice(syn, scan: Path, name: str):
    """The tissue label map medldm derives from the middle slice (along Z) of ``scan`` for the mask-conditioned
    synthesizer ``syn``, the way training derives its conditions: the scan normalized as training data
    (``medldm.data.datasets.LoadNormalize``), its slices fitted to the model's training size like training items
    (``make_items``: padded to a square and resized to ``resize_to``), then ``medldm.data.tissue.tissue_labels``
    (background + intensity clusters, darkest first).

    Returns (labels int64 (X, Y), the real slice (X, Y) in the model range, the 4x4 RAS affine of that grid, the
    slice index)."""
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
            "held_out": scan[0] in DEMO_SAMPLES,
            "command": f"medldm synthesize -m {model} --mask {rel} -n {n} --seed {seed} -o DIR"}


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
                          (lambda: run_denoise(out, refs, seed, "rician"), out / "ref"),
                          (lambda: run_sr(out, refs, seed), out / "ref"),
                          (lambda: run_thinslice(out, thin_refs, seed, quick=quick), out / "thin" / "ref")):
        task = run()
        print(f"demo: {task.name}: evaluating", flush=True)
        tasks.append((task, evaluate_task(out, task, refs_dir)))
    print("demo: synthesis samples", flush=True)
    synth = run_synthesis(out, n=4 if quick else 8, seed=seed)
    first = next(iter(scans.items())) if scans else None
    mask = run_mask_synthesis(out, seed=seed, model=mask_model, scan=first)
    return write_index(out, tasks, refs, time.perf_counter() - t0, synth, mask)
