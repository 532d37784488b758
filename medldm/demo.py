"""``medldm demo``: the main job on real held-out scans, offline, on a CPU.

Takes real MR scans shipped by registry packages (``medldm.samples``), scales each to [0, 1] by its own
0.5-99.5th percentiles (recorded), degrades it (Gaussian noise at 5 % of the range; anti-aliased x2
in-plane down-sampling), runs the enhancement methods (the shipped models of :mod:`medldm.shipped` through
``medldm.pipelines.enhance``, and the classical baselines), evaluates them all with ``medldm.eval``
(data_range R = 1), draws samples from the shipped synthesis model, and writes one HTML page with the tables
and image panels: ``OUT/report.html``.
"""

from __future__ import annotations

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
SR_BASELINES = ("nearest", "linear", "bicubic", "bspline")
DENOISE_MODELS = ("mr-denoise-2d",)  # shipped models (medldm.shipped), run when installed
SR_MODELS = ("mr-sr2x-2d",)
SYNTH_MODEL = "mr-synth-2d"


@dataclass
class Task:
    name: str  # "denoise" | "sr"
    title: str
    degraded: str  # method name of the degraded input, first column of the tables
    methods: dict[str, Path] = field(default_factory=dict)  # method -> prediction folder
    timings: dict[str, float] = field(default_factory=dict)


def _center_crop(img, size: int, max_slices: int):
    """Crop (X, Y, Z) to at most size x size x max_slices around the centre, affine updated."""
    import torch

    x, y, z = img.shape
    sx, sy, sz = min(size, x), min(size, y), min(max_slices, z)
    ox, oy, oz = (x - sx) // 2, (y - sy) // 2, (z - sz) // 2
    out = img[ox:ox + sx, oy:oy + sy, oz:oz + sz].clone()
    aff = np.asarray(img.affine, dtype=np.float64).copy()
    aff[:3, 3] = aff[:3, :3] @ np.array([ox, oy, oz], float) + aff[:3, 3]
    out.affine = torch.as_tensor(aff)
    return out


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


def _save(img, path: Path) -> None:
    from medldm.io.nifti import save_nifti

    save_nifti(img, path, dtype="float32")


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
    for i, (name, path) in enumerate(refs.items()):
        ref = load_scan(path)
        noisy = gaussian_noise(ref, NOISE_SIGMA, seed + i)
        _save(noisy, root / "noisy" / f"{name}.nii.gz")
        for method in DENOISE_BASELINES:
            t0 = time.perf_counter()
            den, _ = denoise_scan(noisy, method)
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(den, root / method / f"{name}.nii.gz")
        for method, folder in models.items():
            t0 = time.perf_counter()
            den = _enhance(folder, noisy, seed)
            task.timings[method] = task.timings.get(method, 0.0) + time.perf_counter() - t0
            _save(den, root / method / f"{name}.nii.gz")
    task.methods = {"noisy": root / "noisy", **{m: root / m for m in (*DENOISE_BASELINES, *models)}}
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


def evaluate_task(out: Path, task: Task, refs_dir: Path) -> dict:
    from medldm.eval.evaluate import convention_from
    from medldm.eval.pairing import pair_folders
    from medldm.eval.run import EvalOptions, evaluate

    pairing = pair_folders(refs_dir, list(task.methods.items()))
    status, summary = evaluate(pairing, EvalOptions(convention_from(data_range=1.0), slices_per_case=1),
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
            f"slices) and their mean; "
            f"{conv}</caption><tr><th>method</th>{head}<th>mean</th><th>time (s)</th></tr>"
            + "".join(rows) + "</table>")


def run_synthesis(out: Path, n: int, seed: int) -> dict | None:
    """``n`` samples of the shipped synthesis model as one PNG panel (OUT/synth/samples.png) plus the NIfTI
    files; None when the model is not installed."""
    from medldm.eval.panels import save_png, to_gray
    from medldm.models import load_model
    from medldm.pipelines.synthesize import Synthesizer

    models = _models((SYNTH_MODEL,))
    if not models:
        return None
    t0 = time.perf_counter()
    syn = Synthesizer(load_model(models[SYNTH_MODEL]))
    tiles = []
    for i in range(n):
        # class-conditional models (mr-synth-2d: slice position bins) cycle through their classes
        img, _ = syn.generate(seed=seed + i, label=i % syn.num_classes if syn.num_classes else None)
        _save(img, out / "synth" / f"sample_{i:02d}.nii.gz")
        plane = np.asarray(img[:, :, 0], dtype=np.float64)
        lo, hi = np.percentile(plane, [0.5, 99.5])
        tiles.append(np.rot90(to_gray(plane, lo, hi if hi > lo else lo + 1)))  # array (X, Y) -> rows = Y
    gap = np.zeros((tiles[0].shape[0], 4), dtype=tiles[0].dtype)
    row = np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1)
    scale = max(1, 128 // tiles[0].shape[0])
    panel = np.kron(row, np.ones((scale, scale), dtype=row.dtype))
    from PIL import Image

    path = save_png(Image.fromarray(panel), out / "synth" / "samples.png")
    return {"model": SYNTH_MODEL, "file": path.relative_to(out).as_posix(), "n": n, "steps": syn.dcfg.sampling_steps,
            "classes": int(syn.num_classes),
            "size": list(syn.size), "seconds": time.perf_counter() - t0}


def write_index(out: Path, tasks: list[tuple[Task, dict]], refs: dict[str, Path], wall: float,
                synth: dict | None = None) -> Path:
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
        parts.append(_table(out, task, summary))
        parts.append(f"<p>Full report with per-case and per-slice tables: "
                     f"<a href='{task.name}/report/report.html'>{task.name}/report/report.html</a></p>")
        panels = json.loads((out / task.name / "report" / "panels.json").read_text())["panels"]
        for p in panels:
            parts.append(f"<figure><img src='{task.name}/report/{escape(p['file'])}' alt='{escape(p['case'])}'>"
                         f"<figcaption>{escape(p['case'])}, slice {p['slice']}: reference | "
                         f"{escape(' | '.join(task.methods))} | |difference| (0–{p['dmax']:g})</figcaption></figure>")
    if synth is not None:
        parts.append(f"<h2>Synthesis: {synth['n']} samples of {escape(synth['model'])}</h2>"
                     f"<figure><img src='{escape(synth['file'])}' alt='synthetic MR slices'><figcaption>"
                     + (f"Samples of slice-position classes 0..{synth['classes'] - 1} in turn (sample i: class i mod "
                        f"{synth['classes']}), " if synth.get("classes") else "Unconditional samples, ")
                     + f"{synth['size'][0]} x {synth['size'][1]}, seeds 0..{synth['n'] - 1}, "
                     f"{synth['steps']} sampler steps, {synth['seconds']:.1f} s; each shown between its own "
                     "0.5-99.5th percentiles. Files: <code>synth/sample_*.nii.gz</code>.</figcaption></figure>")
    parts.append(PAGE_END)
    path = out / "report.html"
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path


def run_demo(out: str | Path = "demo_out", *, quick: bool = False, seed: int = 0,
             scans: dict[str, Path] | None = None) -> Path:
    """Run the whole demo; returns the path of OUT/report.html. ``scans`` (name -> path) replaces the held-out
    demo samples (``python tools/shipped_models.py validate`` runs the same protocol on the models' validation
    scans)."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refs = prepare_references(out, quick=quick, scans=scans)
    tasks = []
    for run in (lambda: run_denoise(out, refs, seed), lambda: run_sr(out, refs, seed)):
        task = run()
        tasks.append((task, evaluate_task(out, task, out / "ref")))
    synth = run_synthesis(out, n=4 if quick else 8, seed=seed)
    return write_index(out, tasks, refs, time.perf_counter() - t0, synth)
