"""Config dataclasses from plain mappings (YAML, JSON): unknown keys and wrong types are ConfigErrors.

Why not `cls(**raw)`: a typo would be a TypeError traceback, a string where a number belongs would pass
until deep in training, and YAML 1.1 reads `3e-4` as a string."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from captioner.config.checks import ConfigError, config_error
from captioner.config.yaml_io import short_repr


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, allowing int -> float; raise ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise config_error(f"{where}: expected {annotation}, got {short_repr(value)}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of 309+ digits (YAML, --set, a checkpoint's JSON): no float holds it
            raise config_error(f"{where} must be a finite number, got an integer too "
                               "large for a float") from None
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise config_error(f"{where}: expected true/false, got {short_repr(value)}")
    if annotation is int and isinstance(value, bool):
        raise config_error(f"{where}: expected an integer, got {short_repr(value)}")
    if not isinstance(value, annotation):
        raise config_error(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {short_repr(value)}")
    return value


def dataclass_from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build config dataclass `cls` from a mapping, rejecting unknown keys and wrong types (ConfigError)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise config_error(f"{where or 'top level'}: expected a mapping, got {short_repr(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - set(fields))  # YAML keys may be 1, True (yes/on) or None (~)
    if unknown:
        prefix = f"{where}." if where else ""
        raise config_error(
            "unknown key(s) "
            + ", ".join(prefix + k for k in unknown)
            + f"; valid keys: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = dataclass_from_dict(hint, value, key)
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, list):
                raise config_error(f"{key}: expected a list, got {short_repr(value)}")
            item = typing.get_args(hint)[0]
            kwargs[name] = [_entry(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _entry(cls: type, raw: Any, where: str) -> Any:
    """One list entry of dataclass `cls`; its range problems are named by the entry (`data.datasets[1].x`)."""
    try:
        return dataclass_from_dict(cls, raw, where)
    except ConfigError as exc:  # DatasetConfig's own checks name the section "data"
        # Only the bare "data" prefix of DatasetConfig's own checks; type errors already name the entry.
        # One problem reads "invalid config: data.x ...", several "  - data.x ..." a line each.
        raise ConfigError(re.sub(r"(?:(?<=^invalid config: )|(?<=- ))data(?=[.:])(?!\.datasets\[)", where,
                                 str(exc))) from None
