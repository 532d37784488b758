"""Write docs/cli.md from the argparse definitions (the single source of truth).

    python tools/gen_cli_docs.py          # rewrite docs/cli.md
    python tools/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    os.environ["COLUMNS"] = "100"  # stable wrapping
    from medldm.cli import COMMANDS, build_parser

    parser, mods = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["# CLI reference", "",
           "Generated from the argparse definitions by `python tools/gen_cli_docs.py`; do not edit by hand.", "",
           "Exit status of every command: 0 all done, 1 some cases failed (one line each on stderr and in the",
           "run report), 2 usage error.", ""]
    for name in COMMANDS:
        if name not in mods:
            continue
        out += [f"## `medldm {name}`", "", COMMANDS[name][1], "", "```text",
                sub.choices[name].format_help().rstrip(), "```", ""]
    return "\n".join(out)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
