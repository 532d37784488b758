"""``medldm convert IN OUT``: NIfTI <-> DICOM series.

One scan: IN is a NIfTI file, a DICOM file, or a folder holding one DICOM series; OUT ending in
``.nii``/``.nii.gz`` is a NIfTI file, anything else a DICOM series folder (a new one: an existing folder
holding other files is a usage error, never replaced). DICOM -> DICOM writes a derived series of the
source; NIfTI -> DICOM writes a new anonymous series, or a derived series of ``--reference`` (the DICOM
series the image came from).

Many scans: IN is a folder holding several cases (NIfTI files, DICOM series); OUT is a folder that
mirrors them (``--to`` picks the output kind; default: the other kind of each input). Failed cases
are listed one line each and in ``OUT/medldm-convert-report.json``.

Every output gets a record ``<output name>.medldm.json`` (input files, options), written last. A rerun
skips a case only when its record matches; an output made from other inputs/options, or without record,
fails that case with one line (``--overwrite`` replaces only that output). OUT must not be, contain or lie
inside IN. Exit status: 0 all converted, 1 some failed, 2 usage error. See docs/guarantees.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medldm.cli import common
from medldm.cli.common import add_deidentify_argument, case_signature, file_signature
from medldm.cli.remote import add_remote_arguments, open_remote, store_remote_output
from medldm.cli.warn import print_case_warnings
from medldm.io.errors import CaseError, UsageError
from medldm.io.formats import is_nifti
from medldm.io.volumes import load_volumes, source_reference, stack_volumes
from medldm.io.writer import save_scan

REPORT_NAME = "medldm-convert-report.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="NIfTI file, DICOM file or series folder, or a folder of cases")
    p.add_argument("output", metavar="OUT", help="output .nii/.nii.gz file, DICOM series folder, or a folder "
                                                 "of outputs when IN holds several cases")
    p.add_argument("--reference", metavar="DICOM_DIR",
                   help="source DICOM series of a NIfTI input: write a derived series of the same patient/study")
    p.add_argument("--volume", type=int, metavar="K", help="4D input: convert volume K only (0-based; default: "
                                                            "every volume, as one 4D output)")
    p.add_argument("--to", choices=("nifti", "dicom"), help="output kind for a folder of cases "
                                                            "(default: NIfTI for DICOM inputs, DICOM for NIfTI inputs)")
    p.add_argument("--description", default="convert",
                   help="added to the DICOM SeriesDescription as '[medldm <description>]' (default: convert)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_deidentify_argument(p)
    add_remote_arguments(p)



def _convert_one(case, out: Path, *, reference, volume: int | None, description: str, resume,
                 overwrite: bool, deidentify=False) -> dict:
    """Load one case and write it to ``out`` (NIfTI file or DICOM folder), then its record."""
    vols = load_volumes(case, volume, as_numpy=True)  # numpy only: converting needs no torch or MONAI
    img = stack_volumes(vols)  # a 4D series -> one 4D NIfTI / one derived 4D series
    warns = print_case_warnings(case, img)
    if not is_nifti(out) and reference is None:
        reference = source_reference(vols)  # DICOM -> DICOM: derived series of the source (None for NIfTI input)
    img.meta["provenance"] = {"task": "convert", "description": description}  # same derived UIDs on a re-run
    save_scan(img, out, reference=None if is_nifti(out) else reference, description=description,
              replace=overwrite, owned=resume.owned, deidentify=deidentify)
    resume.finish([out])
    return {"outputs": [str(out)], **({"warnings": warns} if warns else {})}


def _key(case, out: Path, args: argparse.Namespace, reference) -> dict:
    opts: dict = {"volume": args.volume, "output_kind": "nifti" if is_nifti(out) else "dicom"}
    if not is_nifti(out):
        opts["description"] = args.description
        opts["deidentify"] = bool(args.deidentify)
        if reference is not None:
            ref = Path(reference)
            files = sorted(f for f in ref.rglob("*") if f.is_file()) if ref.is_dir() else [ref]
            opts["reference"] = [(d["rel"], d["size"], d["mtime_ns"]) for d in file_signature(files, ref)]
    return {"command": "convert", "options": opts, "inputs": case_signature(case)}


def run(args: argparse.Namespace) -> int:
    try:
        src, out, remote_in, remote_out = open_remote(args, "convert")
    except CaseError as e:
        print(f"medldm convert: error: {e.line()}", file=sys.stderr)
        return 1
    if args.volume is not None and args.volume < 0:
        raise UsageError("--volume must be >= 0")
    if args.reference is not None:
        if not Path(args.reference).exists():
            raise UsageError(f"--reference {args.reference}: no such file or folder")
        if is_nifti(out):
            raise UsageError("--reference applies to DICOM output only (OUT ends in .nii/.nii.gz)")
    if args.deidentify and (is_nifti(out) or args.to == "nifti"):
        raise UsageError("--deidentify applies to DICOM output only (NIfTI output carries no DICOM identifiers)")
    common.check_in_out(src, out)
    common.check_out_writable(out)
    found = remote_in.found if remote_in else common.find_inputs(src)
    command = "medldm convert " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "medldm convert"

    single = not remote_in and not remote_out and common.single_case(src, out, found.cases)
    if not single and args.reference is not None:
        raise UsageError("--reference needs a single input scan; IN holds several cases")
    reference = args.reference if single else None
    targets, report = common.plan_outputs(found, out, args, "convert", single=single, report_name=REPORT_NAME,
                                   fmt=lambda c: args.to or ("dicom" if c.kind == "nifti" else "nifti"),
                                   single_report=False)

    deid = common.deidentifier(args)

    @common.once_per_case
    def resume(case) -> common.Resume:
        t = targets[case.id]
        return common.Resume(t, _key(case, t, args, reference), source=common.case_source(case))

    def process(case):
        return _convert_one(case, targets[case.id], reference=reference, volume=args.volume,
                            description=args.description, resume=resume(case), overwrite=args.overwrite,
                            deidentify=deid)

    status, _ = common.run_cases(found.cases, process, name=str, is_done=lambda c: resume(c).check(args.overwrite),
                          report_path=report, desc="convert", command=command, quiet=args.quiet)
    if remote_out:  # STOW-RS the derived series (a series the server holds already is skipped)
        s2, _ = store_remote_output(remote_out, [t for t in targets.values() if t.is_dir()], quiet=args.quiet)
        status = max(status, s2)
    return status
