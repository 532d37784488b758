"""Audit report files: pair panels (PNG), audit.html, audit.csv and audit.json, each written atomically.

A pair panel is one PNG: a label strip on top, then three tiles left to right — the synthetic sample,
its nearest training image (both after the matched flip / shift, on the comparison grid, grey window
[0, 1] of the normalized intensities) and ``|difference|`` in the "hot" colormap from 0 to
``DIFF_MAX`` — for 3D the central slice along the third (S) axis, shown radiologically
(:func:`medldm.eval.panels.display_plane`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from html import escape
from pathlib import Path

import numpy as np

from medldm.eval.panels import compose_strip, display_plane, save_png, tile_size, to_gray, to_hot
from medldm.eval.style import PAGE_END, page_head
from medldm.io.atomic import atomic_file

DIFF_MAX = 0.25  # |difference| shown white at a quarter of the normalized range
CSV_COLUMNS = ["role", "id", "source", "nn_ssim", "nn_ssim_train", "nn_ncc", "nn_ncc_train", "shift", "flipped",
               "holdout_p_ssim", "holdout_p_ncc", "flag_ssim", "flag_ncc", "flagged"]


def _plane(img: np.ndarray, normal: int) -> np.ndarray:
    """Display plane (rows, cols) of a comparison-grid image: 2D re-expanded along ``normal``,
    3D cut through the middle of the S axis."""
    vol = np.expand_dims(img, normal) if img.ndim == 2 else img
    axis = normal if img.ndim == 2 else 2
    index = 0 if img.ndim == 2 else vol.shape[2] // 2
    return display_plane(vol, np.eye(4), axis, index)[0]


def render_pair(syn: np.ndarray, train: np.ndarray, *, syn_normal: int, train_normal: int,
                labels: tuple[str, str], tile: int = 256):
    """Compose synthetic | nearest training | |difference| -> (PIL.Image RGB, tiles)."""
    from PIL import Image

    a, b = _plane(syn, syn_normal), _plane(train, train_normal)
    diff = np.abs(a.astype(np.float64) - b) if a.shape == b.shape else np.abs(a - _plane(train, syn_normal))
    size = tile_size(a.shape, (1.0, 1.0), tile)
    items = [(labels[0], "synthetic", Image.fromarray(to_gray(a, 0.0, 1.0)).convert("RGB")),
             (labels[1], "training", Image.fromarray(to_gray(b, 0.0, 1.0)).convert("RGB")),
             ("|difference|", "difference", Image.fromarray(to_hot(diff, DIFF_MAX)))]
    return compose_strip(items, size)


def write_pair_png(path: Path, syn: np.ndarray, train: np.ndarray, **kwargs) -> list[dict]:
    image, tiles = render_pair(syn, train, **kwargs)
    save_png(image, path)
    return tiles


# ------------------------------------------------------------------ tables

def _f(v: object, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return escape(str(v))


def _table(caption: str, head: list[str], rows: list[list[object]], cls: list[str] | None = None) -> str:
    out = [f"<table><caption>{caption}</caption><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        c = f" class='{cls[i]}'" if cls and cls[i] else ""
        out.append(f"<tr{c}>" + "".join(f"<td>{_f(v)}</td>" for v in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _row(r: dict) -> list[object]:
    return [r["id"], r["nn_ssim"], r["nn_ssim_train"], r["nn_ncc"], r["nn_ncc_train"],
            "×".join(str(v) for v in r["shift"]), r["flipped"], r.get("holdout_p_ssim"), r["flagged"]]


_NN_HEAD = ["case", "NN SSIM", "nearest (SSIM)", "NN NCC", "nearest (NCC)", "shift", "flipped",
            "held-out p (SSIM)", "flagged"]


def _figure(p: dict) -> str:
    r = p["row"]
    why = [k.upper() for k in ("ssim", "ncc") if r.get(f"flag_{k}")]
    cap = ((f"<span class='flag'>flagged by {' and '.join(why)}</span> — " if why else "")
           + f"<b>{escape(r['id'])}</b> vs training <b>{escape(r['nn_ssim_train'])}</b>: SSIM {r['nn_ssim']:.4f}, "
           f"NCC at this alignment {p['ncc_at_pair']:.4f}; synthetic shifted by {tuple(r['shift'])} voxels"
           + (", flipped left-right" if r["flipped"] else "")
           + f" (comparison grid). |difference| <span class='bar'></span> 0 → {DIFF_MAX:g} of the normalized range.")
    return f"<figure><img src='{escape(p['png'])}' alt='{escape(r['id'])}'><figcaption>{cap}</figcaption></figure>"


def _fd(fd: dict) -> str:
    if not fd or fd.get("skipped"):
        return "skipped" + (f" ({fd['skipped']})" if fd.get("skipped") else "")
    return f"{fd['distance']:.3f} (reference {fd['real_halves_reference']:.3f})"


def _frd(fd: dict) -> str:
    if not fd or fd.get("skipped"):
        return "skipped" + (f" ({fd['skipped']})" if fd.get("skipped") else "")
    ref = fd.get("real_halves_reference")
    return f"{fd['frd']:.3f} (real halves by subject: {'n/a' if ref is None else f'{ref:.3f}'})"


def frd_html(fd: dict | None) -> list[str]:
    """The radiomics breakdown: which intensity, texture or shape features separate synthetic from real."""
    if not fd or fd.get("skipped"):
        return []
    ref = fd.get("real_halves_reference")
    g_rows = [[k, v["n"], v["median_abs_effect"], v["real_halves_median_abs_effect"]]
              for k, v in fd["groups"].items()]
    f_rows = [[f["name"], f["group"], f["effect"], f["real_halves_effect"]] for f in fd["features"]]
    cap = (f"Fréchet Radiomics Distance {fd['frd']:.3f} ({fd['definition']}; {fd['n_synthetic']} synthetic vs "
           f"{fd['n_real']} real images, {fd['n_features']} features); reference between two halves of the real "
           f"set split by subject: {'n/a' if ref is None else f'{ref:.3f}'}. Effect: Cohen's d, (synthetic mean - "
           "real mean) / pooled SD per feature; the real-halves column is the same between the two real halves.")
    return ["<h2>Realism by radiomics: which features give the samples away?</h2>",
            _table(escape(cap), ["feature group / filter", "features", "median |effect|", "real halves"], g_rows),
            _table("Features that separate synthetic from real most", ["feature", "group", "effect",
                                                                       "real halves"], f_rows)]


def _ci_text(d: dict) -> str:
    if d["ci95"] is None:
        return f"{d['mean']:+.4f} (no interval)"
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"


def _utility_html(u: dict | None) -> list[str]:
    """The utility section (``medldm audit --utility``): did the synthetic pairs help a segmenter?"""
    if not u:
        return []
    label = {"synthetic_then_real": "synthetic, then fine-tuned on real", "synthetic_only": "synthetic only (TSTR)"}
    rows = [["real only", u["real"]["n_train_slices"], u["real"]["mean_dice"], ""]]
    for name in u.get("protocols", ["real_plus_synthetic", "synthetic_only"]):
        r = u[name]
        what = label.get(name) or (f"real + synthetic, {r['dose_reached']:g}x" if "dose_reached" in r
                                   else "real + synthetic")
        rows.append([what, r["n_train_slices"], r["mean_dice"], _ci_text(r.get("difference") or u["difference"])])
    d, st = u["difference"], u["settings"]
    cap = (f"Tissue segmentation ({u['classes'] - 1} classes + background, {st['network']}, "
           f"{st['steps']} steps each, {st.get('seeds', 1)} seed(s) from {st['seed']}) evaluated on "
           f"{u['n_holdout_slices']} held-out real slices of {u['n_holdout_subjects']} subject(s): mean Dice; "
           f"difference to 'real only' with a 95 % bootstrap interval over {d['resampled']}.")
    return ["<h2>Utility: did the synthetic pairs help?</h2>",
            _table(escape(cap), ["trained on", "training slices", "held-out mean Dice", "difference [95% CI]"], rows),
            f"<p><b>Verdict (1x dose): {escape(u['verdict'])}.</b> Limits: {escape(u['limits'])}.</p>"]


def build_html(audit: dict, panels: list[dict], command: str = "") -> str:
    """audit.html as a string (self-contained except the PNGs in ``pairs/``)."""
    mem, thr = audit["memorization"], audit["memorization"]["thresholds"]
    div, real = audit["diversity"], audit["realism"]
    flagged = [r for r in audit["synthetic"] if r["flagged"]]
    n_syn = len(audit["synthetic"])
    summary = [
        ["synthetic samples audited", n_syn], ["training images", audit["counts"]["train"]],
        ["held-out images", audit["counts"]["holdout"]],
        ["flagged as near-copies", f"{len(flagged)} ({(len(flagged) / n_syn if n_syn else 0):.1%})"],
        ["median NN SSIM — synthetic", mem["synthetic_median_ssim"]],
        ["median NN SSIM — held-out", mem["holdout_median_ssim"]],
        [f"mean pairwise {div['synthetic']['metric'].split(' (')[0]} — synthetic", div["synthetic"]["mean"]],
        [f"mean pairwise {div['train']['metric'].split(' (')[0]} — training", div["train"]["mean"]],
        ["realism: classifier accuracy (0.5 = indistinguishable)", real.get("accuracy")],
        ["realism: permutation p-value", real.get("p_permutation")],
        ["realism: feature Fréchet distance (real halves: reference)",
         _fd(real.get("feature_frechet") or {})],
        ["realism: Fréchet Radiomics Distance (real halves by subject: reference)",
         _frd(real.get("radiomics_frd") or {})],
        ["failed cases", len(audit["failed"])],
    ]
    if audit.get("utility"):
        u = audit["utility"]["difference"]
        summary.insert(-1, ["utility: Dice (real + synthetic) - (real), 95% CI",
                            f"{u['mean']:+.4f} [{u['ci95'][0]:+.4f}, {u['ci95'][1]:+.4f}]"])
    thr_rows = [["SSIM", thr["ssim"], thr["ssim_floor"], thr.get("holdout_ssim_quantile"), thr["source"]],
                ["NCC", thr["ncc"], thr["ncc_floor"], thr.get("holdout_ncc_quantile"), thr["source"]]]
    parts = [
        page_head("medldm synthetic-data audit"), "<h1>medldm synthetic-data audit</h1>",
        "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in audit["notes"])
        + (f"<li>Generated by <code>{escape(command)}</code></li>" if command else "") + "</ul>",
        "<h2>Summary</h2>", _table("All figures; definitions in docs/audit.md.", ["figure", "value"], summary),
        "<h2>Memorization thresholds</h2>",
        _table(escape(thr["rule"]), ["score", "threshold used", "absolute floor",
                                     f"held-out {thr['quantile']:g}th percentile", "source"], thr_rows),
        "<p>A flag means: this synthetic sample is closer to one training image than real held-out scans are "
        "to any training image (and above the floor) — inspect the pair. It does not prove a privacy breach, and "
        "no flag does not prove its absence: only whole-image similarity on the comparison grid is tested.</p>",
        f"<h2>Flagged pairs ({len(flagged)})</h2>",
    ]
    flagged_panels = [p for p in panels if p["row"]["flagged"]]
    parts += [_figure(p) for p in flagged_panels] or ["<p class='ok'>No synthetic sample was flagged.</p>"]
    if len(flagged_panels) < len(flagged):
        parts.append(f"<p>{len(flagged) - len(flagged_panels)} more flagged pairs are listed in the table "
                     "below and in audit.csv (panels limited by --max-panels).</p>")
    closest = [p for p in panels if not p["row"]["flagged"]]
    if closest:
        parts.append("<h2>Closest unflagged pairs (for context)</h2>")
        parts += [_figure(p) for p in closest]
    parts.append("<h2>Diversity</h2>")
    parts.append(_table("Mean pairwise similarity within each set on the comparison grid (lower = more diverse; "
                        "N copies of one image give 1).", ["set", "images", "pairs", "metric", "mean", "std", "median"],
                        [[k, v["n_images"], v["n_pairs"], v["metric"], v["mean"], v["std"], v["median"]]
                         for k, v in div.items()]))
    parts += frd_html(audit["realism"].get("radiomics_frd"))
    parts += _utility_html(audit.get("utility"))
    parts.append("<h2>Realism (classifier two-sample test)</h2>")
    if real.get("skipped"):
        parts.append(f"<p>Skipped: {escape(real['skipped'])}.</p>")
    else:
        parts.append(_table(escape(real["classifier"]) + f", {real['folds']}-fold cross-validation on "
                            f"{real['n_per_class']} real + {real['n_per_class']} synthetic images. Accuracy near 0.5 = "
                            "the classifier cannot tell them apart.",
                            ["accuracy", "95% CI (Wilson)", "p binomial", "p permutation", "permutations"],
                            [[real["accuracy"], f"{real['ci95'][0]:.3f}–{real['ci95'][1]:.3f}", real["p_binomial"],
                              real["p_permutation"], real["permutations"]]]))
    rows = sorted(audit["synthetic"], key=lambda r: -r["nn_ssim"])
    parts.append(_table("Synthetic samples: nearest training neighbour (sorted by SSIM)", _NN_HEAD,
                        [_row(r) for r in rows], ["flag" if r["flagged"] else "" for r in rows]))
    if audit["holdout"]:
        parts.append(_table("Held-out scans: nearest training neighbour (the reference distribution)",
                            _NN_HEAD[:-2], [_row(r)[:-2] for r in audit["holdout"]]))
    if audit["failed"]:
        parts.append("<h2 class='fail'>Failed cases</h2><ul>"
                     + "".join(f"<li class='fail'>{escape(x)}</li>" for x in audit["failed"]) + "</ul>")
    parts.append("<p><small>All values: <code>audit.json</code>; per-sample table: <code>audit.csv</code>; "
                 "definitions: docs/audit.md.</small></p>" + PAGE_END)
    return "\n".join(parts)


def write_text(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_outputs(out_dir: Path, audit: dict, panels: list[dict], command: str = "") -> list[Path]:
    """Write audit.json, audit.csv and audit.html (panels already written) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in audit["synthetic"] + audit["holdout"]:
        w.writerow({**r, "shift": " ".join(str(v) for v in r["shift"])})
    return [write_text(out_dir / "audit.json", json.dumps(audit, indent=2)),
            write_text(out_dir / "audit.csv", buf.getvalue()),
            write_text(out_dir / "audit.html", build_html(audit, panels, command))]
