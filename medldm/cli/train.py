"""``medldm train CONFIG.yaml -o OUT_DIR [--set key=value ...] [--resume]``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (see configs/ and docs/training.md)")
    p.add_argument("-o", "--out", required=True, help="output folder: checkpoints, logs, images, model folders")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ldm_train.steps=2000 (value parsed as YAML; repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from medldm.config import ConfigError, to_mapping
    from medldm.io.errors import CaseError, UsageError
    from medldm.train.schema import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    if args.print_config:
        print(yaml.safe_dump(to_mapping(cfg), sort_keys=False))
        return 0
    from medldm.train import train

    try:
        train(cfg, args.out, resume=args.resume)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    except CaseError as e:
        raise UsageError(e.line()) from e
    return 0
