"""``medldm listen``: a DICOM node (C-STORE SCP) that enhances each series it receives and sends the result on.

    medldm listen --aet MEDLDM --port 11112 -m MODEL --forward AET@HOST:PORT [--out FOLDER] [--idle 10]
                  [--spool FOLDER] [--steps N] [--sampler S] [--seed S] [--device D]

Received instances are written to the spool (``--spool``, default ``<OUT>/spool``) before they are acknowledged.
A series is complete after ``--idle`` seconds without a new instance; it is then enhanced through the same code
as ``medldm enhance`` (``medldm.pipelines.enhance.Enhancer`` + ``medldm.io.writer.save_scan``: a derived series
of the same study with the provenance tags, see docs/pacs.md) into ``<OUT>/derived/<StudyUID>/<SeriesUID>``, and
sent with C-STORE to ``--forward``. A failed series is one line and the listener keeps going; Ctrl-C stops it,
and the next start processes every spooled series that was not done. Exit status: 0 after Ctrl-C, 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.cli.common import open_model_or_exit, resolve_device
from medldm.cli.remote import provenance
from medldm.io.dimse import Listener, parse_peer
from medldm.io.discover import scan_folder
from medldm.io.errors import CaseError, UsageError
from medldm.io.volumes import load_volumes, source_reference, stack_volumes
from medldm.io.writer import save_scan
from medldm.models.config import SAMPLER_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="MODEL",
                   help="model folder, or a shipped model name (`medldm models`)")
    p.add_argument("--aet", default="MEDLDM", help="this node's AE title (default MEDLDM)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default 11112)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all; 127.0.0.1: this machine)")
    p.add_argument("--forward", metavar="AET@HOST:PORT",
                   help="send each derived series there with C-STORE (e.g. the PACS the series came from)")
    p.add_argument("-o", "--out", default="medldm-listen", metavar="FOLDER",
                   help="working folder: spool/ (received) and derived/ (results); default ./medldm-listen")
    p.add_argument("--spool", metavar="FOLDER", help="where received instances are kept (default OUT/spool)")
    p.add_argument("--idle", type=float, default=10.0, metavar="SECONDS",
                   help="a series is complete after this many seconds without a new instance (default 10)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps (default: the model's)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="only warnings and failures")


def make_processor(enhancer, opts, out_root: str | Path, model_name: str, model_hash: str):
    """``process(series_folder) -> [derived series folders]``: every case of the spooled folder enhanced and
    written as a derived DICOM series under ``out_root/<StudyUID>/<SeriesUID>[/<case>]`` with the provenance
    tags (deterministic derived UIDs)."""
    out_root = Path(out_root)
    desc = f"{enhancer.task} ({model_name})"

    def process(folder: Path) -> list[Path]:
        found = scan_folder(folder)
        if not found.cases:
            raise CaseError(folder, "no DICOM image series among the received instances",
                            "send image series (CT, MR, ...) to this node")
        rel = Path(folder.parent.name) / folder.name
        outs = []
        for case in found.cases:
            if case.error is not None:
                raise case.error
            vols = load_volumes(case)  # a 4D series: every volume, one derived 4D series
            runs = [enhancer.enhance(img, opts) for img in vols]
            image = stack_volumes([r.image for r in runs])
            image.meta["provenance"] = provenance(model_name, model_hash, enhancer.task, opts, runs[0].info)
            out = out_root / rel if case.id == folder.name else out_root / rel / case.id
            outs.append(save_scan(image, out, reference=source_reference(vols), description=desc, replace=True))
        return outs

    return process


def build_listener(args: argparse.Namespace):
    """The :class:`medldm.io.dimse.Listener` for these arguments (model loaded, nothing started)."""
    # lazy: keeps medldm --help free of torch
    from medldm.pipelines.enhance import EnhanceOptions

    if args.idle <= 0:
        raise UsageError("--idle must be > 0 seconds")
    if not 0 < args.port < 65536:
        raise UsageError("--port must be in 1..65535")
    if not 0 < len(args.aet.strip()) <= 16:
        raise UsageError("--aet must be 1 to 16 characters")
    forward = parse_peer(args.forward) if args.forward else None
    device = resolve_device(args.device)
    model = open_model_or_exit(args.model, "enhance", device)
    try:
        opts = model.runner.resolve(EnhanceOptions(device=device, steps=args.steps, sampler=args.sampler,
                                                   seed=args.seed))
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    spool = Path(args.spool) if args.spool else out / "spool"
    process = make_processor(model.runner, opts, out / "derived", model.name, model.hash)
    return Listener(spool, process, aet=args.aet.strip(), host=args.host, port=args.port, idle=args.idle,
                    forward=forward)


def run(args: argparse.Namespace) -> int:
    listener = build_listener(args)
    if listener.forward is None:
        logging.getLogger(__name__).warning("no --forward: derived series stay in %s", Path(args.out) / "derived")
    try:
        listener.serve_forever()
    except KeyboardInterrupt:
        print("stopped: every received instance is in the spool; the next start processes what was not done",
              flush=True)
    return 0
