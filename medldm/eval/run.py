"""Evaluate paired cases and write REPORT_DIR/{metrics.csv, summary.json, panels/*.png, panels.json,
report.html, run_report.json}. The Python entry point behind ``medldm evaluate``."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medldm.eval.evaluate import METRICS, Convention, check_grid, nan_mean, slice_metrics, volume_metrics
from medldm.eval.pairing import EvalCase, Pairing
from medldm.io.atomic import atomic_file
from medldm.io.errors import CaseError

CSV_COLUMNS = ["method", "case", "level", "axis", "slice", *METRICS, "note"]
AXIS_NAMES = "XYZ"


@dataclass
class EvalOptions:
    conv: Convention
    axis: int = 2
    slices_per_case: int = 3
    ci: str = "t"
    grid_tol: float = 0.01
    tile: int = 256


@dataclass
class Collected:
    rows: list[dict] = field(default_factory=list)  # metrics.csv rows (volume + slice)
    panels: list[dict] = field(default_factory=list)
    case_notes: dict[str, list[str]] = field(default_factory=dict)


def _safe_name(cid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", cid.replace("/", "__"))


def _display_window(ref: np.ndarray, mask: np.ndarray | None, conv: Convention) -> tuple[tuple[float, float], str]:
    if conv.window is not None:
        return conv.window, "metric window"
    vals = ref[mask] if mask is not None else ref.reshape(-1)
    lo, hi = (float(v) for v in np.percentile(vals, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max()) if vals.max() > vals.min() else float(vals.min()) + 1.0
    return (lo, hi), "reference 0.5-99.5th percentile"


def _write_panels(ec: EvalCase, ref_np, mask_np, aff, planes: dict[str, dict[int, np.ndarray]],
                  opts: EvalOptions, out_dir: Path) -> list[dict]:
    from medldm.eval.panels import display_plane, render_panel, save_png

    if not planes or not next(iter(planes.values())):
        return []
    window, wsrc = _display_window(ref_np, mask_np, opts.conv)
    clip = opts.conv.window
    idx = sorted(next(iter(planes.values())))
    refs = {k: display_plane(ref_np, aff, opts.axis, k) for k in idx}
    diffs = []
    for by_slice in planes.values():
        for k in idx:
            a, b = by_slice[k], refs[k][0]
            if clip is not None:
                a, b = np.clip(a, *clip), np.clip(b, *clip)
            diffs.append(np.abs(a - b).ravel())
    d = np.concatenate(diffs)
    dmax = float(np.percentile(d, 99.5)) or float(d.max()) or opts.conv.r / 100
    dmax = float(f"{dmax:.3g}")
    out = []
    for k in idx:
        ref2d, spacing, letters = refs[k]
        img, tiles = render_panel(ref2d, [(m, by_slice[k]) for m, by_slice in planes.items()], window=window,
                                  dmax=dmax, spacing=spacing, diff_clip=clip, tile=opts.tile)
        rel = f"panels/{_safe_name(ec.id)}__{AXIS_NAMES[opts.axis].lower()}{k:04d}.png"
        save_png(img, out_dir / rel)
        out.append({"case": ec.id, "axis": opts.axis, "slice": k, "n_slices": int(ref_np.shape[opts.axis]),
                    "file": rel, "window": list(window), "window_source": wsrc, "dmax": dmax,
                    "diff_clip": list(clip) if clip else None, "spacing_mm": list(spacing),
                    "orientation": {"left": letters[0], "top": letters[1]}, "tiles": tiles})
    return out


def evaluate_case(ec: EvalCase, methods: list[str], opts: EvalOptions, out_dir: Path, acc: Collected) -> dict:
    """Evaluate every method of one case; rows and panels go to ``acc``. Raises CaseError listing
    the methods that failed (after the others were evaluated)."""
    from medldm.eval.panels import choose_slices, display_plane

    ref = ec.ref.load()
    ref_t = ref.as_subclass(torch.Tensor).float()
    aff = np.asarray(ref.affine, dtype=np.float64)
    mask_t = None
    if ec.want_mask:
        if ec.mask is None:
            raise CaseError(ec.ref.label, f"no mask for case {ec.id!r}",
                            "add a mask with the same relative name to the mask folder (or the manifest)")
        mimg = ec.mask.load()
        check_grid(ref, mimg, ref_name=ec.ref.label, other_name=ec.mask.label, what="mask", tol_voxel=opts.grid_tol)
        mask_t = mimg.as_subclass(torch.Tensor) > 0
        if not bool(mask_t.any()):
            raise CaseError(ec.mask.label, "mask is empty (no voxel > 0)", "check the mask")
    ref_np = ref_t.numpy()
    mask_np = mask_t.numpy() if mask_t is not None else None
    occupied = mask_np.any(axis=tuple(d for d in range(3) if d != opts.axis)) if mask_np is not None else None
    idx = choose_slices(ref_np.shape[opts.axis], opts.slices_per_case, occupied)
    failures: list[CaseError] = []
    planes: dict[str, dict[int, np.ndarray]] = {}
    notes: list[str] = []
    for name in methods:
        src = ec.preds.get(name)
        if src is None:
            failures.append(CaseError(ec.ref.label, f"no prediction '{name}' for case {ec.id!r}",
                                      "the prediction folder needs the same relative name as the reference"))
            continue
        try:
            pred = src.load()
            check_grid(ref, pred, ref_name=ec.ref.label, other_name=src.label, tol_voxel=opts.grid_tol)
        except CaseError as e:
            failures.append(e)
            continue
        pred_t = pred.as_subclass(torch.Tensor).float()
        vol, vnotes = volume_metrics(pred_t, ref_t, mask_t, opts.conv)
        sl, snotes = slice_metrics(pred_t, ref_t, mask_t, opts.conv, opts.axis)
        notes += [f"{name}: 3D {n}" for n in vnotes] + [f"{name}: per slice {n}" for n in snotes]
        acc.rows.append({"method": name, "case": ec.id, "level": "volume", "axis": "", "slice": "", **vol,
                         "note": "; ".join(vnotes)})
        for k in range(len(sl["psnr"])):
            acc.rows.append({"method": name, "case": ec.id, "level": "slice", "axis": opts.axis, "slice": k,
                             **{m: float(sl[m][k]) for m in METRICS}, "note": ""})
        pred_np = pred_t.numpy()
        planes[name] = {k: display_plane(pred_np, aff, opts.axis, k)[0] for k in idx}
    if notes:
        acc.case_notes[ec.id] = sorted(set(notes))
    acc.panels += _write_panels(ec, ref_np, mask_np, aff, planes, opts, out_dir)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise CaseError(ec.id, f"{len(failures)} predictions failed: " + " | ".join(e.line() for e in failures))
    return {"methods": list(planes)}


def _group_notes(case_notes: dict[str, list[str]]) -> list[str]:
    """One line per distinct note, naming the cases it applies to."""
    by_text: dict[str, list[str]] = {}
    for case, notes in case_notes.items():
        for n in notes:
            by_text.setdefault(n, []).append(case)
    out = []
    for text, cases in by_text.items():
        more = f" (+{len(cases) - 5} more)" if len(cases) > 5 else ""
        out.append(f"{text} [case(s): {', '.join(cases[:5])}{more}]")
    return out


def per_case_values(rows: list[dict], methods: list[str]) -> dict:
    """``{method: {metric: {"volume": {case: v}, "slice_mean": {case: v}}}}``."""
    out = {m: {k: {"volume": {}, "slice_mean": {}} for k in METRICS} for m in methods}
    slices: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        for k in METRICS:
            if r["level"] == "volume":
                out[r["method"]][k]["volume"][r["case"]] = r[k]
            else:
                slices.setdefault((r["method"], k, r["case"]), []).append(r[k])
    for (m, k, c), v in slices.items():
        out[m][k]["slice_mean"][c] = nan_mean(np.asarray(v))
    return out


def build_summary(values: dict, methods: list[str], opts: EvalOptions) -> dict:
    """summary.json content: per method & metric (volume and slice mean) n/mean/std/CI, and paired
    differences of each method against the first one."""
    from medldm.eval.stats import ci_definition, paired_differences, summarize

    summ = {m: {k: {lvl: summarize(list(values[m][k][lvl].values()), ci=opts.ci) for lvl in ("volume", "slice_mean")}
                for k in METRICS} for m in methods}
    paired = {}
    if len(methods) > 1:
        base = methods[0]
        for m in methods[1:]:
            paired[m] = {k: {lvl: summarize(paired_differences(values[m][k][lvl], values[base][k][lvl]), ci=opts.ci)
                             for lvl in ("volume", "slice_mean")} for k in METRICS}
    return {
        "convention": opts.conv.to_json(),
        "axis": opts.axis,
        "unit": "case (volume); slice values are averaged within each case first",
        "ci": {"method": opts.ci, "level": 0.95, "definition": ci_definition(opts.ci)},
        "levels": {"volume": "3D metric over the whole volume (2D for single-slice images)",
                   "slice_mean": f"mean over slices along axis {opts.axis} of the 2D metric"},
        "methods": summ,
        "paired": {"baseline_method": methods[0] if len(methods) > 1 else None,
                   "definition": "per-case difference (method - baseline_method) over the cases both have",
                   "differences": paired},
    }


def _fmt(v) -> str:
    if v == "" or v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) and v > 0 else repr(v))
    return str(v)


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k, "")) for k in CSV_COLUMNS})
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_json(path: Path, obj: dict) -> None:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(clean(obj), indent=2))


def evaluate(pairing: Pairing, opts: EvalOptions, out_dir: str | Path, *, command: str = "",
             quiet: bool = False) -> tuple[int, dict]:
    """Evaluate all cases of ``pairing`` and write the report folder. Returns ``(exit_status, summary)``."""
    from medldm.cli.common import run_cases
    from medldm.eval.report import write_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_report.json").unlink(missing_ok=True)  # not resumable: a fresh record each run
    acc = Collected()
    status, results = run_cases(
        pairing.cases, lambda ec: evaluate_case(ec, pairing.methods, opts, out_dir, acc),
        name=lambda ec: ec.id, report_path=out_dir / "run_report.json", desc="evaluate",
        command=command, quiet=quiet)
    acc.rows.sort(key=lambda r: (pairing.methods.index(r["method"]), r["case"], r["level"] != "volume",
                                 r["slice"] if r["slice"] != "" else -1))
    values = per_case_values(acc.rows, pairing.methods)
    summary = build_summary(values, pairing.methods, opts)
    failed = [r.message for r in results if r.status == "failed"]
    summary["cases"] = {"paired": len(pairing.cases), "evaluated": sum(r.status == "done" for r in results),
                        "failed": failed}
    summary["notes"] = pairing.notes + _group_notes(acc.case_notes)
    write_csv(out_dir / "metrics.csv", acc.rows)
    write_json(out_dir / "summary.json", summary)
    write_json(out_dir / "panels.json", {"panels": acc.panels})
    write_html(out_dir / "report.html", summary=summary, values=values, methods=pairing.methods,
               panels=acc.panels, command=command)
    current = {out_dir / p["file"] for p in acc.panels}
    for old in (out_dir / "panels").glob("*.png"):  # panels of an earlier run into the same folder
        if old not in current:
            old.unlink()
    return status, summary
