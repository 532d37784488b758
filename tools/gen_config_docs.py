"""Write the training-config reference of docs/training.md from the schema (``medldm.train.schema``).

    python tools/gen_config_docs.py          # rewrite the generated block of docs/training.md
    python tools/gen_config_docs.py --check  # exit 1 if that block is stale
    python tools/gen_config_docs.py --print  # print the reference (Markdown) instead

The block sits between ``<!-- schema:begin -->`` and ``<!-- schema:end -->``; the rest of the page is hand-written.
:func:`schema_markdown` documents any dataclass tree whose fields carry ``metadata["doc"]``
(``medldm.config.doc_field``): one table for the top-level keys, then one per section.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import yaml

from medldm.config import to_mapping, type_name

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
BEGIN, END = "<!-- schema:begin -->", "<!-- schema:end -->"


def schema_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field of a dataclass tree, depth first."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(schema_rows(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        default_s = "(required)" if default == "(required)" else yaml.safe_dump(
            to_mapping(default), default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((key, type_name(tp), default_s, str(f.metadata.get("doc", ""))))
    return rows


def schema_markdown(cls: type) -> str:
    """A Markdown reference of the schema, one table per top-level section."""
    hints = typing.get_type_hints(cls)
    top = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out += [_md_row(r) for r in schema_rows(cls) if "." not in r[0] and r[0] in {f.name for f in top}]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            continue
        out += ["", f"### `{f.name}`", ""]
        doc = str(f.metadata.get("doc", "")) or (tp.__doc__ or "").strip().splitlines()[0]
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out += [_md_row(r) for r in schema_rows(tp, f.name)]
    return "\n".join(out) + "\n"


def _md_row(row: tuple[str, str, str, str]) -> str:
    key, tp, default, doc = (c.replace("|", "\\|") for c in row)
    return f"| `{key}` | {tp} | `{default}` | {doc} |"


def render(text: str) -> str:
    """``text`` (a docs page) with its generated block replaced by the training schema's reference."""
    from medldm.train.schema import TrainingConfig

    if BEGIN not in text or END not in text:
        raise SystemExit(f"the page lacks the generated block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{schema_markdown(TrainingConfig)}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--print" in argv:
        from medldm.train.schema import TrainingConfig

        print(schema_markdown(TrainingConfig), end="")
        return 0
    text = DOC.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is stale: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOC.write_text(new)
    print(f"{DOC}: {'updated' if new != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
