"""``medldm synthesize``: synthetic scans from a synthesis model folder, each with a provenance record.

    medldm synthesize -m MODEL -n N -o OUT [--condition class=K|NAME] [--guidance W] [--seed S]
                      [--format nifti|dicom] [--steps N] [--sampler NAME] [--size X,Y[,Z]] [--spacing MM]

Writes ``OUT/synth_00000.nii.gz`` (or DICOM series folders ``OUT/synth_00000/``: fresh UIDs, no patient
identifiers, "SYNTHETIC" in the series description) and ``OUT/synth_00000.json`` (model hash, resolved config,
seed, condition, guidance, sampler). Case i uses seed S + i, so a rerun (resume) or a larger N reproduces the
same scans. Exit status: 0 all done, 1 some failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from medldm.io.errors import UsageError

REPORT_NAME = "medldm-synthesize-report.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="MODEL", help="synthesis model folder (`medldm train`) or shipped model name (`medldm models`)")
    p.add_argument("-n", "--num", type=int, required=True, metavar="N", help="number of scans")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE",
                   help="class=K (index) or class=NAME (class-conditional models)")
    p.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance weight (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of scan 0; scan i uses seed + i (default 0)")
    p.add_argument("--format", choices=("nifti", "dicom"), default="nifti", help="output kind (default nifti)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps (default: the model's)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp_2m", "unipc", "euler_flow"), help="default: the model's")
    p.add_argument("--size", metavar="X,Y[,Z]", help="image size (default: the training size)")
    p.add_argument("--spacing", type=float, default=1.0, metavar="MM", help="voxel size in mm (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _conditions(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--condition {it!r}: expected KEY=VALUE, e.g. class=1")
        k, v = it.split("=", 1)
        if k.strip() != "class":
            raise UsageError(f"--condition {k!r}: unknown key; supported: class")
        out[k.strip()] = v.strip()
    return out


def run(args: argparse.Namespace) -> int:
    import medldm
    from medldm.cli.common import run_cases
    from medldm.cli.enhance import _device, _resolve_model
    from medldm.io.atomic import atomic_file
    from medldm.io.errors import CaseError
    from medldm.io.nifti import save_nifti
    from medldm.io.writer import save_scan
    from medldm.models import load_model, model_hash
    from medldm.pipelines.synthesize import Synthesizer

    if args.num < 1:
        raise UsageError("-n must be >= 1")
    model, out = Path(args.model), Path(args.output)
    model = _resolve_model(model)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    cond = _conditions(args.condition)
    size = None
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.split(","))
        except ValueError:
            raise UsageError(f"--size {args.size!r}: expected integers like 64,64") from None
    try:
        bundle = load_model(model)
        syn = Synthesizer(bundle, device=_device(args.device))
        label = syn.label_index(cond.get("class"))
    except (CaseError, ValueError) as e:
        raise UsageError(e.line() if isinstance(e, CaseError) else str(e)) from None
    mhash = model_hash(model)
    command = shlex.join(["medldm", "synthesize", *sys.argv[2:]]) if len(sys.argv) > 2 else "medldm synthesize"

    def target(i: int) -> Path:
        return out / (f"synth_{i:05d}.nii.gz" if args.format == "nifti" else f"synth_{i:05d}")

    def process(i: int) -> dict:
        seed = args.seed + i
        try:
            img, used = syn.generate(seed=seed, label=label, guidance=args.guidance, steps=args.steps,
                                     sampler=args.sampler, size=size, spacing=args.spacing)
        except ValueError as e:
            raise CaseError(f"synth_{i:05d}", str(e), "check --size / --condition") from None
        prov = {
            "synthetic": True, "medldm_version": medldm.__version__, "model": str(model.resolve()),
            "model_hash": mhash, "seed": seed, "condition": {"class": label,
                                                             "class_name": syn.class_names[label] if label is not None and label < len(syn.class_names) else None},
            "guidance": used["guidance"], "sampler": args.sampler or syn.dcfg.sampler,
            "steps": args.steps or syn.dcfg.sampling_steps, "shape": list(img.shape), "spacing_mm": args.spacing,
            "intensity": syn.intensity, "config": bundle.config,
        }
        dest = target(i)
        if args.format == "nifti":
            save_nifti(img, dest)
        else:
            save_scan(img, dest, reference=None, description=f"SYNTHETIC medldm {model.name} seed {seed}")
        with atomic_file(dest.parent / f"synth_{i:05d}.json") as tmp:
            tmp.write_text(json.dumps(prov, indent=2, default=str))
        return {"outputs": [str(dest), str(dest.parent / f"synth_{i:05d}.json")], "seed": seed}

    status, _ = run_cases(range(args.num), process, name=lambda i: f"synth_{i:05d}",
                          is_done=lambda i: target(i).exists() and (out / f"synth_{i:05d}.json").exists(),
                          report_path=out / REPORT_NAME, desc="synthesize", command=command, quiet=args.quiet)
    return status
