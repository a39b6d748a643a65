"""The whole recipe (`Config`), read from YAML with `--set` overrides and written back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from captioner.config.checks import config_error
from captioner.config.data import DataConfig
from captioner.config.mapping import dataclass_from_dict
from captioner.config.model import DecodeConfig, ModelConfig
from captioner.config.train import TrainConfig
from captioner.config.yaml_io import YamlInputError, load_yaml, short_repr
from captioner.path_kind import file_problem


@dataclass
class Config:
    """A whole training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping (unknown keys and wrong types raise ConfigError)."""
    return dataclass_from_dict(Config, raw, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict form of any config dataclass (JSON and YAML safe)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    """(dotted key, value) of `section.key=value`; the value is read as YAML (numbers, booleans, lists), but text
    that YAML reads as a string is taken as written. Why: YAML drops a ` #...` tail as a comment and folds a
    newline into a space, so `train.out_dir=/runs/exp #2` silently became `/runs/exp`."""
    if "=" not in item:
        raise config_error(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    try:
        value = load_yaml(text)
    except YamlInputError as exc:
        raise config_error(f"override {short_repr(item)}: {exc}") from exc
    plain = text.strip()
    cut = "#" in plain or any(c in plain for c in "\n\r")  # what YAML drops (a comment) or folds (a line break)
    if cut and isinstance(value, str) and plain[0] not in "\"'!" and value != plain:
        value = plain  # a plain scalar YAML shortened; quoted ("a #b") or tagged (!!str) ones keep its reading
    return key.strip().split("."), value


def _index(node: list, key: str, item: str) -> int:
    """The list position `key` names. Why ASCII digits and a length bound: `int()` refuses "²" (a Unicode
    digit) and numbers of over 4,300 digits with a ValueError, which reached the user as a traceback."""
    if not (key.isascii() and key.isdigit()) or len(key) > 9 or int(key) >= len(node):
        shown = key if len(key) <= 20 else key[:20] + "..."
        raise config_error(f"override {short_repr(item)}: {shown} is not an entry of that list "
                           f"(0..{len(node) - 1})")
    return int(key)


def _step(node: Any, key: str, item: str) -> Any:
    """One step of a dotted override: into a section, or by position into a list (`data.datasets.1.weight`)."""
    if isinstance(node, list):
        node = node[_index(node, key, item)]
    else:
        node = node.setdefault(key, {})
    if not isinstance(node, (dict, list)):
        raise config_error(f"override {short_repr(item)}: {key} is not a section")
    return node


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply `section.key=value` overrides and validate the result.

    Raises:
        ConfigError: the file is missing, empty, not UTF-8 or not YAML, has a duplicate key or expands to an
            absurd size (`captioner.config.yaml_io`), a key is unknown, or a value has the wrong type or range.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        problem = file_problem(path, missing="does not exist", folder="is a folder", special="is not a regular file",
                               unreachable="cannot be read ({})")
        if problem:  # a FIFO or a device is there but would block or never end a read
            raise config_error(f"config file {path} {problem}")
        try:
            raw = load_yaml(path.read_bytes())
        except YamlInputError as exc:
            raise config_error(f"{path}: {exc}") from exc
        except OSError as exc:
            raise config_error(f"cannot read {path}: {exc.strerror}") from exc
        if raw is None:
            raise config_error(f"{path} is empty")
        if not isinstance(raw, dict):
            raise config_error(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        keys, value = _parse_override(item)
        node: Any = raw
        for key in keys[:-1]:
            node = _step(node, key, item)
        if isinstance(node, list):  # data.datasets.1=...: a whole entry
            node[_index(node, keys[-1], item)] = value
        else:
            node[keys[-1]] = value
    return config_from_dict(raw)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (the format `load_config` reads back), in the dataclasses' key order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (`config_yaml`)."""
    Path(path).write_text(config_yaml(cfg))
