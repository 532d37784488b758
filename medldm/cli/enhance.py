"""``medldm enhance``: denoise or super-resolve scans with a trained model folder.

    medldm enhance -m MODEL -i IN -o OUT [--steps N] [--sampler NAME] [--samples K] [--batch-size B]
                   [--device D] [--seed S] [--noise-level L] [--axis A] [--to nifti|dicom] [--overwrite]

IN is a scan (NIfTI file, DICOM file or series folder: OUT names the output itself, docs/guarantees.md) or a
folder of cases (mixed is fine); OUT mirrors IN
(NIfTI stays NIfTI, a DICOM series becomes a derived DICOM series of its source; ``--to`` changes the kind),
geometry preserved (super-resolution: spacing scaled, physical extent kept), intensities back in the original
units and dtype. Options not given take the pipeline's defaults (``medldm.pipelines.enhance.EnhanceOptions``), the
ones ``medldm.shipped.enhance`` and ``medldm demo`` use too: the model's sampler and steps, and 2D slices as well as
3D volumes in overlapping latent windows of twice the training size. ``--samples K`` > 1 writes the posterior mean
and, beside it, ``<name>_std.nii.gz`` (per-voxel standard deviation, same grid); the run report warns where
uncertainty is high. Each output gets a record ``<output name>.medldm.json`` (input files; model path and hash of
its weights and config; seed, steps, sampler, samples, noise level, axis, refine, latent window and overlap),
written last: a rerun skips a case only when its record matches, and an output made with another model or options
fails that case with one line (``--overwrite`` replaces only that output). One scan in: the run report is ``<OUT name>.medldm-enhance-report.json`` beside OUT.
Under ``torchrun --nproc_per_node=K -m medldm enhance ...`` the cases are sharded over the K processes (GPU
``cuda:{LOCAL_RANK % device_count}`` each when available); every rank writes its outputs and ``*.rank<r>.json`` report and rank 0
merges them into the run report. Exit status: 0 all done, 1 some failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from medldm.cli import common
from medldm.cli.common import CaseResult, add_deidentify_argument, write_report
from medldm.cli.remote import add_remote_arguments, open_remote, provenance, store_remote_output
from medldm.cli.warn import print_case_warnings
from medldm.io.errors import CaseError, UsageError
from medldm.io.formats import is_nifti, sibling_path
from medldm.io.volumes import load_volumes, source_reference, stack_volumes
from medldm.io.writer import save_scan
from medldm.models.config import SAMPLER_NAMES
from medldm.shipped import resolve_model

REPORT_NAME = "medldm-enhance-report.json"
#: ``--adapt`` without a value: seconds of fine-tuning per scan
ADAPT_SECONDS = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="MODEL", help="model folder written by `medldm train`, or a shipped model name (`medldm models`)")
    p.add_argument("-i", "--input", required=True, metavar="IN", help="scan or folder of cases")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output scan or folder (mirrors IN)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps (default: the model's, e.g. 20)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="draw K samples: write their mean and a per-voxel std map (default 1)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="2D slices per batch, and latent windows per denoiser call (default: the pipeline's, 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--noise-level", type=float, metavar="L",
                   help="denoising models: conditioning noise level in [0, 1] (default: estimated per scan)")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), help="2D models: array axis to slice along "
                                                               "(default: the training axis)")
    p.add_argument("--no-refine", action="store_true",
                   help="skip the model's pixel-space refiner (stage 3) even when the folder has one")
    p.add_argument("--adapt", type=float, nargs="?", const=ADAPT_SECONDS, default=None, metavar="SECONDS",
                   help="fine-tune a copy of the model's refiner on each scan first, self-supervised (denoise: "
                        "Recorrupted-to-Recorrupted with the estimated noise level; sr: the scan down-sampled "
                        f"further), for SECONDS per scan (default {ADAPT_SECONDS:g}); the adapted weights are "
                        "never saved; what it did is in the run report")
    p.add_argument("--adapt-steps", type=int, metavar="N",
                   help="with --adapt: stop after N optimizer steps instead of the time (repeatable anywhere)")
    p.add_argument("--volume", type=int, metavar="K", help="4D input: enhance volume K only (0-based; default: "
                                                            "every volume, written as one 4D result)")
    p.add_argument("--to", choices=("nifti", "dicom"), help="output kind (default: same as each input)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("--distributed", action="store_true",
                   help="shard the cases over the processes of `torchrun --nproc_per_node=K -m medldm enhance ...` "
                        "(implied when WORLD_SIZE > 1); rank 0 merges the run reports")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_deidentify_argument(p)
    add_remote_arguments(p)


def enhance_options(args: argparse.Namespace, device: str):
    """The pipeline's options for these arguments: what the user gave, the pipeline's defaults
    (``EnhanceOptions``, as ``medldm.shipped.enhance`` and ``medldm demo`` use them) for the rest; the model's
    defaults (steps, sampler, window) are filled in by ``runner.resolve``, once."""
    from medldm.pipelines.enhance import EnhanceOptions  # lazy: keeps `medldm --help` free of torch

    if (args.adapt is not None and args.adapt < 0) or (args.adapt_steps is not None and args.adapt_steps < 1):
        raise UsageError("--adapt SECONDS must be >= 0 and --adapt-steps N >= 1")
    given = {"steps": args.steps, "sampler": args.sampler, "samples": args.samples, "batch_size": args.batch_size,
             "seed": args.seed, "noise_level": args.noise_level, "axis": args.axis, "refine": not args.no_refine,
             "adapt": args.adapt, "adapt_steps": args.adapt_steps}
    return EnhanceOptions(device=device, **{k: v for k, v in given.items() if v is not None})


def std_path(out: Path) -> Path:
    """Where the uncertainty map of output ``out`` goes: ``<name>_std.nii.gz`` beside it."""
    return sibling_path(out, "_std.nii.gz")



def _check(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise UsageError("--samples must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.noise_level is not None and not 0.0 <= args.noise_level <= 1.0:
        raise UsageError("--noise-level must be in [0, 1]")
    if args.volume is not None and args.volume < 0:
        raise UsageError("--volume must be >= 0")


def _process(case, out: Path, enhancer, opts, desc: str, resume, overwrite: bool, deidentify=False,
             prov=None, volume: int | None = None) -> dict:
    vols = load_volumes(case, volume)  # a 4D case: every volume, enhanced one by one, written as one 4D result
    warns = print_case_warnings(case, vols[0])
    runs = [enhancer.enhance(img, opts) for img in vols]
    res = runs[0]
    if res.info.get("warning"):  # e.g. a scan outside the model's training domain
        warns += print_case_warnings(case, [res.info["warning"]])
    image = stack_volumes([r.image for r in runs])
    std = stack_volumes([r.std for r in runs]) if res.std is not None else None
    if len(runs) > 1:
        res.info["volumes"] = len(runs)
        res.info["clamped_voxels"] = sum(int(r.info.get("clamped_voxels") or 0) for r in runs)
    if prov is not None:  # DerivationDescription, ContributingEquipmentSequence, deterministic derived UIDs
        image.meta["provenance"] = prov(res.info)
    outputs = []
    written = save_scan(image, out, reference=None if is_nifti(out) else source_reference(vols), description=desc,
                        replace=overwrite, owned=resume.owned, deidentify=deidentify)
    if std is not None:
        outputs.append(str(save_scan(std, std_path(out), dtype="float32", replace=overwrite)))
    resume.finish([written, *outputs])
    info = {k: v for k, v in res.info.items() if k not in ("normalization", "warning")}
    info["normalization"] = {k: res.info["normalization"].get(k) for k in ("method", "lo", "hi", "original_dtype")}
    return {"outputs": [str(written), *outputs], "params": info, **({"warnings": warns} if warns else {}),
            **({"warning": res.info["warning"]} if "warning" in res.info else {})}


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        resolve_model(args.model)  # a wrong -m is reported before anything else is looked at
    except CaseError as e:
        raise UsageError(e.line()) from None
    try:
        src, out, remote_in, remote_out = open_remote(args, "enhance")
    except CaseError as e:  # the server could not be searched: nothing processed
        print(f"medldm enhance: error: {e.line()}", file=sys.stderr)
        return 1
    if args.deidentify and (is_nifti(out) or args.to == "nifti"):
        raise UsageError("--deidentify applies to DICOM output only (NIfTI output carries no DICOM identifiers)")
    common.check_in_out(src, out)
    common.check_out_writable(out)
    rank, world, local_rank = _dist_setup(getattr(args, "distributed", False))
    device = common.resolve_device(args.device, local_rank)
    model = common.open_model_or_exit(args.model, "enhance", device)
    enhancer = model.runner
    try:
        opts = enhancer.resolve(enhance_options(args, device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    desc = f"medldm {enhancer.task} ({model.name})"
    found = remote_in.found if remote_in else common.find_inputs(src)
    command = shlex.join(["medldm", "enhance", *sys.argv[2:]]) if len(sys.argv) > 2 else "medldm enhance"
    single = not (remote_in or remote_out) and common.single_case(src, out, found.cases)
    targets, report = common.plan_outputs(found, out, args, "enhance", single=single, fmt=args.to, report_name=REPORT_NAME)
    # what the outputs depend on, as resolved against the model (never None for "the model's default")
    options = {"model": str(model.path.resolve()), "model_hash": model.hash, "steps": opts.steps,
               "sampler": opts.sampler, "samples": opts.samples, "seed": opts.seed, "noise_level": opts.noise_level,
               "axis": args.axis, "refine": opts.refine, "volume": args.volume, "window": list(opts.window),
               "overlap": opts.overlap,
               # --adapt changes the result (and its seconds budget makes it machine-dependent): never reuse across it
               **({"adapt": opts.adapt, "adapt_steps": opts.adapt_steps} if opts.adapt or opts.adapt_steps else {})}

    @common.once_per_case
    def resume(case) -> common.Resume:
        t = targets[case.id]
        kind = {"output_kind": "nifti"} if is_nifti(t) else {"output_kind": "dicom", "deidentify": bool(args.deidentify)}
        key = {"command": "enhance", "options": {**options, **kind},
               "inputs": common.case_signature(case)}
        return common.Resume(t, key, extra=[std_path(t)] if args.samples > 1 else [], source=common.case_source(case))

    shard = found.cases[rank::world]
    rank_report = report if world == 1 else report.with_name(f"{report.stem}.rank{rank}.json")
    deid = common.deidentifier(args)
    def prov(info: dict) -> dict:
        return provenance(model.name, model.hash, enhancer.task, opts, info)

    status, results = common.run_cases(shard, lambda c: _process(c, targets[c.id], enhancer, opts, desc, resume(c),
                                                          args.overwrite, deid, prov, args.volume),
                                name=str, is_done=lambda c: resume(c).check(args.overwrite),
                                report_path=rank_report, desc="enhance", command=command,
                                quiet=args.quiet or rank > 0)
    if world > 1:
        status = _merge_ranks(report, world, rank, status, command)
    if remote_out and rank == 0:  # STOW-RS the derived series (a series the server holds already is skipped)
        s2, _ = store_remote_output(remote_out, [t for t in targets.values() if t.is_dir()], quiet=args.quiet)
        status = max(status, s2)
    return status


def _dist_setup(requested: bool) -> tuple[int, int, int]:
    """(rank, world size, local rank): joins a gloo group under torchrun (only barriers/reductions needed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if requested:
            raise UsageError("--distributed needs a launcher: torchrun --nproc_per_node=K -m medldm enhance ...")
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _merge_ranks(report: Path, world: int, rank: int, status: int, command: str) -> int:
    """Wait for every rank; rank 0 merges the per-rank reports into ``report``. Returns the global status."""
    import json

    import torch
    import torch.distributed as dist

    t = torch.tensor([status], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    status = int(t.item())
    if rank == 0:
        merged = []
        for r in range(world):
            part = report.with_name(f"{report.stem}.rank{r}.json")
            if part.exists():
                merged += [CaseResult(**c) for c in json.loads(part.read_text())["cases"]]
        write_report(report, merged, command=command, status=status)
        for r in range(world):
            report.with_name(f"{report.stem}.rank{r}.json").unlink(missing_ok=True)
    dist.barrier()
    dist.destroy_process_group()
    return status
