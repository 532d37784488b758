"""The demo's HTML page (``OUT/report.html``): one table per task (PSNR / SSIM per scan, mean, time), the
panels of each task's evaluation report, the synthesis samples and the mask -> image example."""

from __future__ import annotations

import csv
import json
from html import escape
from pathlib import Path

import numpy as np

from medldm.eval.audit_report import frd_html
from medldm.eval.panels import save_png, to_gray
from medldm.eval.style import PAGE_END, page_head
from medldm.io.atomic import atomic_file
from medldm.samples import SAMPLES


def _volume_rows(out: Path, task) -> dict[str, dict[str, dict[str, float]]]:
    """method -> case -> {"psnr", "ssim"}: mean over the case's slices of the 2D metrics
    (from the task report's metrics.csv)."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    with open(out / task.name / "report" / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["level"] == "slice":
                per = acc.setdefault(r["method"], {}).setdefault(r["case"], {"psnr": [], "ssim": []})
                for k in per:
                    per[k].append(float(r[k]))
    return {m: {c: {k: float(np.mean(v)) for k, v in per.items()} for c, per in cases.items()}
            for m, cases in acc.items()}


def _table(out: Path, task, summary: dict) -> str:
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
    plane = np.asarray(plane, dtype=np.float64)
    if lo is None or hi is None:
        lo, hi = (float(v) for v in np.percentile(plane, [0.5, 99.5]))
    return np.rot90(to_gray(plane, lo, hi if hi > lo else lo + 1))


def _save_strip(tiles: list[np.ndarray], path: Path) -> Path:
    """Tiles of one height side by side (4-pixel gaps), enlarged by an integer factor to >= 128 rows, as PNG."""
    from PIL import Image  # only when a strip is drawn

    gap = np.zeros((tiles[0].shape[0], 4), dtype=tiles[0].dtype)
    row = np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1)
    scale = max(1, 128 // tiles[0].shape[0])
    return save_png(Image.fromarray(np.kron(row, np.ones((scale, scale), dtype=row.dtype))), path)


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
            "</figcaption></figure>" + _realism_html(synth.get("realism")))


def _realism_html(fd: dict | None) -> str:
    """The samples' radiomics breakdown (``medldm.demo.realism``), or the line saying why it was skipped."""
    if not fd:
        return ""
    if fd.get("skipped"):
        return f"<p>Realism breakdown skipped: {escape(fd['skipped'])}</p>"
    note = ("<p>Against the slices of two held-out brain scans (mr-brain-s0, dipy-piesno; no synthesis model trained "
            "on them), as <code>medldm audit</code> reports it for a full study. With this handful of images the FRD "
            "is an illustration, not a measurement; docs/models.md has the audit's figures and their commands.</p>")
    return note + "".join(frd_html(fd))


def _mask_html(mask: dict) -> str:
    src = escape(mask["scan"]) + (f" ({escape(SAMPLES[mask['scan']].description)})" if mask["scan"] in SAMPLES else "")
    last = mask["seed"] + mask["n"] - 1
    return (f"<h2>Mask -&gt; image: {mask['n']} images of {escape(mask['model'])} from one label map</h2>"
            f"<figure><img src='{escape(mask['file'])}' alt='tissue label map, synthetic images, real slice'>"
            f"<figcaption>Left to right: the tissue label map medldm derives from slice {mask['slice']} of the "
            f"{'held-out ' if mask.get('held_out') else ''}{src} (normalized as training data, padded to a square and resized to {mask['size'][0]} x "
            f"{mask['size'][1]}, then background + {mask['classes'] - 1} intensity clusters, darkest first: "
            f"medldm.data.tissue; shown as gray levels 0..{mask['classes'] - 1}) | {mask['n']} images generated "
            f"from it (seeds {mask['seed']}..{last}, {mask['steps']} {escape(mask['sampler'])} steps, "
            f"{mask['seconds']:.1f} s in all) | the real slice the map came from (each image between its own "
            "0.5-99.5th percentiles). The classes are intensity clusters, not anatomy: on a b0 or T2-weighted scan "
            "the brightest class is CSF, on T1 it is white matter. "
            f"Run in this folder, <code>{escape(mask['command'])}</code> makes the same images as the files "
            f"<code>mask/synth_*.nii.gz</code> beside the label map.</figcaption></figure>")


def write_index(out: Path, tasks: list[tuple], refs: dict[str, Path], wall: float,
                synth: dict | None = None, mask: dict | None = None) -> Path:
    parts = [page_head("medldm demo"),
             f"<h1>medldm demo</h1><p>This report: <code>{escape(str((out / 'report.html').resolve()))}</code>. "
             f"Run time {wall:.0f} s.</p>",
             "<p>Held-out real MR scans (never used to train shipped models), each scaled to [0, 1] by its own "
             "0.5–99.5th intensity percentiles:</p><ul>"]
    parts += [f"<li>{escape(n)}: {escape(SAMPLES[n].description)} (package {escape(SAMPLES[n].pip)})</li>"
              if n in SAMPLES else f"<li>{escape(n)}</li>" for n in refs]
    parts.append("</ul>")
    shipped = list(dict.fromkeys(m for task, _ in tasks for m in task.methods if m.startswith("mr-")))  # each once
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
