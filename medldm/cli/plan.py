"""``medldm plan DATA... --task TASK -o PLAN.yaml [--gpu-memory GiB] [--hours H] [--device cpu|cuda]``
and ``medldm plan DATA... --check [-o REPORT]``.

Plan: fingerprint the scans (PLAN.fingerprint.json), decide a training config with a reason per decision, and
write PLAN.yaml — a normal config for ``medldm train PLAN.yaml -o RUN``. Check: the same fingerprint as an
integrity report (REPORT.html + REPORT.json); exit 1 when something blocks training. DATA may also be a
training config (YAML): its data.train / data.val are checked, including train/validation overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medldm import __version__
from medldm.config import ConfigError
from medldm.io.errors import UsageError
from medldm.plan.check import check, write_report
from medldm.train.schema import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="folders (walked recursively) or scans; with --check also a training YAML")
    p.add_argument("--task", choices=["denoise", "sr", "thinslice", "synthesis"], default="denoise",
                   help="what the model will learn (thinslice: 2D thick -> thin slices, as mr-thinslice-4x)")
    p.add_argument("-o", "--out", help="plan: PLAN.yaml (default plan.yaml); --check: report base name "
                                       "(default dataset_check -> dataset_check.html + .json)")
    p.add_argument("--val", nargs="+", default=None, help="validation folders of OTHER subjects (default: split by subject)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB", help="memory of the training GPU "
                   "(default: this GPU's; 24 for cuda without a GPU here, 8 for cpu)")
    p.add_argument("--hours", type=float, default=None, help="training time budget (default 24 on cuda, 4 on cpu)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="the training device")
    p.add_argument("--check", action="store_true", help="write the dataset integrity report instead of a plan; "
                   "exit 1 when something blocks training")
    p.add_argument("--no-measure", action="store_true", help="skip the measured step (memory model uncalibrated, "
                   "default step counts)")
    p.add_argument("--cache", default=None, help="fingerprint cache file (default ~/.cache/medldm/fingerprint.json; "
                   "'none' for no cache)")
    p.add_argument("--workers", type=int, default=None, help="parallel readers (default: CPU count + 2, at most 8)")
    p.add_argument("--quiet", action="store_true", help="only errors")


def _fp(paths: list[str], args) -> dict:
    # lazy: keeps medldm --help free of torch
    from medldm.data.datasets import resolve_path
    from medldm.plan.fingerprint import default_cache, fingerprint

    cache = None if (args.cache or "").lower() == "none" else (args.cache or default_cache())
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
    return fingerprint([resolve_path(p) for p in paths], workers=args.workers, cache=cache, say=say)


def run(args: argparse.Namespace) -> int:
    data, val = list(args.data), args.val
    patch, slice_axis = None, 2
    if len(data) == 1 and data[0].lower().endswith((".yaml", ".yml")):
        if not args.check:
            raise UsageError(f"{data[0]}: a config is checked with --check; plan from the scan folders")
        try:
            cfg = load_config(data[0])
        except ConfigError as e:
            raise UsageError(str(e)) from e
        data, val = list(cfg.data.train), (list(cfg.data.val) or None)
        patch, slice_axis = list(cfg.data.patch_size), cfg.data.slice_axis
        if not data:
            raise UsageError(f"{args.data[0]}: data.train is empty")
    fp = _fp(data, args)
    val_fp = _fp(val, args) if val else None
    say = (lambda s: None) if args.quiet else print
    if args.check:
        if patch is None and fp["scans"]:
            # lazy: keeps medldm --help free of torch
            from medldm.plan.decisions import make_plan

            try:
                pl = make_plan(fp, args.task, gpu_memory=args.gpu_memory, device=args.device, measure=False)
                patch, slice_axis = pl.config["data"]["patch_size"], pl.config["data"]["slice_axis"]
            except ValueError:
                patch = None
        rep = check(fp, patch=patch, slice_axis=slice_axis, val_fp=val_fp)
        jpath, hpath = write_report(rep, fp, args.out or "dataset_check")
        for p in rep["problems"]:
            say(f"{p['severity'].upper():5} {p['kind']}: {p['message']}")
            for s in p["scans"][:5]:
                say(f"        {s}")
            if len(p["scans"]) > 5:
                say(f"        ... {len(p['scans']) - 5} more")
        say(f"{rep['n_scans']} scans checked: {'BLOCKING problems' if rep['blocking'] else 'nothing blocks training'}"
            f"; report {hpath} (+ {jpath.name})")
        return 1 if rep["blocking"] else 0
    # lazy: keeps medldm --help free of torch
    from medldm.plan.decisions import make_plan
    from medldm.plan.write import write_plan

    out = Path(args.out or "plan.yaml")
    if out.suffix not in (".yaml", ".yml"):
        raise UsageError(f"{out}: the plan is a YAML file (-o PLAN.yaml)")
    try:
        pl = make_plan(fp, args.task, gpu_memory=args.gpu_memory, hours=args.hours, device=args.device,
                       measure=not args.no_measure, val_fp=val_fp)
    except ValueError as e:
        raise UsageError(str(e)) from e
    fpath = out.with_name(out.name.rsplit(".", 1)[0] + ".fingerprint.json")
    fpath.parent.mkdir(parents=True, exist_ok=True)
    fpath.write_text(json.dumps({**fp, "measurement": pl.measurement, "split": pl.split}, indent=1, default=str))
    header = [f"medldm {__version__} plan for {', '.join(args.data)} (task {args.task}): {len(fp['scans'])} scans, "
              f"{fp['summary'].get('n_subjects', 0)} subjects; fingerprint in {fpath.name}",
              f"Run:  medldm train {out} -o RUN   (check first: medldm train {out} -o RUN --dry-run)",
              "Every decision below carries its reason; edit freely, the file is a normal training config."]
    if fp["skipped"]:
        header.append(f"{len(fp['skipped'])} file(s) skipped as unreadable (see the fingerprint)")
    try:
        write_plan(pl, out, header)
    except ConfigError as e:
        raise UsageError(f"the planned config is invalid ({e}) — please report this") from e
    say(f"{len(fp['scans'])} scans, {len(fp['skipped'])} skipped; plan written to {out} (fingerprint {fpath})")
    for n in pl.notes:
        say(f"note: {n}")
    return 0
