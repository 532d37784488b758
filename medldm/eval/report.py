"""report.html: summary and per-case tables (methods side by side) and the PNG panels.

Self-contained except for the PNGs in ``panels/`` (inline CSS, no scripts, no remote assets);
written atomically. Every table caption states the intensity convention (data_range or window).
"""

from __future__ import annotations

import datetime as _dt
import math
from html import escape
from pathlib import Path

from medldm.eval.evaluate import METRIC_LABELS, METRICS
from medldm.eval.style import PAGE_END, page_head
from medldm.io.atomic import atomic_file


def _num(v: float | None, metric: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.2f}" if metric == "psnr" else f"{v:.4f}"


def _stat_cells(s: dict, metric: str) -> tuple[str, str, str, str]:
    return (_num(s["mean"], metric), _num(s["std"], metric),
            f"[{_num(s['ci_low'], metric)}, {_num(s['ci_high'], metric)}]", str(s["n"]))


def _caption(title: str, conv_text: str, extra: str = "") -> str:
    return (f"<caption><b>{escape(title)}</b> — convention: <span class='conv'>{escape(conv_text)}</span>"
            f"{'. ' + escape(extra) if extra else ''}</caption>")


def _summary_table(summary: dict, methods: list[str], level: str, title: str) -> str:
    conv = summary["convention"]["text"]
    head = "".join(f"<th>{escape(METRIC_LABELS[k])}</th>" for k in METRICS)
    body = []
    for m in methods:
        cells = []
        for k in METRICS:
            s = summary["methods"][m][k][level]
            mean, std, ci, n = _stat_cells(s, k)
            left = (f", <span class='fail'>{s['n_missing']} left out (NaN, see below)</span>"
                    if s.get("n_missing") else "")
            if s["n"] == 0:
                cells.append(f"<td>–<br><small>not computed{left or ' (see notes)'}</small></td>")
                continue
            cells.append(f"<td>{mean} ± {std}<br><small>95% CI {ci}, n={n}{left}</small></td>")
        body.append(f"<tr><td>{escape(m)}</td>{''.join(cells)}</tr>")
    cap = _caption(title, conv, f"mean ± std over cases; {summary['ci']['definition']}")
    return f"<table>{cap}<thead><tr><th>method</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _paired_table(summary: dict) -> str:
    p = summary["paired"]
    if not p["differences"]:
        return ""
    head = "".join(f"<th>Δ {escape(METRIC_LABELS[k])}</th>" for k in METRICS)
    body = []
    for m, by_metric in p["differences"].items():
        cells = []
        for k in METRICS:
            mean, _, ci, n = _stat_cells(by_metric[k]["volume"], k)
            cells.append(f"<td>{mean}<br><small>95% CI {ci}, n={n}</small></td>")
        body.append(f"<tr><td>{escape(m)} − {escape(p['baseline_method'])}</td>{''.join(cells)}</tr>")
    cap = _caption("Paired differences per case, 3D metrics", summary["convention"]["text"],
                   f"mean of (method − {p['baseline_method']}) over the cases both have; {summary['ci']['definition']}")
    return f"<table>{cap}<thead><tr><th>comparison</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _metric_table(metric: str, level: str, values: dict, summary: dict, methods: list[str]) -> str:
    conv = summary["convention"]["text"]
    cases = sorted({c for m in methods for c in values[m][metric][level]})
    head = "".join(f"<th>{escape(m)}</th>" for m in methods)
    body = []
    for c in cases:
        vals = [values[m][metric][level].get(c, math.nan) for m in methods]
        finite = [v for v in vals if not math.isnan(v)]
        best = max(finite) if len(methods) > 1 and finite else None
        cells = "".join(f"<td class='{'best' if best is not None and v == best else ''}'>{_num(v, metric)}</td>"
                        for v in vals)
        body.append(f"<tr><td>{escape(c)}</td>{cells}</tr>")
    foot = []
    for label, idx in (("mean", 0), ("std", 1), ("95% CI", 2), ("n", 3)):
        cells = "".join(f"<td>{_stat_cells(summary['methods'][m][metric][level], metric)[idx]}</td>" for m in methods)
        foot.append(f"<tr><td>{label}</td>{cells}</tr>")
    what = ("3D over the whole volume" if level == "volume"
            else f"2D per slice along axis {summary['axis']}, averaged within each case")
    cap = _caption(f"{METRIC_LABELS[metric]} per case — {what}", conv,
                   "best method per case in bold" if len(methods) > 1 else "")
    return (f"<table>{cap}<thead><tr><th>case</th>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"<tfoot>{''.join(foot)}</tfoot></table>")


def _exclusions(summary: dict) -> str:
    """What the means leave out (NaN values) and why; says so explicitly when nothing is left out."""
    lines = summary.get("exclusions")
    if lines is None:
        return ""
    if not lines:
        return "<p>Left out of the means: nothing (every case and slice has a value for every metric).</p>"
    items = "".join(f"<li class='fail'>{escape(x)}</li>" for x in lines)
    return ("<h3 class='fail'>Left out of the means</h3><p>These values are NaN and are not in the means, "
            "standard deviations or intervals above (counts per method and metric: <code>summary.json</code> "
            f"→ <code>excluded</code>):</p><ul>{items}</ul>")


def _panel_figure(p: dict) -> str:
    labels = " | ".join(t["label"] for t in p["tiles"])
    lo, hi = p["window"]
    clip = (f"; differences of the images clipped to the metric window [{p['diff_clip'][0]:g}, {p['diff_clip'][1]:g}]"
            if p.get("diff_clip") else "")
    cap = (f"{escape(p['case'])} — slice {p['slice']} of {p['n_slices']} along axis {p['axis']}; tiles: "
           f"{escape(labels)}. Grey tiles: display window [{lo:.4g}, {hi:.4g}] ({escape(p['window_source'])}), "
           f"same for all. |difference|: <span class='bar'></span> 0 (black) → {p['dmax']:g} (white), "
           f"hot colormap, same scale for every method and slice of this case{escape(clip)}. "
           f"Radiological view: image left = {p['orientation']['left']}, top = {p['orientation']['top']}; "
           f"pixels {p['spacing_mm'][0]:.3g} × {p['spacing_mm'][1]:.3g} mm resampled to square.")
    return (f"<figure><img src='{escape(p['file'])}' alt='{escape(p['case'])} slice {p['slice']}'>"
            f"<figcaption>{cap}</figcaption></figure>")


def build_html(*, summary: dict, values: dict, methods: list[str], panels: list[dict], command: str = "") -> str:
    """The report page as a string (see module docstring)."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cases = summary["cases"]
    parts = [
        page_head("medldm evaluation report"),
        "<h1>medldm evaluation report</h1>",
        "<ul>",
        f"<li>Intensity convention: <span class='conv'>{escape(summary['convention']['text'])}</span></li>",
        f"<li>Methods: {escape(', '.join(methods))}</li>",
        f"<li>Cases: {cases['paired']} paired, {cases['evaluated']} fully evaluated, {len(cases['failed'])} failed</li>",
        f"<li>Per-slice metrics along array axis {summary['axis']}; unit of the statistics: {escape(summary['unit'])}</li>",
        f"<li>Confidence intervals: {escape(summary['ci']['definition'])}</li>",
        f"<li>Generated {now}" + (f" by <code>{escape(command)}</code>" if command else "") + "</li>",
        "</ul>",
        "<h2>Summary</h2>",
        _summary_table(summary, methods, "volume", "Summary over cases — 3D metrics"),
        _summary_table(summary, methods, "slice_mean", "Summary over cases — per-slice 2D metrics (case means)"),
        _paired_table(summary),
        _exclusions(summary),
        "<h2>Per case</h2>",
    ]
    for k in METRICS:
        parts.append(_metric_table(k, "volume", values, summary, methods))
    for k in METRICS:
        parts.append(_metric_table(k, "slice_mean", values, summary, methods))
    if panels:
        parts.append("<h2>Image panels</h2>")
        parts += [_panel_figure(p) for p in panels]
    if cases["failed"]:
        parts.append("<h2 class='fail'>Failed cases</h2><ul>")
        parts += [f"<li class='fail'>{escape(line)}</li>" for line in cases["failed"]]
        parts.append("</ul>")
    if summary.get("notes"):
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{escape(n)}</li>" for n in summary["notes"]]
        parts.append("</ul>")
    parts.append("<p><small>Per-case and per-slice values: <code>metrics.csv</code>; statistics: "
                 "<code>summary.json</code>; definitions: docs/evaluation.md.</small></p>" + PAGE_END)
    return "\n".join(p for p in parts if p)


def write_html(path: str | Path, **kwargs) -> Path:
    """Write :func:`build_html` atomically to ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(build_html(**kwargs), encoding="utf-8")
    return path
