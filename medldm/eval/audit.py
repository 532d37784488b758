"""Synthetic-data audit: memorization, diversity and realism of synthetic scans (docs/audit.md).

Public API::

    run_audit(synthetic_dir, train_dir, out_dir, holdout_dir=None, options=AuditOptions(), command="")
        -> (exit_status, audit dict)        # writes REPORT_DIR/audit.{json,csv,html}, pairs/*.png, run_report.json
    thresholds(holdout_ssim, holdout_ncc, options) -> dict

Pipeline: every case of each folder is loaded (:func:`medldm.io.caseloop.run_cases`: one line per failed
case, the others still processed), normalized and resampled to the comparison grid
(:mod:`audit_load`); nearest training neighbours of synthetic and held-out images
(:mod:`audit_match`); thresholds from the held-out distribution; diversity and the classifier
two-sample test (:mod:`audit_stats`); report (:mod:`audit_report`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from medldm.eval.audit_frd import radiomics_frd
from medldm.eval.audit_load import Sample, case_modality, prepare, resolve_modalities, stack
from medldm.eval.audit_match import Match, aligned_pair, nearest_neighbours
from medldm.eval.audit_report import _ci_text, write_outputs, write_pair_png
from medldm.eval.audit_stats import diversity, feature_distance, two_sample_test
from medldm.eval.audit_utility import LABEL_SUFFIX, UtilityOptions, is_label_file, load_slices, utility_test
from medldm.io.caseloop import run_cases
from medldm.io.discover import scan_folder
from medldm.io.errors import CaseError, UsageError
from medldm.io.reader import load_case, load_nifti

log = logging.getLogger(__name__)

ROLES = ("synthetic", "train", "holdout")


@dataclass
class AuditOptions:
    """Settings (CLI flags of ``medldm audit``; defaults documented in docs/audit.md)."""

    grid: int | None = None  # comparison grid per axis: None -> 128 (2D) / 64 (3D)
    shift: int | None = None  # largest shift tried per axis (grid voxels): None -> 8 (2D) / 4 (3D)
    flips: bool = True  # also try the query flipped left-right
    candidates: int = 10  # training images scored in full per query
    quantile: float = 99.0  # held-out percentile that sets a threshold
    ssim_floor: float = 0.95  # absolute floor (and the threshold without held-out scans)
    ncc_floor: float = 0.98
    max_pairs: int = 2000  # pairs for the diversity means
    permutations: int = 200  # label permutations for the realism p-value
    folds: int = 5
    seed: int = 0
    modality: str | None = None  # force every scan's modality (CT -> HU window, else percentiles)
    ct_window: str | tuple[float, float] = "full"
    max_panels: int = 24  # flagged pair panels in the HTML (all flagged pairs are in the tables)
    context_panels: int = 3  # closest unflagged pairs shown for comparison
    radiomics: bool = True  # Fréchet Radiomics Distance + breakdown (audit_frd; needs frd-score)
    utility: bool = False  # train a segmenter with/without the synthetic pairs (audit_utility)
    labels: str | None = None  # label maps of the real scans (default: derived tissue classes)
    utility_steps: int = 300
    utility_seeds: int = 3  # segmenter training seeds per protocol
    quiet: bool = False


def thresholds(holdout_ssim: list[float], holdout_ncc: list[float], opt: AuditOptions) -> dict:
    """Flag thresholds: max(floor, held-out ``quantile``-th percentile) per score; floors alone without
    held-out scans. A sample is flagged when its NN SSIM or its NN NCC exceeds its threshold."""
    out = {"ssim_floor": opt.ssim_floor, "ncc_floor": opt.ncc_floor, "quantile": opt.quantile,
           "holdout_ssim_quantile": None, "holdout_ncc_quantile": None}
    if holdout_ssim:
        qs = float(np.percentile(holdout_ssim, opt.quantile))
        qn = float(np.percentile(holdout_ncc, opt.quantile))
        out.update(holdout_ssim_quantile=qs, holdout_ncc_quantile=qn, ssim=max(opt.ssim_floor, qs),
                   ncc=max(opt.ncc_floor, qn), source=f"held-out ({len(holdout_ssim)} scans)",
                   rule=(f"flagged when NN SSIM > max({opt.ssim_floor:g}, held-out {opt.quantile:g}th percentile) "
                         f"or NN NCC > max({opt.ncc_floor:g}, held-out {opt.quantile:g}th percentile)"))
    else:
        out.update(ssim=opt.ssim_floor, ncc=opt.ncc_floor, source="absolute (no --holdout)",
                   rule=(f"flagged when NN SSIM > {opt.ssim_floor:g} or NN NCC > {opt.ncc_floor:g} "
                         "(absolute thresholds: no held-out scans were given)"))
    return out


def _p_above(value: float, ref: list[float]) -> float | None:
    """Empirical p-value: share of held-out scans at least as similar to training (with +1 smoothing)."""
    if not ref:
        return None
    return (1 + sum(r >= value for r in ref)) / (1 + len(ref))


def _rows(samples: list[Sample], matches: list[Match], train: list[Sample], thr: dict | None,
          hold_ssim: list[float], hold_ncc: list[float]) -> list[dict]:
    rows = []
    for s, m in zip(samples, matches, strict=True):
        r = {"role": s.role, "id": s.id, "source": s.source, "nn_ssim": m.ssim, "nn_ssim_train": train[m.ssim_index].id,
             "nn_ncc": m.ncc, "nn_ncc_train": train[m.ncc_index].id, "shift": list(m.shift), "flipped": m.flipped,
             "holdout_p_ssim": _p_above(m.ssim, hold_ssim), "holdout_p_ncc": _p_above(m.ncc, hold_ncc),
             "native_shape": list(s.native_shape), "modality": s.modality}
        if thr is not None:
            r["flag_ssim"] = bool(m.ssim > thr["ssim"])
            r["flag_ncc"] = bool(m.ncc > thr["ncc"])
            r["flagged"] = r["flag_ssim"] or r["flag_ncc"]
        rows.append(r)
    return rows


def _load_all(folders: dict[str, Path], out_dir: Path, opt: AuditOptions,
              command: str) -> tuple[int, dict[str, list[Sample]], list[str], str]:
    """Discover and prepare every case; returns (status, {role: [Sample]}, failure lines, modality note)."""
    items = []
    for role, folder in folders.items():
        found = scan_folder(folder)
        if not found.cases:
            raise UsageError(f"--{role} {folder}: no NIfTI file or DICOM series found"
                             + (f" ({found.skipped[0]})" if found.skipped else ""))
        # the label maps of synthetic image/label pairs (synthesize --mask) are not scans
        items += [(role, c) for c in found.cases if not (c.paths and is_label_file(Path(c.paths[0])))]
    mods, mod_note = resolve_modalities({f"{r}/{c.id}": case_modality(c) for r, c in items}, opt.modality)
    loaded: dict[str, list[Sample]] = {r: [] for r in folders}

    def process(item):
        role, case = item
        img = load_case(case)
        s = prepare(img, role=role, case_id=case.id, source=case.source or str(case.paths[0]),
                    modality=mods[f"{role}/{case.id}"], grid=opt.grid, ct_window=opt.ct_window)
        loaded[role].append(s)
        return {"shape": list(s.native_shape), "modality": s.modality}

    status, results = run_cases(items, process, name=lambda it: f"{it[0]}/{it[1].id}",
                                report_path=out_dir / "run_report.json", desc="audit: loading",
                                command=command, quiet=opt.quiet)
    failed = [r.message for r in results if r.status == "failed"]
    # one dimensionality per audit: that of most synthetic samples
    dims = Counter(s.ndim for s in loaded.get("synthetic", []))
    nd = dims.most_common(1)[0][0] if dims else 2
    for role in loaded:
        for s in [s for s in loaded[role] if s.ndim != nd]:
            line = (f"{s.source}: {s.ndim}D image in a {nd}D audit (most synthetic samples are {nd}D) — "
                    "audit 2D slices and 3D volumes separately")
            failed.append(line)
            log.warning("FAILED %s", line)
            status = 1
        loaded[role] = sorted((s for s in loaded[role] if s.ndim == nd), key=lambda s: s.id)
    return status, loaded, failed, mod_note


def run_audit(synthetic_dir: str | Path, train_dir: str | Path, out_dir: str | Path,
              holdout_dir: str | Path | None = None, options: AuditOptions | None = None,
              command: str = "") -> tuple[int, dict]:
    """Run the whole audit and write the report folder. Returns (exit status 0/1, audit dict)."""
    opt = options or AuditOptions()
    out_dir = Path(out_dir)
    folders = {"synthetic": Path(synthetic_dir), "train": Path(train_dir)}
    if holdout_dir is not None:
        folders["holdout"] = Path(holdout_dir)
    for role, f in folders.items():
        if not f.exists():
            raise UsageError(f"--{role} {f}: no such file or folder")
    if opt.utility and holdout_dir is None:
        raise UsageError("--utility needs --holdout: real scans of other subjects to evaluate the segmenters on")
    if opt.labels is not None and not Path(opt.labels).is_dir():
        raise UsageError(f"--labels {opt.labels}: no such folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    status, loaded, failed, mod_note = _load_all(folders, out_dir, opt, command)
    syn, train, hold = loaded["synthetic"], loaded["train"], loaded.get("holdout", [])
    if not syn or not train:
        raise UsageError("nothing to audit: " + ("no synthetic scan" if not syn else "no training scan")
                         + " could be loaded (see the lines above)")
    nd = syn[0].ndim
    grid = syn[0].image.shape[0]
    shift = opt.shift if opt.shift is not None else (8 if nd == 2 else 4)
    torch.manual_seed(opt.seed)
    xs, xt, xh = stack(syn), stack(train), stack(hold)
    kw = {"shift": shift, "flips": opt.flips, "candidates": opt.candidates}
    m_syn = nearest_neighbours(xs, xt, **kw)
    m_hold = nearest_neighbours(xh, xt, **kw) if hold else []
    hs, hn = [m.ssim for m in m_hold], [m.ncc for m in m_hold]
    thr = thresholds(hs, hn, opt)
    rows_syn = _rows(syn, m_syn, train, thr, hs, hn)
    rows_hold = _rows(hold, m_hold, train, thr, hs, hn)
    for r in rows_hold:
        r["holdout_p_ssim"] = r["holdout_p_ncc"] = None  # a held-out scan is part of its own reference
    div = {"synthetic": diversity(xs, max_pairs=opt.max_pairs, seed=opt.seed),
           "train": diversity(xt, max_pairs=opt.max_pairs, seed=opt.seed)}
    real_set = torch.cat([xt, xh]) if hold else xt
    realism = two_sample_test(real_set, xs, folds=opt.folds, permutations=opt.permutations, seed=opt.seed)
    realism["real_set"] = "training + held-out" if hold else "training"
    realism["feature_frechet"] = feature_distance(real_set, xs, seed=opt.seed)
    if opt.radiomics:

        reals = train + hold
        realism["radiomics_frd"] = radiomics_frd([r.image for r in reals], [r.source for r in reals],
                                                 [r.image for r in syn], seed=opt.seed)
    else:
        realism["radiomics_frd"] = {"skipped": "--no-radiomics"}
    notes = [
        f"{len(syn)} synthetic, {len(train)} training, {len(hold)} held-out {nd}D images compared on a "
        f"{'×'.join([str(grid)] * nd)} grid (each axis resampled; physical spacing ignored), canonical RAS axis order.",
        "Intensities normalized to [0, 1] with clipping: CT by the HU window "
        f"{opt.ct_window}, other modalities by the 0.5th–99.5th percentiles of each scan; {mod_note}.",
        f"Nearest neighbours tolerate shifts up to ±{shift} grid voxels per axis"
        + (" and a left-right flip" if opt.flips else "") + f"; the {opt.candidates} training images with the "
        "highest thumbnail correlation are scored in full (all of them when there are fewer).",
    ]
    if not hold:
        notes.append(("No held-out scan could be loaded" if "holdout" in folders else "No --holdout given")
                     + ": the memorization thresholds are absolute (SSIM "
                     f"> {opt.ssim_floor:g} or NCC > {opt.ncc_floor:g}), not calibrated on real held-out scans.")
    flagged = [r for r in rows_syn if r["flagged"]]
    utility = _utility(folders, opt) if opt.utility else None
    audit = {
        "counts": {"synthetic": len(syn), "train": len(train), "holdout": len(hold), "failed": len(failed)},
        "grid": [grid] * nd, "dims": nd, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in asdict(opt).items() if k != "quiet"},
        "memorization": {
            "thresholds": thr, "n_flagged": len(flagged),
            "fraction_flagged": len(flagged) / len(rows_syn),
            "synthetic_median_ssim": float(np.median([m.ssim for m in m_syn])),
            "synthetic_median_ncc": float(np.median([m.ncc for m in m_syn])),
            "holdout_median_ssim": float(np.median(hs)) if hs else None,
            "holdout_median_ncc": float(np.median(hn)) if hn else None,
            "holdout_fraction_flagged": (sum(r["flagged"] for r in rows_hold) / len(rows_hold)) if rows_hold else None,
        },
        "diversity": div, "realism": realism, "utility": utility, "notes": notes, "failed": failed,
        "synthetic": rows_syn, "holdout": rows_hold,
    }
    panels = _panels(out_dir, syn, train, m_syn, rows_syn, shift, opt)
    audit["panels"] = [{k: v for k, v in p.items() if k != "row"} | {"id": p["row"]["id"]} for p in panels]
    write_outputs(out_dir, audit, panels, command)
    if not opt.quiet:
        log.info(f"audit: {len(flagged)} of {len(rows_syn)} synthetic samples flagged as near-copies "
                 f"({thr['source']} thresholds SSIM {thr['ssim']:.3f}, NCC {thr['ncc']:.3f}); "
                 f"diversity {div['synthetic']['mean'] if div['synthetic']['mean'] is not None else float('nan'):.3f} "
                 f"(training {div['train']['mean'] if div['train']['mean'] is not None else float('nan'):.3f}); "
                 f"realism accuracy {realism.get('accuracy', float('nan')):.3f}; report: {out_dir / 'audit.html'}")
    return status, audit


def _utility(folders: dict[str, Path], opt: AuditOptions) -> dict:
    """The utility test (:mod:`audit_utility`) on the audit's folders: synthetic pairs, real train, held-out."""
    uopt = UtilityOptions(steps=opt.utility_steps, seed=opt.seed, seeds=opt.utility_seeds)
    try:

        maps = sorted(folders["synthetic"].rglob(f"*{LABEL_SUFFIX}.nii*"))
        if not maps:
            raise UsageError(f"--utility: no image/label pairs in {folders['synthetic']} (*{LABEL_SUFFIX}.nii.gz "
                             "beside each scan: make them with medldm synthesize --mask)")
        classes = max(2, max(int(np.rint(load_nifti(m)[0]).max()) for m in maps) + 1)  # 0..K-1 in the pairs
        syn = load_slices(folders["synthetic"], labels_dir=None, classes=classes, opt=uopt, paired=True)
        real = load_slices(folders["train"], labels_dir=opt.labels, classes=classes, opt=uopt)
        hold = load_slices(folders["holdout"], labels_dir=opt.labels, classes=classes, opt=uopt)
    except CaseError as e:
        raise UsageError(f"--utility: {e.line()}") from None
    out = utility_test(real, syn, hold, classes, uopt)
    out["real_labels"] = f"label maps in {opt.labels}" if opt.labels else \
        "derived by medldm.data.tissue.tissue_labels (intensity clusters)"
    if not opt.quiet:

        log.info(f"audit utility: held-out Dice real {out['real']['mean_dice']:.4f}; difference to real (95% CI): "
                 + "; ".join(f"{n} {_ci_text(out[n]['difference'])}" for n in out["protocols"]))
    return out


def _panels(out_dir: Path, syn: list[Sample], train: list[Sample], matches: list[Match], rows: list[dict],
            shift: int, opt: AuditOptions) -> list[dict]:
    """PNG panels: flagged pairs (most similar first, up to max_panels) + the closest unflagged ones."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["nn_ssim"])
    chosen = [i for i in order if rows[i]["flagged"]][: opt.max_panels]
    chosen += [i for i in order if not rows[i]["flagged"]][: opt.context_panels]
    panels = []
    for n, i in enumerate(chosen):
        s, m = syn[i], matches[i]
        t = train[m.ssim_index]
        q, r = aligned_pair(s.image, t.image, m, shift)
        a, b = q.ravel().astype(np.float64), r.ravel().astype(np.float64)
        a, b = a - a.mean(), b - b.mean()
        ncc = float(a @ b / max(1e-12, np.sqrt((a @ a) * (b @ b))))
        name = f"pairs/{n:03d}_{'flagged' if rows[i]['flagged'] else 'closest'}.png"
        tiles = write_pair_png(out_dir / name, q, r, syn_normal=s.normal, train_normal=t.normal,
                               labels=(f"synthetic {s.id}", f"training {t.id}"))
        panels.append({"png": name, "tiles": tiles, "row": rows[i], "ncc_at_pair": ncc})
    current = {p["png"].split("/")[-1] for p in panels}
    for old in (out_dir / "pairs").glob("[0-9][0-9][0-9]_*.png"):  # panels of an earlier run into this folder
        if old.name not in current and old.name.split("_", 1)[1] in ("flagged.png", "closest.png"):
            old.unlink()
    return panels
