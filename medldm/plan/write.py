"""PLAN.yaml: the planned config as YAML text with each decision's reason as a comment above its key, checked by
loading it back with :func:`medldm.train.schema.load_config` and written atomically."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import yaml

from medldm.io.atomic import atomic_file
from medldm.plan.decisions import Plan
from medldm.train.schema import load_config


def _wrap(reason: str, indent: str) -> list[str]:
    return [f"{indent}# {ln}" for ln in textwrap.wrap(reason, 110 - len(indent))]


def _value(v: Any) -> str:
    return json.dumps(v)


def plan_yaml(plan: Plan, header: list[str]) -> str:
    """The config as YAML text: each decision's reason as a comment above its key."""
    out = [f"# {h}" for h in header]
    for n in plan.notes:
        out += _wrap("NOTE: " + n, "")
    for key, val in plan.config.items():
        if key in plan.reasons:
            out += _wrap(plan.reasons[key], "")
        if not isinstance(val, dict):
            out.append(f"{key}: {_value(val)}")
            continue
        out.append(f"{key}:")
        for k, v in val.items():
            r = plan.reasons.get(f"{key}.{k}")
            if r:
                out += _wrap(r, "  ")
            if isinstance(v, list) and v and all(isinstance(e, str) for e in v):
                out.append(f"  {k}:")
                out += [f"    - {_value(e)}" for e in v]
            else:
                out.append(f"  {k}: {_value(v)}")
    return "\n".join(out) + "\n"


def write_plan(plan: Plan, path: str | Path, header: list[str]) -> Path:
    """Write PLAN.yaml (validated by loading it back with ``load_config``) atomically; returns the path."""
    text = plan_yaml(plan, header)
    load_config(yaml.safe_load(text))  # raises ConfigError naming the key if the plan is not a valid config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path
