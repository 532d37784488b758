"""Dataset integrity (``medldm plan DATA --check``): the fingerprint (:mod:`medldm.plan.fingerprint`) as a list
of problems that would hurt training, written as JSON + a self-contained HTML page.

Each problem has a ``severity``: ``block`` (training cannot work as intended: no readable scan, an empty or
constant volume, the same scan or subject in train and validation) or ``warn`` (mixed orientations / spacings
beyond a tolerance, scans smaller than the patch, non-image DICOM objects, unreadable files, non-finite voxels,
the readers' integrity warnings, duplicates inside the training set). :func:`check` returns the report;
``blocking`` tells the command to exit 1.
"""

from __future__ import annotations

import json
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

from medldm.eval.style import PAGE_END, page_head
from medldm.io.atomic import atomic_file

SPACING_TOL = 0.25  # relative spread of a spacing axis (max / min - 1) beyond which spacings are "mixed"


def _p(severity: str, kind: str, message: str, scans: list[str] | None = None) -> dict[str, Any]:
    return {"severity": severity, "kind": kind, "message": message, "scans": scans or []}


def check(fp: dict, *, patch: list[int] | None = None, slice_axis: int = 2, val_fp: dict | None = None) -> dict:
    """Problems of fingerprint ``fp`` (and of the train/validation pair when ``val_fp`` is given)."""
    scans = fp["scans"]
    probs: list[dict] = []
    if not scans:
        probs.append(_p("block", "no scans", "no readable scan: nothing to train on"))
    const = [s["id"] for s in scans if s["constant"]]
    if const:
        probs.append(_p("block", "empty/constant volume", f"{len(const)} scan(s) hold one value only (or no finite "
                        "voxel): they teach nothing and break percentile normalization — remove them", const))
    if val_fp is not None:
        tr = {s["pixel_hash"]: s["id"] for s in scans}
        same = [f"{tr[s['pixel_hash']]} = val {s['id']}" for s in val_fp["scans"] if s["pixel_hash"] in tr]
        if same:
            probs.append(_p("block", "same scan in train and validation",
                            f"{len(same)} validation scan(s) have the same pixels as a training scan: validation "
                            "metrics would be memorization", same))
        subj = {s["subject"] for s in scans}
        shared = sorted({s["subject"] for s in val_fp["scans"] if s["subject"] in subj and
                         not s["subject"].startswith(("folder:", "file:"))})
        if shared:
            probs.append(_p("block", "same subject in train and validation",
                            f"{len(shared)} subject(s) have scans on both sides: validate on OTHER subjects", shared))
    orient = Counter(s["orientation"] for s in scans if min(s["shape"]) > 1)
    if len(orient) > 1:
        probs.append(_p("warn", "mixed orientations", f"orientations {dict(orient)}: 2D slices along one array axis "
                        "are then different planes in different scans (reorient to one convention, or accept it)"))
    vols = [s for s in scans if min(s["shape"]) > 1]
    for ax in range(3):
        vals = [s["spacing"][ax] for s in vols]
        if vals and max(vals) / max(min(vals), 1e-9) - 1 > SPACING_TOL:
            probs.append(_p("warn", "mixed spacings", f"axis {ax}: spacing {min(vals):.3g}-{max(vals):.3g} mm "
                            f"(beyond {int(SPACING_TOL * 100)} %): one model sees several pixel scales"))
    if patch:
        nd = len(patch)
        small = []
        for s in scans:
            dims = s["shape"] if nd == 3 else [n for i, n in enumerate(s["shape"]) if i != slice_axis]
            if any(n < p for n, p in zip(dims, patch, strict=False)):
                small.append(f"{s['id']} {'x'.join(map(str, dims))}")
        if small:
            probs.append(_p("warn", "scans smaller than the patch", f"{len(small)} scan(s) smaller than the patch "
                            f"{'x'.join(map(str, patch))}: padded with background", small))
    if fp.get("non_image"):
        probs.append(_p("warn", "non-image DICOM objects", f"{len(fp['non_image'])} non-image object(s) (reports, "
                        "presentation states, DICOMDIR ...) are skipped", fp["non_image"]))
    unread = [ln for ln in fp.get("skipped", []) if "skipped: not a NIfTI or DICOM" not in ln]
    if unread:
        probs.append(_p("warn", "unreadable files", f"{len(unread)} file(s) or series cannot be read and are "
                        "left out", unread))
    nonfin = [s["id"] for s in scans if s["nonfinite_voxels"]]
    if nonfin:
        probs.append(_p("warn", "non-finite voxels", "NaN/infinite voxels: left out of statistics", nonfin))
    warned = [f"{s['id']}: {w}" for s in scans for w in s["warnings"]]
    if warned:
        probs.append(_p("warn", "reader warnings", f"{len(warned)} warning(s) from the readers (gaps, splits, "
                        "geometry)", warned))
    dups = fp["summary"].get("duplicates", []) if scans else []
    if dups:
        probs.append(_p("warn", "duplicates", f"{len(dups)} group(s) of scans with the same pixels: a model sees "
                        "them twice; `medldm plan` keeps one copy", [" = ".join(g) for g in dups]))
    blocking = any(p["severity"] == "block" for p in probs)
    return {"blocking": blocking, "problems": probs, "summary": fp.get("summary", {}),
            "n_scans": len(scans), "n_val_scans": len(val_fp["scans"]) if val_fp else 0, "roots": fp.get("roots", []),
            "val_roots": val_fp.get("roots", []) if val_fp else []}


def write_report(report: dict, fp: dict, base: str | Path) -> tuple[Path, Path]:
    """``BASE.json`` (the report + the fingerprint) and ``BASE.html``; returns both paths."""
    base = Path(base)
    if base.suffix in (".html", ".json"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    jpath, hpath = base.with_name(base.name + ".json"), base.with_name(base.name + ".html")
    with atomic_file(jpath) as tmp:
        tmp.write_text(json.dumps({**report, "fingerprint": fp}, indent=1, default=str))
    with atomic_file(hpath) as tmp:
        tmp.write_text(html(report, fp))
    return jpath, hpath


def html(report: dict, fp: dict) -> str:
    verdict = ("<p class='fail'>Something blocks training (exit 1).</p>" if report["blocking"]
               else "<p class='ok'>Nothing blocks training.</p>")
    parts = [page_head("medldm dataset check"), "<h1>Dataset check</h1>",
             f"<p>{escape(', '.join(report['roots']))}: {report['n_scans']} readable scans"
             + (f"; validation {escape(', '.join(report['val_roots']))}: {report['n_val_scans']}" if report["val_roots"]
                else "") + "</p>", verdict,
             "<table><caption>Problems</caption><thead><tr><th>severity</th><th>problem</th><th>what</th>"
             "<th>scans</th></tr></thead><tbody>"]
    for p in report["problems"]:
        cls = "fail" if p["severity"] == "block" else "flag"
        items = "<br>".join(escape(str(x)) for x in p["scans"][:20]) + ("<br>..." if len(p["scans"]) > 20 else "")
        parts.append(f"<tr><td class='{cls}'>{p['severity']}</td><td>{escape(p['kind'])}</td>"
                     f"<td>{escape(p['message'])}</td><td>{items}</td></tr>")
    if not report["problems"]:
        parts.append("<tr><td class='ok'>ok</td><td>none</td><td></td><td></td></tr>")
    parts.append("</tbody></table>")
    parts.append("<table><caption>Scans (fingerprint)</caption><thead><tr><th>scan</th><th>modality</th><th>shape</th>"
                 "<th>spacing (mm)</th><th>orientation</th><th>1-99 %</th><th>noise (% range)</th><th>subject</th>"
                 "</tr></thead><tbody>")
    for s in fp["scans"]:
        pc = s["percentiles"]
        rng = f"{pc['1.0']:.4g} .. {pc['99.0']:.4g}" if pc else "-"
        parts.append(f"<tr><td>{escape(s['id'])}</td><td>{escape(s['modality'])}</td>"
                     f"<td>{'x'.join(map(str, s['shape']))}</td><td>{' x '.join(f'{v:.3g}' for v in s['spacing'])}</td>"
                     f"<td>{escape(s['orientation'])}</td><td>{rng}</td><td>{100 * s['noise_relative']:.2f}</td>"
                     f"<td>{escape(s['subject'])}</td></tr>")
    parts += ["</tbody></table>", PAGE_END]
    return "".join(parts)
