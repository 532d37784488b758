"""``medldm degrade IN OUT --kind K --level X [--seed S]``: seeded degraded copies of clean scans.

IN is a NIfTI file, a DICOM file or series folder, or a folder of cases (NIfTI files, DICOM series);
OUT is the output file/folder for one scan, or a folder mirroring IN's cases in the same format
(DICOM inputs -> derived DICOM series "degraded <kind> <level>" of the source). Levels:

* ``gaussian``, ``rician``: noise sigma as a fraction of the intensity range (p99.5 - p0.5), e.g. 0.05;
* ``lowdose``: dose fraction in (0, 1], e.g. 0.25 = quarter dose (CT in HU only);
* ``downsample``: in-plane factor > 1, e.g. 2 or 4 (``--restore`` back to the original grid);
* ``thick``: slices averaged per thick slice, integer >= 2, along ``--axis`` (default 2 = Z).

Each output gets a sidecar ``<output name>.degradation.json`` (kind, level, seeds, options, input; under
``resume`` the input files' sizes and mtimes), written last: it is the case's resume record. The noise of
case ``c`` is drawn from ``SeedSequence([seed, crc32(c)])``, so cases differ and a rerun with the same
``--seed`` reproduces every file. Failed cases are listed one line each and in
``OUT/medldm-degrade-report.json``. A rerun skips a case only when its sidecar matches the inputs and the
degradation; another degradation (or a different ``--seed``) or an output without sidecar fails that case
with one line (``--overwrite`` replaces only that output). An existing folder of other files is never
replaced; OUT must not be, contain or lie inside IN. Exit status: 0 all done, 1 some cases failed,
2 usage error. See docs/guarantees.md.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import zlib
from pathlib import Path

import numpy as np

from medldm import __version__
from medldm.cli import common
from medldm.cli.common import add_deidentify_argument
from medldm.cli.warn import print_case_warnings
from medldm.io.errors import CaseError, UsageError
from medldm.io.formats import is_nifti, sibling_path
from medldm.io.volumes import load_volumes, source_reference, stack_volumes
from medldm.io.writer import save_scan

REPORT_NAME = "medldm-degrade-report.json"
KINDS = ("gaussian", "rician", "lowdose", "downsample", "thick")
_HINTS = {
    "lowdose": "use --kind gaussian or rician for MR and other non-CT scans",
    "thick": "thick slices need a 3D volume with at least --level slices along --axis",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="NIfTI file, DICOM file or series folder, or a folder of cases")
    p.add_argument("output", metavar="OUT", help="output .nii/.nii.gz file or DICOM series folder for one scan, "
                                                 "or a folder mirroring IN's cases")
    p.add_argument("--kind", required=True, choices=KINDS, help="degradation (see docs/degradations.md)")
    p.add_argument("--level", required=True, type=float, metavar="X",
                   help="gaussian/rician: sigma fraction of the intensity range; lowdose: dose fraction in (0, 1]; "
                        "downsample: in-plane factor > 1; thick: slices per thick slice (integer >= 2)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (default: a fresh one, printed and recorded in each sidecar)")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2),
                   help="slice axis: thick slices are stacked along it; downsample/lowdose work in the planes "
                        "across it (default 2 = Z)")
    p.add_argument("--restore", choices=("linear", "cubic"),
                   help="downsample/thick: resample the result back to the original grid")
    p.add_argument("--method", choices=("area", "gaussian"), default="area",
                   help="downsample: area average (default) or skimage-style Gaussian anti-aliasing")
    p.add_argument("--i0", type=float, default=None, metavar="PHOTONS",
                   help="lowdose: full-dose photons per detector bin per view (default 1e5)")
    p.add_argument("--full-dose-noise", type=float, default=None, metavar="HU",
                   help="lowdose: noise std (HU) of the input scan, e.g. measured in a uniform region; sets I0 so "
                        "the model's full-dose noise matches it (overrides --i0's scale)")
    p.add_argument("--electronic-noise", type=float, default=0.0, metavar="SIGMA",
                   help="lowdose: electronic noise std in photons (default 0)")
    p.add_argument("--device", default=None, help="lowdose: torch device for the projector, e.g. cuda (default cpu)")
    p.add_argument("--volume", type=int, metavar="K", help="4D input: degrade volume K only (0-based; default: "
                                                            "every volume, as one 4D output)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_deidentify_argument(p)



def sidecar_path(out: Path) -> Path:
    """``OUT/x.nii.gz`` -> ``OUT/x.degradation.json``; DICOM folder ``OUT/x`` -> ``OUT/x.degradation.json``."""
    return sibling_path(out, ".degradation.json")


def case_seed(seed: int, case_id: str) -> int:
    """Per-case seed: ``SeedSequence([seed, crc32(case_id)])`` -> one 32-bit integer."""
    return int(np.random.SeedSequence([seed, zlib.crc32(case_id.encode())]).generate_state(1)[0])


def _options(args: argparse.Namespace) -> dict:
    if args.kind == "lowdose":
        opts: dict = {"electronic_noise": args.electronic_noise}
        if args.i0 is not None:
            opts["i0"] = args.i0
        if args.full_dose_noise is not None:
            opts["full_dose_noise"] = args.full_dose_noise
        if args.device:
            opts["device"] = args.device
        return opts
    if args.kind == "downsample":
        return {"method": args.method, "restore": args.restore}
    if args.kind == "thick":
        return {"restore": args.restore}
    return {}


def _job(args: argparse.Namespace, seed: int) -> dict:
    opts = {k: v for k, v in _options(args).items() if k != "device"}
    return {"kind": args.kind, "level": float(args.level), "seed": seed, "axis": args.axis, "options": opts}


def _degrade_one(case, out: Path, args: argparse.Namespace, seed: int, resume, deidentify=False) -> dict:
    # lazy: keeps medldm --help free of torch
    from medldm.data.degrade import apply_degradation
    vols = load_volumes(case, args.volume)  # a 4D case: every volume (its own seed), written as one 4D result
    img = vols[0]
    warns = print_case_warnings(case, img)
    cseed = case_seed(seed, case.id)
    degs = []
    for t, v in enumerate(vols):
        try:
            degs.append(apply_degradation(v, args.kind, args.level, cseed + t, axis=args.axis, **_options(args)))
        except ValueError as e:
            hint = _HINTS.get(args.kind) if args.kind != "lowdose" or "Hounsfield" in str(e) else None
            raise CaseError(case.source or case.id, str(e), hint or "see docs/degradations.md") from e
    record = dict(degs[0].meta["degradation"])
    deg = stack_volumes(degs)
    if len(vols) > 1:
        record["volumes"] = len(vols)
        record["volume_seeds"] = f"case_seed + volume index ({cseed} .. {cseed + len(vols) - 1})"
    record.update({"seed": seed, "case_seed": cseed, "case": case.id, "input": case.source or str(case.paths[0]),
                   "output": str(out), "medldm": __version__, "input_shape": list(img.shape),
                   "output_shape": list(deg.shape), "input_spacing": list(img.meta.get("spacing", ())),
                   "output_spacing": list(deg.meta.get("spacing", ()))})
    deg.meta["degradation"] = record
    save_scan(deg, out, reference=None if is_nifti(out) else source_reference(vols),
              description=f"degraded {args.kind} {args.level:g}",
              replace=args.overwrite, owned=resume.owned, deidentify=deidentify)
    side = resume.finish([out], json.loads(json.dumps(record, default=str)))  # last: marks the case done
    return {"outputs": [str(out), str(side)], **({"warnings": warns} if warns else {})}


def run(args: argparse.Namespace) -> int:
    # lazy: keeps medldm --help free of torch
    from medldm.data.degrade import check_level

    src, out = Path(args.input), Path(args.output)
    try:
        check_level(args.kind, args.level)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.seed is not None and args.seed < 0:
        raise UsageError("--seed must be >= 0")
    if args.volume is not None and args.volume < 0:
        raise UsageError("--volume must be >= 0")
    if args.kind == "lowdose" and args.i0 is not None and not args.i0 > 0:
        raise UsageError("--i0 must be > 0")
    if args.kind == "lowdose" and args.full_dose_noise is not None and not args.full_dose_noise > 0:
        raise UsageError("--full-dose-noise must be > 0 HU")
    if args.deidentify and is_nifti(out):
        raise UsageError("--deidentify applies to DICOM output only (NIfTI output carries no DICOM identifiers)")
    common.check_in_out(src, out)
    common.check_out_writable(out)
    found = common.find_inputs(src)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    if args.seed is None and not args.quiet:
        print(f"degrade: --seed {seed} (pass it to reproduce this run)", file=sys.stderr)
    job = _job(args, seed)
    command = "medldm degrade " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "medldm degrade"

    single = common.single_case(src, out, found.cases)
    target, report = common.plan_outputs(found, out, args, "degrade", single=single, report_name=REPORT_NAME,
                                  single_report=False, single_record=sidecar_path(out))

    deid = common.deidentifier(args)

    @common.once_per_case
    def resume(case) -> common.Resume:
        dest = target[case.id]
        key_opts = {**job, "deidentify": bool(args.deidentify)} if not is_nifti(dest) else job
        return common.Resume(dest, {"command": "degrade", "options": key_opts, "inputs": common.case_signature(case)},
                      record=sidecar_path(dest), source=common.case_source(case), nest=True)

    def process(case):
        return _degrade_one(case, target[case.id], args, seed, resume(case), deidentify=deid)

    def is_done(case) -> bool:
        return resume(case).check(args.overwrite)

    status, _ = common.run_cases(found.cases, process, name=str, is_done=is_done, report_path=report,
                          desc="degrade", command=command, quiet=args.quiet)
    return status
