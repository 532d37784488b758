"""``medldm train CONFIG.yaml -o OUT_DIR [--set key=value ...] [--resume] [--dry-run]``."""

from __future__ import annotations

import argparse

import yaml

from medldm.config import ConfigError, to_mapping
from medldm.io.errors import CaseError, UsageError
from medldm.train import train
from medldm.train.schema import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (see configs/ and docs/training.md)")
    p.add_argument("-o", "--out", required=True, help="output folder: checkpoints, logs, images, model folders")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ldm_train.steps=2000 (value parsed as YAML; repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, build the networks, load one batch, run one step per stage and print "
                        "parameter counts, step time, peak memory and a wall-time estimate; writes nothing")
    p.add_argument("--tiny", action="store_true",
                   help="with --dry-run: batch 1, the smallest patch, 1 sampling step (a quick check that the config "
                        "builds and runs; its times are not the run's)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    if args.print_config:
        print(yaml.safe_dump(to_mapping(cfg), sort_keys=False))
        return 0
    if args.dry_run:
        # lazy: keeps medldm --help and train --print-config free of torch
        from medldm.train.dry_run import dry_run, format_report

        try:
            fig = dry_run(cfg, args.out, tiny=args.tiny)
        except ConfigError as e:
            raise UsageError(str(e)) from e
        except CaseError as e:
            raise UsageError(e.line()) from e
        except ValueError as e:
            raise UsageError(str(e)) from e
        print(format_report(fig, args.out))
        return 0
    try:
        train(cfg, args.out, resume=args.resume)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    except CaseError as e:
        raise UsageError(e.line()) from e
    return 0
