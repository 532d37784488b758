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
from medldm.eval.panels import choose_slices, display_plane, render_panel, save_png
from medldm.eval.report import write_html
from medldm.eval.stats import ci_definition, paired_differences, summarize
from medldm.io.atomic import atomic_file
from medldm.io.caseloop import run_cases
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
    # why a (method, case)'s values are NaN: {(method, case): {"volume": {metric: reason}, "slice": {reason: n}}}
    nan_reasons: dict[tuple[str, str], dict] = field(default_factory=dict)


def _safe_name(cid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", cid.replace("/", "__"))


def _display_window(ref: np.ndarray, mask: np.ndarray | None, conv: Convention) -> tuple[tuple[float, float], str]:
    if conv.window is not None:
        return conv.window, "metric window"
    vals = ref[mask] if mask is not None else ref.reshape(-1)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return (0.0, 1.0), "no finite reference voxel"
    lo, hi = (float(v) for v in np.percentile(vals, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max()) if vals.max() > vals.min() else float(vals.min()) + 1.0
    return (lo, hi), "reference 0.5-99.5th percentile"


def _write_panels(ec: EvalCase, ref_np, mask_np, aff, planes: dict[str, dict[int, np.ndarray]],
                  opts: EvalOptions, out_dir: Path) -> list[dict]:
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
    d = d[np.isfinite(d)]  # NaN voxels (said in the notes) show as black in the difference tiles
    dmax = (float(np.percentile(d, 99.5)) or float(d.max()) or opts.conv.r / 100) if d.size else opts.conv.r / 100
    dmax = float(f"{dmax:.3g}")
    out = []
    def shown(a: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(a), a, window[0])

    for k in idx:
        ref2d, spacing, letters = refs[k]
        ref2d = shown(ref2d)
        img, tiles = render_panel(ref2d, [(m, shown(by_slice[k])) for m, by_slice in planes.items()], window=window,
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
        vol, vnotes, sl, snotes = _metrics(ec.id, name, pred_t, ref_t, mask_t, opts, acc)
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


def _metrics(cid: str, name: str, pred_t: torch.Tensor, ref_t: torch.Tensor, mask_t, opts: EvalOptions,
             acc: Collected):
    """Volume and slice metrics of one prediction. Non-finite voxels (NaN/inf) in the prediction or the
    reference make the 3D values and the values of the slices holding them NaN: left out of the means, and
    counted with the reason in summary.json's ``excluded`` and the report (never silently)."""
    bad_p, bad_r = ~torch.isfinite(pred_t), ~torch.isfinite(ref_t)
    bad = bad_p | bad_r
    reasons: dict = {"volume": {}, "slice": {}}
    if bool(bad.any()):
        parts = [f"{int(b.sum())} NaN/inf voxel(s) in the {w}" for b, w in ((bad_p, "prediction"), (bad_r, "reference"))
                 if bool(b.any())]
        why = " and ".join(parts)
        zero = torch.zeros((), dtype=pred_t.dtype)
        pred0, ref0 = torch.where(bad, zero, pred_t), torch.where(bad, zero, ref_t)
        vol, vnotes = volume_metrics(pred0, ref0, mask_t, opts.conv)
        sl, snotes = slice_metrics(pred0, ref0, mask_t, opts.conv, opts.axis)
        hit = bad.movedim(opts.axis, 0).flatten(1).any(dim=1).numpy()
        for m in METRICS:
            vol[m] = math.nan
            sl[m][hit] = math.nan
            reasons["volume"][m] = why
            reasons["slice"][m] = [f"{int(hit.sum())} slice(s) with {why}"]
        vnotes = [f"{why}: 3D metrics not computed (NaN)", *vnotes]
        snotes = [f"{why}: {int(hit.sum())} slice(s) holding them not computed (NaN)", *snotes]
    else:
        vol, vnotes = volume_metrics(pred_t, ref_t, mask_t, opts.conv)
        sl, snotes = slice_metrics(pred_t, ref_t, mask_t, opts.conv, opts.axis)
    for m in METRICS:  # other NaN: the metric's own reason (too small, empty mask)
        if math.isnan(vol[m]) and m not in reasons["volume"]:
            reasons["volume"][m] = next((n for n in vnotes if n.startswith(f"{m}:")), "not computed")
    for m in METRICS:
        reasons["slice"].setdefault(m, []).extend(
            n for n in snotes if n.startswith(f"{m}:") or "empty mask" in n)
    acc.nan_reasons[(name, cid)] = reasons
    return vol, vnotes, sl, snotes


def excluded_values(rows: list[dict], methods: list[str], nan_reasons: dict) -> dict:
    """What the means leave out, and why: ``{method: {metric: {"cases": n, "of_cases": N, "slices": n,
    "of_slices": N, "reasons": {case: reason}}}}`` (NaN values; every count is in summary.json)."""
    out: dict = {}
    for m in methods:
        out[m] = {}
        vol = [r for r in rows if r["method"] == m and r["level"] == "volume"]
        sli = [r for r in rows if r["method"] == m and r["level"] == "slice"]
        for k in METRICS:
            reasons = {}
            for r in vol:
                if isinstance(r[k], float) and math.isnan(r[k]):
                    reasons[r["case"]] = nan_reasons.get((m, r["case"]), {}).get("volume", {}).get(k, "not computed")
            n_sl = sum(isinstance(r[k], float) and math.isnan(r[k]) for r in sli)
            slice_cases = sorted({r["case"] for r in sli if isinstance(r[k], float) and math.isnan(r[k])})
            slice_reasons = {c: "; ".join(nan_reasons.get((m, c), {}).get("slice", {}).get(k, [])) or "not computed"
                             for c in slice_cases}
            out[m][k] = {"cases": len(reasons), "of_cases": len(vol), "slices": int(n_sl), "of_slices": len(sli),
                         "reasons": reasons, "slice_reasons": slice_reasons}
    return out


def _exclusion_notes(excluded: dict) -> list[str]:
    lines = []
    for m, by_metric in excluded.items():
        for k, e in by_metric.items():
            if e["cases"]:
                why = "; ".join(f"{c}: {r}" for c, r in list(e["reasons"].items())[:5])
                more = f" (+{e['cases'] - 5} more)" if e["cases"] > 5 else ""
                lines.append(f"{m} {k}: {e['cases']} of {e['of_cases']} case(s) left out of the 3D means "
                             f"(NaN) — {why}{more}")
            if e["slices"]:
                sr = e["slice_reasons"]
                why = "; ".join(f"{c}: {r}" for c, r in list(sr.items())[:5])
                more = f" (+{len(sr) - 5} more cases)" if len(sr) > 5 else ""
                lines.append(f"{m} {k}: {e['slices']} of {e['of_slices']} slice(s) left out of the per-slice "
                             f"means (NaN) — {why}{more}")
    return lines


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
    summary["excluded"] = excluded_values(acc.rows, pairing.methods, acc.nan_reasons)
    summary["exclusions"] = _exclusion_notes(summary["excluded"])
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
