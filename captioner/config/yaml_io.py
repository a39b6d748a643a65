"""Strict YAML reading for configs: duplicate keys are errors, expanded size is bounded, messages are short.

PyYAML's safe loader shares the object of an alias, so a "billion laughs" file (a few hundred bytes of nested
aliases) loads cheaply but expands to billions of elements as soon as anything walks or prints it. `load_yaml`
counts the elements of the loaded value, aliases expanded, and refuses more than `MAX_NODES`.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

MAX_NODES = 100_000
"""Most scalars, lists and mappings a config may hold once aliases are expanded (a real recipe has ~100)."""

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 80, 80, 3, 5, 5


def short_repr(value: Any) -> str:
    """A repr of at most about 200 characters, safe on huge or self-similar values."""
    text = _repr.repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class YamlInputError(ValueError):
    """The text is not an acceptable config YAML (syntax, duplicate key, size)."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let PyYAML report it
                break
            if duplicate:
                line = key_node.start_mark.line + 1
                raise YamlInputError(f"duplicate key {short_repr(key)} (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _count(value: Any, budget: list[int]) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise YamlInputError(f"more than {MAX_NODES} values once aliases are expanded (an alias bomb?)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_yaml(text: str | bytes) -> Any:
    """Parse one YAML document strictly; bytes must be UTF-8.

    Raises:
        YamlInputError: not UTF-8, not YAML, a duplicate key, or too many values after alias expansion.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YamlInputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        value = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise YamlInputError(f"not valid YAML: {short_repr(str(exc))}") from exc
    except YamlInputError:
        raise
    except ValueError as exc:  # an integer of more than 4,300 digits: Python's limit on int conversion
        raise YamlInputError(f"not valid YAML: {short_repr(str(exc))}") from exc
    except RecursionError as exc:
        raise YamlInputError("nested too deeply") from exc
    _count(value, [MAX_NODES])
    return value
