"""``medldm synthesize``: synthetic scans from a synthesis model folder, each with a provenance record.

    medldm synthesize -m MODEL -n N -o OUT [--condition class=K|NAME] [--guidance W] [--seed S]
                      [--format nifti|dicom] [--steps N] [--sampler NAME] [--size X,Y[,Z]] [--spacing MM]
                      [--mask LABELS.nii.gz] [--batch-size B]

Writes ``OUT/synth_00000.nii.gz`` (or DICOM series folders ``OUT/synth_00000/``: fresh UIDs, no patient
identifiers, "SYNTHETIC" in the series description) and ``OUT/synth_00000.json`` (model hash, resolved config,
seed, condition, guidance, sampler). Case i uses seed S + i, so a rerun (resume) or a larger N reproduces the
same scans. Exit status: 0 all done, 1 some failed, 2 usage error.

``--mask`` (mask-conditioned models, ``condition: mask``): every scan follows that label map and lies on its grid
(shape and affine); the map is copied beside each scan as ``OUT/synth_00000_labels.nii.gz``, so OUT holds
image/label pairs for augmentation studies.

Memory stays bounded for any N: scans are generated one at a time and written as they are made; the case list is
never built (``-n 1000000000`` starts writing at once) and the run report is updated after every ``--batch-size``
scans (default 64), so an interrupted run keeps its record and resumes from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import medldm
from medldm.cli.common import open_model_or_exit, resolve_device, run_cases
from medldm.io.atomic import atomic_file
from medldm.io.errors import CaseError, UsageError
from medldm.io.nifti import save_nifti
from medldm.io.reader import load_nifti
from medldm.io.writer import save_scan
from medldm.models.config import SAMPLER_NAMES

REPORT_NAME = "medldm-synthesize-report.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="MODEL", help="synthesis model folder (`medldm train`) or shipped model name (`medldm models`)")
    p.add_argument("-n", "--num", type=int, required=True, metavar="N", help="number of scans")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE",
                   help="class=K (index) or class=NAME (class-conditional models); or contrast=NAME and/or "
                        "position=B (slice-position bin, 0 = first along the slice axis) for models trained with "
                        "contrast / slice-position classes (`medldm models` lists the class names)")
    p.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance weight (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of scan 0; scan i uses seed + i (default 0)")
    p.add_argument("--format", choices=("nifti", "dicom"), default="nifti", help="output kind (default nifti)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps (default: the model's)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's")
    p.add_argument("--size", metavar="X,Y[,Z]", help="image size (default: the training size)")
    p.add_argument("--spacing", type=float, default=1.0, metavar="MM", help="voxel size in mm (default 1)")
    p.add_argument("--mask", metavar="LABELS.nii.gz",
                   help="label map (NIfTI, values 0..K-1, 0 = background; one slice for 2D models) the images follow "
                        "(mask-conditioned models); copied beside each scan as synth_NNNNN_labels.nii.gz")
    p.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="scans between run-report updates (default 64); scans are written one at a time as they are "
                        "made, so memory does not grow with -n")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _conditions(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--condition {it!r}: expected KEY=VALUE, e.g. class=1")
        k, v = it.split("=", 1)
        if k.strip() not in ("class", "contrast", "position"):
            raise UsageError(f"--condition {k!r}: unknown key; supported: class, contrast, position")
        out[k.strip()] = v.strip()
    if "class" in out and ({"contrast", "position"} & set(out)):
        raise UsageError("--condition: give class=... or contrast=/position=..., not both")
    return out


def _check(args: argparse.Namespace) -> None:
    """Option values that can be checked without the model (usage errors, exit 2)."""
    if args.num < 1:
        raise UsageError("-n must be >= 1")
    if not (math.isfinite(args.spacing) and args.spacing > 0):
        raise UsageError(f"--spacing {args.spacing:g}: must be a positive voxel size in mm, e.g. --spacing 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError("--guidance must be a finite number, e.g. 3")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1, e.g. --batch-size 64")


def _size(text: str | None) -> tuple[int, ...] | None:
    """``--size X,Y[,Z]`` -> positive integers (the model checks the count and the multiple)."""
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--size {text!r}: expected integers like 64,64") from None
    if any(v < 1 for v in size):
        raise UsageError(f"--size {text}: every value must be >= 1, e.g. 64,64")
    return size


@dataclass
class _Run:
    """One ``medldm synthesize`` run: the opened model and what every scan of it depends on."""

    args: argparse.Namespace
    out: Path
    opened: Any  # medldm.shipped.OpenedModel: .path, .bundle, .runner (a Synthesizer), .hash
    label: int | None
    steps: int
    sampler: str
    size: tuple[int, ...]
    mask: Any  # int64 label tensor (--mask) or None
    mask_affine: Any
    settings: dict  # what the scans depend on: a resumed run must match them

    def target(self, i: int) -> Path:
        return self.out / (f"synth_{i:05d}.nii.gz" if self.args.format == "nifti" else f"synth_{i:05d}")

    def record(self, i: int) -> Path:
        return self.out / f"synth_{i:05d}.json"

    def label_file(self, i: int) -> Path:
        return self.out / f"synth_{i:05d}_labels.nii.gz"

    def previous(self, i: int) -> dict | None:
        """The provenance record of an earlier run for scan i, None when there is none; a CaseError when OUT holds
        files of that name that synthesize did not write, or that were made with other settings."""
        args, dest, rec = self.args, self.target(i), self.record(i)
        keep = "move them away or choose another OUT: synthesize never replaces files it did not write"
        prev = _ours(rec, "model_hash") if rec.exists() or rec.is_symlink() else None
        if (rec.exists() or rec.is_symlink()) and prev is None:
            raise CaseError(rec, "exists and is not a medldm synthesize record", keep)
        if prev is None and (dest.exists() or dest.is_symlink()):
            raise CaseError(dest, f"exists and was not written by medldm synthesize (no {rec.name} beside it)", keep)
        if prev is not None:
            diff = [k for k, v in self.settings.items() if k != "format" and json.loads(json.dumps(v)) != prev.get(k)]
            if prev.get("seed") != args.seed + i:
                diff.insert(0, "seed")
            if prev.get("format", args.format) != args.format:
                diff.append("format")
            if diff:
                raise CaseError(dest if dest.exists() else rec,
                                f"an earlier run made this scan with other settings ({', '.join(diff)})",
                                "choose another OUT, or rerun with the earlier settings (see the .json record)")
        return prev

    def is_done(self, i: int) -> bool:
        try:
            return self.previous(i) is not None and self.target(i).exists()
        except CaseError:
            return False  # process() reports it

    def process(self, i: int) -> dict:
        args, syn, model, mask = self.args, self.opened.runner, self.opened.path, self.mask
        seed = args.seed + i
        self.previous(i)
        dest, rec = self.target(i), self.record(i)
        prov = {"synthetic": True, "medldm_version": medldm.__version__, "model": str(model.resolve()),
                "seed": seed, **self.settings, "intensity": syn.intensity, "config": self.opened.bundle.config}
        # the record first: a scan file without its record is never ours, so it is never replaced
        with atomic_file(rec) as tmp:
            tmp.write_text(json.dumps(prov, indent=2, default=str))
        try:
            img, _ = syn.generate(seed=seed, label=self.label, guidance=args.guidance, steps=self.steps,
                                  sampler=self.sampler, size=None if mask is not None else self.size,
                                  spacing=args.spacing, mask=mask, affine=self.mask_affine)
        except ValueError as e:
            raise CaseError(f"synth_{i:05d}", str(e), "check --size / --condition") from None
        if args.format == "nifti":
            save_nifti(img, dest)
        else:
            save_scan(img, dest, reference=None, description=f"SYNTHETIC medldm {model.name} seed {seed}")
        outputs = [str(dest), str(rec)]
        if mask is not None:  # the pair's label map: the same grid and affine as the image
            # lazy: keeps medldm --help free of torch
            import torch
            from monai.data import MetaTensor

            lab = mask[..., None] if mask.ndim == 2 else mask
            meta = {"original_ndim": syn.dims, "original_dtype": "uint8" if syn.mask_classes <= 255 else "int16"}
            save_nifti(MetaTensor(lab.float(), affine=torch.as_tensor(self.mask_affine), meta=meta),
                       self.label_file(i), dtype=np.uint8 if syn.mask_classes <= 255 else np.int16)
            outputs.append(str(self.label_file(i)))
        return {"outputs": outputs, "seed": seed}


def _prepare(args: argparse.Namespace) -> _Run:
    """Check the arguments, open the model and check the size it will sample (usage errors, before any case)."""
    # lazy: keeps medldm --help free of torch
    from medldm.pipelines.synthesize import SizeError

    _check(args)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    cond = _conditions(args.condition)
    size = _size(args.size)
    opened = open_model_or_exit(args.model, "synthesize", resolve_device(args.device))
    syn = opened.runner
    try:
        steps, sampler = syn.dcfg.sampling_options(args.steps, args.sampler)
        label = syn.label_index(cond.get("class") or syn.class_name_for(cond.get("contrast"), cond.get("position")))
        mask, mask_affine, mask_info = _load_mask(args.mask, syn) if args.mask else (None, None, None)
    except (CaseError, ValueError) as e:
        raise UsageError(e.line() if isinstance(e, CaseError) else str(e)) from None
    if mask is not None:
        if args.size:
            raise UsageError("--size and --mask: the label map sets the size; drop --size")
        size = syn.mask_size(mask)
    # what sampling and decoding will allocate, checked before the first case: a usage error, not N failures
    w = float(syn.dcfg.guidance if args.guidance is None else args.guidance)
    used_w = 1.0 if label is None or syn.num_classes == 0 else w
    try:
        size = syn.check_size(size, guidance=used_w)
    except SizeError as e:
        what = f"--size {args.size}" if args.size else f"the model's size {','.join(map(str, syn.size))}"
        raise UsageError(f"{what}: {e.reason}" if e.reason else str(e)) from None
    settings = {
        "model_hash": opened.hash, "condition": {"class": label, "class_name": syn.class_names[label]
                                                 if label is not None and label < len(syn.class_names) else None},
        "guidance": used_w, "sampler": sampler, "steps": steps, "shape": [*size, 1] if len(size) == 2 else list(size),
        "spacing_mm": args.spacing, "format": args.format, "mask": mask_info,
    }
    if mask is not None:
        settings["shape"] = list(mask.shape) + ([1] if mask.ndim == 2 else [])
        settings["spacing_mm"] = [float(v) for v in np.linalg.norm(mask_affine[:3, :3], axis=0)]
    return _Run(args, out, opened, label, steps, sampler, size, mask, mask_affine, settings)


def run(args: argparse.Namespace) -> int:
    job = _prepare(args)
    report = job.out / REPORT_NAME
    if report.exists() and _ours(report, "cases") is None:
        raise UsageError(f"{report} exists and was not written by medldm synthesize: move it away or choose "
                         "another OUT (synthesize never replaces files it did not write)")
    command = shlex.join(["medldm", "synthesize", *sys.argv[2:]]) if len(sys.argv) > 2 else "medldm synthesize"
    return _in_batches(args.num, args.batch_size, lambda cases: run_cases(
        cases, job.process, name=lambda i: f"synth_{i:05d}", is_done=job.is_done, report_path=report,
        desc="synthesize", command=command, quiet=args.quiet or args.num > args.batch_size)[0], quiet=args.quiet)


def _in_batches(n: int, batch: int, run_batch, *, quiet: bool = False) -> int:
    """``run_batch(range(a, b))`` over consecutive ranges of at most ``batch`` of the ``n`` cases (each call
    writes the scans it makes and merges its entries into the run report); the worst exit status."""
    status = 0
    for a in range(0, n, batch):
        status = max(status, run_batch(range(a, min(n, a + batch))))
        if not quiet and n > batch:
            logging.getLogger("medldm").info("synthesize: %d of %d scans processed", min(n, a + batch), n)
    return status


def _load_mask(path: str, syn):
    """``--mask`` -> (int64 label tensor of the model's dimensionality, its 4x4 RAS affine, provenance record)."""
    if not Path(path).is_file():
        raise UsageError(f"--mask {path}: no such file")
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        raise UsageError(f"--mask {path}: give the label map as a NIfTI file (.nii or .nii.gz)")
    data, affine, _ = load_nifti(path)
    try:
        mask = syn.mask_array(data)
    except ValueError as e:
        raise UsageError(f"--mask {path}: {e}") from None
    digest = hashlib.sha256(mask.numpy().tobytes() + np.asarray(affine, np.float64).tobytes()).hexdigest()
    counts = np.bincount(mask.numpy().ravel(), minlength=syn.mask_classes).tolist()
    return mask, np.asarray(affine, np.float64), {"path": str(Path(path).resolve()), "sha256": digest,
                                                  "shape": list(mask.shape), "voxels_per_label": counts}


def _ours(file: Path, key: str) -> dict | None:
    """``file`` parsed when it is a regular JSON file holding ``key`` (written by medldm), else None."""
    if not file.is_file() or file.is_symlink():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and key in data else None
