"""YAML configs validated into nested dataclasses.

Generic machinery (any dataclass tree whose fields carry ``metadata["doc"]``); it knows no particular schema:

* :func:`from_mapping` builds a dataclass from a parsed-YAML mapping, checking every key and type. An unknown
  key is an error naming it and the nearest valid key; a wrong type names the key and the expected type.
* :func:`apply_overrides` applies ``a.b=c`` strings (values parsed as YAML) to a mapping.
* :func:`load_dataclass` reads a YAML file (or takes a mapping), applies overrides and validates it into a class.
* :func:`to_mapping` turns a dataclass tree back into YAML-safe dicts; :func:`save_config` writes one.

The training schema (``TrainingConfig`` and its sections) and its loader live in :mod:`medldm.train.schema`::

    from medldm.train.schema import load_config
    cfg = load_config("configs/sr_2d.yaml", overrides=["ldm_train.steps=500"])

The Markdown reference of a schema (docs/training.md) is written by ``tools/gen_config_docs.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from medldm.io.atomic import atomic_file

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


def doc_field(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line doc in ``metadata["doc"]`` (mutable defaults via factory)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


# ------------------------------------------------------------------------------------------ types
def type_name(tp: Any) -> str:
    """Human-readable name of a type annotation (``tuple[int, ...]``, ``'a' | 'b'``, ...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (tuple, list):
        base = "list"
        if (len(args) == 2 and args[1] is Ellipsis) or (origin is list and args):
            return f"{base}[{type_name(args[0])}]"
        if args:
            return f"{base}[{', '.join(type_name(a) for a in args)}]"
        return base
    if origin is dict:
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]" if args else "dict"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (lists -> tuples where declared)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping of keys), got {value!r}")
        return from_mapping(tp, value, prefix=key)
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}{hint}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise bad()
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if (len(args) == 2 and args[1] is Ellipsis) or (origin is list and args):
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items ({type_name(tp)}), got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            items = list(value)
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string: accept float literals
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and types recursively.

    Raises :class:`ConfigError` naming the full dotted key, e.g.
    ``data.patch_sise: unknown key; did you mean 'patch_size'?``.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + near[0]!r}?" if near else ""
            raise ConfigError(f"{full}: unknown key{hint} (valid keys here: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a section's own __post_init__ checks
        if isinstance(e, ConfigError):
            raise
        msg = str(e)
        raise ConfigError(msg if prefix and msg.startswith(prefix + ".") else f"{prefix or cls.__name__}: {msg}") from e


def to_mapping(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-safe dicts/lists/scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_mapping(v) for k, v in obj.items()}
    return obj


# -------------------------------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], yaml.safe_load("c"))."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. ldm_train.steps=2000")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b=c`` overrides to a nested mapping (in place; returns it). Keys are checked on validation."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, p in enumerate(path[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[:i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


# ----------------------------------------------------------------------------------- top level
def read_yaml(path: str | Path) -> dict:
    """Parse a YAML file into a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found — give the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_dataclass(cls: type[T], source: str | Path | Mapping, overrides: Iterable[str] = ()) -> T:
    """Load a YAML file (or take a mapping), apply ``a.b=c`` overrides, and validate it into dataclass ``cls``."""
    data = dict(source) if isinstance(source, Mapping) else read_yaml(source)
    data = apply_overrides(_deepcopy(data), overrides)
    return from_mapping(cls, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_mapping(cfg), sort_keys=False))
    return Path(path)


def _deepcopy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
