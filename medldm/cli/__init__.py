"""One entry point, sub-commands. Each sub-command lives in ``medldm/cli/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int`` (exit status: 0 all done, 1 some cases failed,
2 usage error). Heavy imports (torch, monai) happen inside ``run`` so ``medldm --help`` is fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from medldm import __version__
from medldm.cli.warn import one_line, route_logging, route_warnings
from medldm.io.errors import CaseError, UsageError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("medldm.cli.info", "describe scans (NIfTI files, DICOM series): geometry, intensities, warnings"),
    "convert": ("medldm.cli.convert", "convert NIfTI <-> DICOM series"),
    "degrade": ("medldm.cli.degrade", "make degraded copies (noise, low-dose CT, down-sampling, thick slices)"),
    "evaluate": ("medldm.cli.evaluate", "PSNR/SSIM/MS-SSIM of predictions against references, with an HTML report"),
    "baseline": ("medldm.cli.baseline", "classical denoising / super-resolution baselines"),
    "plan": ("medldm.cli.plan", "plan a training config from a folder of scans (fingerprint, reasons); --check: integrity report"),
    "train": ("medldm.cli.train", "train a VAE and/or latent diffusion model from a YAML config"),
    "enhance": ("medldm.cli.enhance", "denoise or super-resolve scans with a trained model"),
    "synthesize": ("medldm.cli.synthesize", "generate synthetic scans"),
    "audit": ("medldm.cli.audit", "audit synthetic scans: memorization, diversity, realism (HTML report)"),
    "models": ("medldm.cli.models", "list shipped models"),
    "demo": ("medldm.cli.demo", "run the main job on shipped sample scans and write an HTML report"),
    "listen": ("medldm.cli.listen", "DICOM node (C-STORE SCP): enhance each received series and send it on"),
}


def _modules() -> dict[str, object]:
    """Every sub-command's module: a broken or missing one is an error, never a silently absent command."""
    return {name: importlib.import_module(modname) for name, (modname, _) in COMMANDS.items()}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="medldm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medldm {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show library warnings in full, as Python prints them (default: one WARNING line each, "
                             "harmless ones dropped; -W / PYTHONWARNINGS also keep Python's display), and "
                             "medldm's debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = _modules()
    for name, mod in mods.items():
        p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
        mod.add_arguments(p)
    return parser, mods


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--window -160,240`` -> ``--window=-160,240``: argparse would take a value that starts with '-'
    for an option (HU windows and negative levels are common)."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"^-\d", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    # Python warnings (nibabel, numpy, pydicom, MONAI, torch ...): one WARNING line each, from start to end
    with route_warnings(verbose="--verbose" in argv):
        return _main(argv)


def _log_level(args: argparse.Namespace) -> int:
    """medldm's messages: INFO by default, WARNING with a command's --quiet, DEBUG with --verbose."""
    if getattr(args, "verbose", False):
        return logging.DEBUG
    return logging.WARNING if getattr(args, "quiet", False) else logging.INFO


def _main(argv: list[str]) -> int:
    parser, mods = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    with route_logging(_log_level(args)):
        return _run(mods[args.command], args)


def _run(mod, args: argparse.Namespace) -> int:
    try:
        return int(mod.run(args) or 0)
    except UsageError as e:
        print(f"medldm {args.command}: error: {one_line(e, None)}", file=sys.stderr)
        return 2
    except CaseError as e:  # a model folder or option value found unusable outside the case loop
        print(f"medldm {args.command}: error: {one_line(e.line(), None)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"medldm {args.command}: error: out of memory — process fewer or smaller scans at a time "
              "(e.g. a smaller --size or --batch-size)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
