"""The models that ship inside the package, by name: `Captioner.load("general")`, `captioner models`.

A name maps to a checkpoint in `captioner/weights/`; anything else given to `Captioner.load` is a path. The
listing reads only each checkpoint's JSON header (no tensors, no torch), so `captioner models` is instant.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED: dict[str, str] = {
    "general": "general.safetensors",
    "flickr8k": "flickr8k.safetensors",
}
"""Shipped model name -> file in captioner/weights/."""

DEFAULT = "general"
"""What `Captioner.load()`, the CLI and the app use when no model is named."""


class UnknownModelError(ValueError):
    """A model name is neither a shipped model nor an existing checkpoint file; the message lists the names."""


@dataclass
class ModelSummary:
    """One shipped model as `captioner models` lists it."""

    name: str
    path: Path
    size_mb: float
    data: str
    encoder: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    """Selection scores per dataset (dev split): {"flickr8k": {"CIDEr": ..., "Bleu_4": ...}, ...}."""
    default: bool = False


def weights_dir() -> Path:
    """The package's weights folder."""
    return Path(str(resources.files("captioner") / "weights"))


def shipped_path(name: str) -> Path:
    """The checkpoint file of shipped model `name` (it may be absent from a source checkout without weights)."""
    return weights_dir() / SHIPPED[name]


def resolve(model: str | os.PathLike | None) -> Path:
    """A shipped model's name, a checkpoint path, or None (the default model) -> checkpoint path.

    A name wins over a file of the same name in the current folder only when it is a `str` with no suffix and no
    folder, so "general" is the shipped model and "./general", "general.safetensors" and `Path("general")` are
    files. Why a Path is never a name: `Path("./general")` drops its "./" and read as the shipped model.

    Raises:
        UnknownModelError: `model` is neither a shipped name nor an existing file, or is empty; the message lists
            the names.
    """
    if model is None:
        return shipped_path(DEFAULT)
    if isinstance(model, str) and model in SHIPPED:
        return shipped_path(model)
    text = os.fsdecode(model)
    if not text:  # "" (or b""): it read as the current folder, "checkpoint .: is a folder"; Path("") is "."
        raise UnknownModelError(f"no model given (an empty name); shipped models: {', '.join(SHIPPED)} "
                                "(or give the path of a .safetensors checkpoint)")
    path = Path(text)
    if not isinstance(model, str):
        return path
    if path.suffix or os.sep in text or (os.altsep or os.sep) in text or path.exists():
        return path  # a path: a missing file is the checkpoint loader's error to report, with the path
    raise UnknownModelError(f"unknown model {text!r}; shipped models: {', '.join(SHIPPED)} "
                            "(or give the path of a .safetensors checkpoint)")


def _header(path: Path) -> dict[str, Any]:
    """The captioner metadata of a safetensors file, read from its JSON header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            meta = json.loads((fh.metadata() or {}).get("json", "{}"))
    except (SafetensorError, OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: damaged shipped model header ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: damaged shipped model header (not a JSON object)")
    return meta


def dataset_scores(info: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """{dataset: its scores mapping} of a checkpoint's info: the shipped weights' own evaluation (`dev_scores`)
    where recorded, else the per-dataset scores the epoch was selected on; None when the info holds only one
    dataset's selection scores (or none). Read by `captioner models` and the app alike."""
    per = info.get("dev_scores")
    if not isinstance(per, dict):
        selection = info.get("selection")
        per = selection.get("datasets") if isinstance(selection, dict) else None
    return {label: s for label, s in per.items() if isinstance(s, dict)} if isinstance(per, dict) else None


def _scores(info: dict[str, Any], label: str) -> dict[str, dict[str, float]]:
    """Per-dataset scores of a checkpoint's info as numbers (`dataset_scores`), or one dataset's selection
    scores under `label`."""
    selection = info.get("selection") or info.get("metrics") or {}
    per = dataset_scores({**info, "selection": selection})
    if per is not None:
        return {name: _numbers(s) for name, s in per.items()}
    return {label: {k: v for k, v in _numbers(selection).items() if k != "length_penalty"}}


def _numbers(scores: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a scores mapping (metrics and beam size; no text, no NaN), as they are."""
    return {k: v for k, v in scores.items() if finite_number(v) is not None}


def finite_number(value: object) -> float | None:
    """`value` as a float when it is a finite number (a bool is not); None otherwise, also for an int too large
    for a float (`math.isfinite` of a 400-digit int raises OverflowError). Read by `captioner models` and the
    app's model card alike."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def list_models() -> list[ModelSummary]:
    """Every shipped model whose checkpoint is installed, the default first."""
    out = []
    for name in sorted(SHIPPED, key=lambda n: n != DEFAULT):
        path = shipped_path(name)
        if not path.is_file():
            continue
        meta = _header(path)
        info = meta.get("info", {})
        out.append(ModelSummary(name, path, path.stat().st_size / 1e6, str(info.get("data", "")),
                                str(meta.get("model", {}).get("encoder", "")), _scores(info, name), name == DEFAULT))
    return out
