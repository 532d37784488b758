"""``medldm audit``: memorization, diversity and realism of synthetic scans, with an HTML report.

    medldm audit --synthetic DIR --train DIR [--holdout DIR] -o REPORT_DIR [options]

Writes REPORT_DIR/audit.json (all figures + the per-sample nearest-neighbour table), audit.csv,
audit.html (summary, thresholds, flagged pairs side by side), pairs/*.png and run_report.json.
Exit status: 0 every case loaded, 1 some cases failed (one line each; the others are audited),
2 usage error. Definitions and thresholds: docs/audit.md.
"""

from __future__ import annotations

import argparse
import shlex

from medldm.io.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synthetic", required=True, metavar="DIR", help="synthetic scans (NIfTI files, DICOM series)")
    p.add_argument("--train", required=True, metavar="DIR", help="the training scans of the generative model")
    p.add_argument("--holdout", metavar="DIR",
                   help="real scans NOT used for training (other subjects): calibrate the near-copy thresholds; "
                        "without it absolute thresholds are used")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="report folder (created)")
    p.add_argument("--grid", type=int, metavar="S", help="comparison grid per axis (default 128 in 2D, 64 in 3D)")
    p.add_argument("--shift", type=int, metavar="V",
                   help="largest shift tried per axis, in grid voxels (default 8 in 2D, 4 in 3D; at most a quarter of the grid)")
    p.add_argument("--no-flip", action="store_true", help="do not also compare left-right flipped samples")
    p.add_argument("--candidates", type=int, default=10, metavar="K",
                   help="training images scored in full per sample, preselected by thumbnail correlation (default 10)")
    p.add_argument("--quantile", type=float, default=99.0, metavar="Q",
                   help="held-out percentile of nearest-neighbour similarity used as threshold (default 99)")
    p.add_argument("--ssim-floor", type=float, default=0.95, metavar="T",
                   help="absolute SSIM threshold floor; the threshold without --holdout (default 0.95)")
    p.add_argument("--ncc-floor", type=float, default=0.98, metavar="T",
                   help="absolute NCC threshold floor; the threshold without --holdout (default 0.98)")
    p.add_argument("--modality", metavar="NAME", help="treat every scan as this modality (CT: HU window; other: "
                                                      "percentiles); default from the DICOM headers")
    p.add_argument("--ct-window", default="full", metavar="NAME|L,H",
                   help="HU window for CT normalization: full, brain, subdural, soft-tissue, lung, bone, or L,H "
                        "(write negatives as --ct-window=-160,240; default full = -1024,3071)")
    p.add_argument("--max-pairs", type=int, default=2000, metavar="P", help="pairs sampled for diversity (default 2000)")
    p.add_argument("--permutations", type=int, default=200, metavar="P",
                   help="label permutations for the realism p-value (default 200; 0 = binomial test only)")
    p.add_argument("--max-panels", type=int, default=24, metavar="N", help="flagged pair panels in the HTML (default 24)")
    p.add_argument("--utility", action="store_true",
                   help="also train a small tissue segmenter on the training scans with and without the synthetic "
                        "image/label pairs (synthesize --mask) and compare them on --holdout (Dice, 95%% CI)")
    p.add_argument("--labels", metavar="DIR",
                   help="--utility: label maps of the real scans (DIR/<scan name> or DIR/<stem>_labels.nii.gz); "
                        "default: tissue classes medldm derives by intensity clustering")
    p.add_argument("--utility-steps", type=int, default=300, metavar="N",
                   help="--utility: optimiser steps of each segmenter (default 300)")
    p.add_argument("--no-radiomics", action="store_true",
                   help="skip the Fréchet Radiomics Distance and its per-feature breakdown (about 0.5 s per 2D image "
                        "on one CPU core; needs frd-score, see docs/audit.md)")
    p.add_argument("--utility-seeds", type=int, default=3, metavar="N",
                   help="--utility: training seeds per protocol, resampled in the intervals (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled pairs / folds / permutations (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _window(value: str) -> str | tuple[float, float]:
    if "," in value:
        try:
            lo, hi = (float(v) for v in value.split(","))
        except ValueError:
            raise UsageError(f"--ct-window {value!r}: expected L,H (two numbers) or a window name") from None
        if not hi > lo:
            raise UsageError(f"--ct-window {value!r}: needs L < H")
        return lo, hi
    # lazy: keeps medldm --help free of torch
    from medldm.data.intensity import CT_WINDOWS

    if value not in CT_WINDOWS:
        raise UsageError(f"--ct-window {value!r}: unknown window; choose one of {', '.join(CT_WINDOWS)} or give L,H")
    return value


def _check(args: argparse.Namespace) -> None:
    if args.grid is not None and args.grid < 16:
        raise UsageError(f"--grid {args.grid}: must be at least 16")
    if args.shift is not None and args.shift < 0:
        raise UsageError("--shift must be >= 0")
    if args.candidates < 1:
        raise UsageError("--candidates must be >= 1")
    if not 0 < args.quantile <= 100:
        raise UsageError("--quantile must be in (0, 100]")
    for flag in ("ssim_floor", "ncc_floor"):
        if not -1 <= getattr(args, flag) <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be in [-1, 1]")
    if args.utility_steps < 1:
        raise UsageError("--utility-steps must be >= 1")
    if args.utility_seeds < 1:
        raise UsageError("--utility-seeds must be >= 1")
    if args.labels and not args.utility:
        raise UsageError("--labels goes with --utility")
    if args.max_pairs < 1 or args.permutations < 0 or args.max_panels < 0:
        raise UsageError("--max-pairs must be >= 1, --permutations and --max-panels >= 0")


def run(args: argparse.Namespace) -> int:
    # lazy: keeps medldm --help free of torch
    import torch

    from medldm.eval.audit import AuditOptions, run_audit

    _check(args)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    opt = AuditOptions(grid=args.grid, shift=args.shift, flips=not args.no_flip, candidates=args.candidates,
                       quantile=args.quantile, ssim_floor=args.ssim_floor, ncc_floor=args.ncc_floor,
                       max_pairs=args.max_pairs, permutations=args.permutations, seed=args.seed,
                       modality=args.modality, ct_window=_window(args.ct_window), max_panels=args.max_panels,
                       utility=args.utility, labels=args.labels, utility_steps=args.utility_steps,
                       utility_seeds=args.utility_seeds, radiomics=not args.no_radiomics,
                       quiet=args.quiet)
    parts = ["medldm", "audit", f"--synthetic={args.synthetic}", f"--train={args.train}"]
    if args.holdout:
        parts.append(f"--holdout={args.holdout}")
    if args.utility:
        parts += ["--utility"] + ([f"--labels={args.labels}"] if args.labels else [])
    parts += ["-o", str(args.output)]
    status, _ = run_audit(args.synthetic, args.train, args.output, holdout_dir=args.holdout, options=opt,
                          command=shlex.join(parts))
    return status
