"""``medldm baseline``: classical denoising and super-resolution baselines.

    medldm baseline --task denoise --method {gaussian,nlm,bm3d,bm4d,ants,nlm-dipy} -i IN -o OUT
                    [--noise gaussian|rician] [--sigma S] [--filter-sigma F] [--dims 2|3]
    medldm baseline --task sr --method {nearest,linear,bicubic,bspline} -i IN -o OUT
                    [--scale 2] [--axis inplane|through]

IN is a scan (NIfTI file, DICOM file or series folder) or a folder of cases; OUT mirrors IN (same
relative names, same kind: NIfTI stays NIfTI, a DICOM series becomes a derived DICOM series of its
source; ``--to`` changes the kind). Failed cases are listed one line each and in
``OUT/medldm-baseline-report.json`` (one scan in: ``<OUT name>.medldm-baseline-report.json`` beside OUT) with
the parameters used per case. Each output gets a record ``<output name>.medldm.json`` (input files, task,
method and its parameters), written last: a rerun skips a case only when its record matches; an output made
with other inputs/options fails that case with one line (``--overwrite`` replaces only that output).
Exit status: 0 all done, 1 some failed, 2 usage error. See docs/guarantees.md.
Definitions of the methods: docs/evaluation.md and ``medldm.eval.baselines``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from medldm.cli import common
from medldm.cli.warn import print_case_warnings
from medldm.io.errors import CaseError, UsageError
from medldm.io.formats import is_nifti
from medldm.io.volumes import load_volumes, source_reference, stack_volumes
from medldm.io.writer import save_scan

REPORT_NAME = "medldm-baseline-report.json"
TASK_METHODS = {"denoise": ("gaussian", "nlm", "bm3d", "bm4d", "ants", "nlm-dipy"), "sr": ("nearest", "linear", "bicubic", "bspline")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=tuple(TASK_METHODS), help="denoise or sr (super-resolution)")
    p.add_argument("--method", required=True, help="denoise: gaussian, nlm, bm3d (2D), bm4d, ants "
                                                    "(ANTs DenoiseImage), nlm-dipy (3D); sr: nearest, linear, "
                                                    "bicubic (Keys cubic convolution), bspline (cubic B-spline)")
    p.add_argument("-i", "--input", required=True, metavar="IN", help="scan or folder of cases")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output scan or folder (mirrors IN)")
    g = p.add_argument_group("denoise")
    g.add_argument("--noise", choices=("gaussian", "rician"), default="gaussian",
                   help="gaussian (zero-mean; default) or rician (magnitude MR: bm3d/bm4d/nlm are followed by the "
                        "exact Rician bias correction, ants/nlm-dipy use their Rician model)")
    g.add_argument("--sigma", type=float, metavar="S", help="noise standard deviation in scanner units for "
                                                            "nlm/bm3d/bm4d/nlm-dipy (default: estimated per volume, "
                                                            "see docs; ants estimates its own)")
    g.add_argument("--filter-sigma", type=float, default=1.0, metavar="F",
                   help="gaussian: filter standard deviation in voxels (default 1.0)")
    g.add_argument("--dims", type=int, choices=(2, 3), default=2,
                   help="2: slice by slice in the X-Y plane (default); 3: whole volume (gaussian, nlm)")
    g = p.add_argument_group("super-resolution")
    g.add_argument("--scale", type=float, default=2.0, help="up-sampling factor (default 2)")
    g.add_argument("--axis", choices=("inplane", "through"), default="inplane",
                   help="inplane: X and Y (default); through: Z (slice direction)")
    p.add_argument("--volume", type=int, metavar="K", help="4D input: volume K only (0-based; default: every "
                                                            "volume, as one 4D output)")
    p.add_argument("--to", choices=("nifti", "dicom"), help="output kind (default: same as each input)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")



def _check(args: argparse.Namespace) -> None:
    if args.volume is not None and args.volume < 0:
        raise UsageError("--volume must be >= 0")
    if args.method not in TASK_METHODS[args.task]:
        raise UsageError(f"--method {args.method!r} is not a {args.task} method: "
                         f"choose one of {', '.join(TASK_METHODS[args.task])}")
    if args.task == "denoise":
        if args.sigma is not None and not args.sigma > 0:
            raise UsageError("--sigma must be > 0 (noise standard deviation in scanner units)")
        if not args.filter_sigma > 0:
            raise UsageError("--filter-sigma must be > 0 (voxels)")
        if args.method == "bm3d" and args.dims == 3:
            raise UsageError("bm3d runs slice by slice: use --dims 2 (or --method bm4d for the volume)")
        if args.method in ("bm3d", "bm4d", "ants"):
            # lazy: keeps medldm --help free of torch
            from medldm.eval.baselines import MissingExtraError, require_extra

            try:
                require_extra(args.method)
            except MissingExtraError as e:
                raise UsageError(str(e)) from None
    elif not args.scale >= 1:
        raise UsageError("--scale must be >= 1 (up-sampling factor)")


def _process(case, out: Path, args: argparse.Namespace, resume) -> dict:
    # lazy: keeps medldm --help free of torch
    from medldm.eval import baselines as B
    vols = load_volumes(case, args.volume)  # a 4D case: every volume, one by one, written as one 4D result
    warns = print_case_warnings(case, vols[0])
    outs = []
    for img in vols:
        if args.task == "denoise":
            try:
                res, info = B.denoise_scan(img, args.method, sigma=args.sigma, filter_sigma=args.filter_sigma,
                                           dims=args.dims, noise=args.noise)
            except ValueError as e:
                raise CaseError(case.source or case.id, str(e), "use --noise gaussian for images with negative "
                                                                "values") from None
            desc = f"baseline {args.method}"
        else:
            try:
                res = B.upsample_scan(img, args.scale, args.method, args.axis)
            except ValueError as e:
                raise CaseError(case.source or case.id, str(e), "use --axis inplane for single-slice images") from None
            info = {"method": args.method, "scale": args.scale, "axis": args.axis,
                    "shape_in": list(img.shape), "shape_out": list(res.shape),
                    "nonfinite_voxels": res.meta.get("nonfinite_voxels", 0)}
            desc = f"baseline {args.method} x{args.scale:g}"
        outs.append(res)
    if len(vols) > 1:
        info = {**info, "volumes": len(vols)}
    written = save_scan(stack_volumes(outs), out, reference=None if is_nifti(out) else source_reference(vols),
                        description=desc, replace=args.overwrite, owned=resume.owned)
    resume.finish([written])
    return {"outputs": [str(written)], "params": info, **({"warnings": warns} if warns else {})}



def _options(args: argparse.Namespace) -> dict:
    """The options that change a baseline's result (recorded beside each output; resume compares them)."""
    if args.task == "denoise":
        opts = {"task": "denoise", "method": args.method, "dims": args.dims, "volume": args.volume,
                **({"noise": "rician"} if args.noise == "rician" else {})}
        if args.method == "gaussian":
            opts["filter_sigma"] = args.filter_sigma
        else:
            opts["sigma"] = args.sigma
        return opts
    return {"task": "sr", "method": args.method, "scale": args.scale, "axis": args.axis, "volume": args.volume}


def run(args: argparse.Namespace) -> int:
    _check(args)
    src, out = Path(args.input), Path(args.output)
    common.check_in_out(src, out)
    common.check_out_writable(out)
    found = common.find_inputs(src)
    command = shlex.join(["medldm", "baseline", *sys.argv[2:]]) if len(sys.argv) > 2 else "medldm baseline"
    targets, report = common.plan_outputs(found, out, args, "baseline", single=common.single_case(src, out, found.cases),
                                   fmt=args.to, report_name=REPORT_NAME)
    options = _options(args)

    @common.once_per_case
    def resume(case) -> common.Resume:
        t = targets[case.id]
        key = {"command": "baseline", "options": {**options, "output_kind": "nifti" if is_nifti(t) else "dicom"},
               "inputs": common.case_signature(case)}
        return common.Resume(t, key, source=common.case_source(case))

    status, _ = common.run_cases(found.cases, lambda c: _process(c, targets[c.id], args, resume(c)), name=str,
                          is_done=lambda c: resume(c).check(args.overwrite), report_path=report, desc="baseline",
                          command=command, quiet=args.quiet)
    return status
