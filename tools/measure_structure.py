"""Issue 21's size and import figures: imports inside functions (medldm's own and third-party), functions over 100
lines, modules over 450 lines.

    python tools/measure_structure.py [medldm] [-v: list the internal ones] [-t: list the third-party ones]
"""

from __future__ import annotations

import ast
import pathlib
import sys


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    root = pathlib.Path(args[0] if args else "medldm")
    inner, third, long, big = set(), set(), [], []
    for f in sorted(root.rglob("*.py")):
        src = f.read_text()
        n = len(src.splitlines())
        if n > 450:
            big.append((str(f), n))
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if fn.end_lineno - fn.lineno + 1 > 100:
                long.append((f"{f}:{fn.name}", fn.end_lineno - fn.lineno + 1))
            for node in ast.walk(fn):  # a nested function's imports are counted once (sets)
                if isinstance(node, ast.ImportFrom):
                    own = node.level > 0 or (node.module or "").startswith("medldm")
                    (inner if own else third).add((str(f), node.lineno, node.module or ""))
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        (inner if a.name.startswith("medldm") else third).add((str(f), node.lineno, a.name))
    for flag, rows in (("-v", inner), ("-t", third)):
        if flag in sys.argv:
            for row in sorted(rows):
                print(*row)
    print("internal imports inside functions:", len(inner))
    print("third-party imports inside functions:", len(third))
    print("functions over 100 lines:", long)
    print("modules over 450 lines:", big)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
