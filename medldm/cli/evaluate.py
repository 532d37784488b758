"""``medldm evaluate``: PSNR / SSIM / MS-SSIM of predictions against references, with a report.

    medldm evaluate --pred DIR [--pred NAME=DIR ...] --ref DIR [--mask DIR]
                    (--data-range R | --window L,H | --window NAME) -o REPORT_DIR
                    [--axis 2] [--slices-per-case 3] [--ci t|bootstrap]
    medldm evaluate --manifest pairs.csv (--data-range R | --window ...) -o REPORT_DIR

Cases pair by relative path without extension (see docs/evaluation.md). The intensity convention is
required: PSNR and SSIM mean nothing without it. Writes REPORT_DIR/metrics.csv, summary.json,
report.html, panels/*.png, panels.json and run_report.json. Exit status: 0 all cases evaluated,
1 some failed (listed; the others are still evaluated and reported), 2 usage error.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from medldm.eval.pairing import expand_volumes, pair_folders, pair_manifest, parse_pred_args
from medldm.io.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", action="append", default=[], metavar="[NAME=]DIR",
                   help="predictions of one method (folder, or a file); repeat for several methods side by side")
    p.add_argument("--ref", metavar="DIR", help="reference scans (folder, or a file)")
    p.add_argument("--mask", metavar="DIR", help="masks paired like the predictions; metrics inside voxels > 0")
    p.add_argument("--manifest", metavar="CSV", help="explicit pairs: columns case, ref, pred (or pred:NAME ...), "
                                                     "optional mask; replaces --pred/--ref/--mask")
    p.add_argument("--data-range", type=float, metavar="R",
                   help="intensity range R used by PSNR/SSIM (no clipping), e.g. 1 for [0, 1] images")
    p.add_argument("--window", metavar="L,H|NAME",
                   help="intensity window: both images clipped to [L, H], R = H - L (e.g. -160,240); "
                        "or a preset name (ct-soft-tissue, ct-brain, ct-lung, ...)")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="report folder (created)")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="array axis of the per-slice metrics "
                                                                           "and panels (default 2 = Z)")
    p.add_argument("--slices-per-case", type=int, default=3, metavar="K",
                   help="image panels per case: the central slice and evenly spaced ones (default 3; 0 = none)")
    p.add_argument("--ci", choices=("t", "bootstrap"), default="t",
                   help="95%% confidence interval of the mean over cases: Student t (default) or percentile bootstrap")
    p.add_argument("--grid-tolerance", type=float, default=0.01, metavar="VOXELS",
                   help="largest allowed distance between field-of-view corners of prediction and reference, "
                        "in units of the smallest reference voxel size (default 0.01)")
    p.add_argument("--panel-size", type=int, default=256, metavar="PX", help="longer side of each panel tile")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def parse_window(value: str) -> str | tuple[float, float]:
    """``"L,H"`` -> (L, H); anything else is a window preset name."""
    if "," in value:
        parts = value.split(",")
        try:
            lo, hi = (float(v) for v in parts)
        except ValueError:
            raise UsageError(f"--window {value!r}: expected L,H (two numbers) or a preset name") from None
        return lo, hi
    return value


def _command(args: argparse.Namespace) -> str:
    parts = ["medldm", "evaluate"]
    parts += [f"--pred={p}" for p in args.pred]
    for flag, v in (("--ref", args.ref), ("--mask", args.mask), ("--manifest", args.manifest),
                    ("--data-range", args.data_range), ("--window", args.window)):
        if v is not None:
            parts.append(f"{flag}={v}")
    parts += ["-o", str(args.output), f"--axis={args.axis}", f"--slices-per-case={args.slices_per_case}"]
    if args.ci != "t":
        parts.append(f"--ci={args.ci}")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps medldm --help free of torch
    from medldm.eval.evaluate import convention_from
    from medldm.eval.run import EvalOptions, evaluate
    from medldm.metrics import WINDOWS

    if args.data_range is None and args.window is None:
        raise UsageError("no intensity convention: PSNR and SSIM depend on it — pass --data-range R "
                         "(e.g. 1 for [0, 1] images, 255 for 8-bit), --window=L,H (e.g. --window=-160,240 for CT "
                         f"soft tissue) or --window NAME ({', '.join(WINDOWS)})")
    try:
        conv = convention_from(args.data_range, parse_window(args.window) if args.window is not None else None)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.slices_per_case < 0 or args.panel_size < 16 or args.grid_tolerance < 0:
        raise UsageError("--slices-per-case must be >= 0, --panel-size >= 16, --grid-tolerance >= 0")
    if args.manifest:
        if args.pred or args.ref or args.mask:
            raise UsageError("--manifest replaces --pred/--ref/--mask: give one or the other")
        pairing = pair_manifest(Path(args.manifest))
    else:
        if not args.pred or not args.ref:
            raise UsageError("give --ref DIR and at least one --pred DIR (or --manifest CSV)")
        pairing = pair_folders(Path(args.ref), parse_pred_args(args.pred),
                               Path(args.mask) if args.mask else None)
    pairing = expand_volumes(pairing)  # a 4D scan: each volume evaluated as a case (id#volK)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    opts = EvalOptions(conv=conv, axis=args.axis, slices_per_case=args.slices_per_case, ci=args.ci,
                       grid_tol=args.grid_tolerance, tile=args.panel_size)
    status, _ = evaluate(pairing, opts, out, command=_command(args), quiet=args.quiet)
    if not args.quiet:
        print(f"report: {out / 'report.html'}", file=sys.stderr)
    return status
