"""Generic machinery for nested dataclass configs: build from dicts (TOML), dotted overrides,
type coercion and errors that name the bad key and the fix. Knows nothing of selfe's sections."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config key, type or value is wrong. The message says which and how to fix it."""


RANGE = re.compile(r"\s*\d+\s*-\s*\d+\s*")
"""A CLI range of two non-negative integers, ``low-high``."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from TOML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin in (list, tuple):
        if isinstance(value, str) and RANGE.fullmatch(value):  # "2-8": a (low, high) pair from the CLI
            value = [v.strip() for v in value.split("-")]
        elif isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table/dict, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                try:
                    value = float(value)  # "1e4" is an integer; "2.5" is not
                except ValueError:
                    pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")
"""A registry reference: ``models:/name@alias`` or ``models:/name/<version>`` (the version checked by its user)."""


def check_name(key: str, value: str, allow_empty: bool = False) -> None:
    """Names that become path components and MLflow filter values: letters, digits, ``._-``, <= 128
    characters, and not ``.`` or ``..``."""
    if allow_empty and value == "":
        return
    if not NAME_PATTERN.match(value) or value in (".", ".."):
        raise ConfigError(
            f"{key}={value!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-' "
            "(it becomes a folder name and an MLflow filter value)"
        )


def check_range(section: str, obj: Any, low: int | float, *names: str, high: int | float | None = None) -> None:
    """Each field ``names`` of ``obj`` must lie in [low, high]; the error names the field and the range."""
    for name in names:
        value = getattr(obj, name)
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"{section}.{name} must be {bound}, got {value}")


def _unknown(key: str, options: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], options, n=1)
    hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{near[0]}?" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid here: {', '.join(sorted(options))})")


def apply_dict(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set fields of dataclass ``obj`` from a nested dict, recursing into sub-dataclasses."""
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown(key, names)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give its fields, e.g. {key}.<field>=...")
            apply_dict(current, v, f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def apply_override(obj: Any, dotted: str, value: Any) -> None:
    """Apply one ``section.field=value`` override (value may be a string from the command line).
    ``section.mapping.key=value`` sets one entry of a dict-valued field."""
    *path, leaf = dotted.split(".")
    target, walked = obj, []
    for i, part in enumerate(path):
        names = [f.name for f in dataclasses.fields(target)]
        if part in names and isinstance(getattr(target, part), dict) and i == len(path) - 1:
            key = ".".join(walked + [part, leaf])
            _, vt = typing.get_args(_hints(type(target))[part]) or (Any, Any)
            getattr(target, part)[leaf] = _coerce(value, vt, key)
            return
        if part not in names or not dataclasses.is_dataclass(getattr(target, part)):
            raise _unknown(".".join(walked + [part]), [n for n in names if dataclasses.is_dataclass(getattr(target, n))])
        target = getattr(target, part)
        walked.append(part)
    apply_dict(target, {leaf: value}, ".".join(walked) + "." if walked else "")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--optim.lr=1e-4", "--train.steps", "10"]`` -> [("optim.lr", "1e-4"), ("train.steps", "10")]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.field=value")
        body = a[2:]
        if "=" in body:
            k, v = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = body, args[i + 1]
            i += 1
        else:
            k, v = body, "true"  # a bare flag switches a boolean on
        out.append((k, v))
        i += 1
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dataclass tree -> {"section.field": value} (for MLflow params)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(obj: Any, name: str = "") -> str:
    """Serialise a dataclass tree to TOML; ``None`` fields are omitted (TOML has no null)."""
    lines, subs = [], []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            subs.append(to_toml(v, f"{name}.{f.name}" if name else f.name))
        elif v is not None:
            lines.append(f"{f.name} = {_toml_value(v)}")
    head = [f"[{name}]"] if name and lines else []
    return "\n".join(head + lines + [""] + subs).strip() + "\n"
