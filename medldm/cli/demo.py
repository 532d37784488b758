"""``medldm demo [-o DIR] [--quick]``: enhancement on real held-out scans, evaluated, in one HTML report."""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("-o", "--output", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="small crops of the scans (a smoke test, ~1 minute)")
    p.add_argument("--seed", type=int, default=0, help="seed of the degradations")


def run(args) -> int:
    # lazy: keeps medldm --help free of torch
    from medldm.demo import run_demo

    report = Path(args.output) / "report.html"
    print(f"medldm demo: the report will be at {report.resolve()}", file=sys.stderr)
    path = run_demo(args.output, quick=args.quick, seed=args.seed)
    print(f"medldm demo: done — open {path.resolve()}")
    return 0
