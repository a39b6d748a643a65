"""The resumable state of a training run: model, optimizer, RNG and progress in one atomic safetensors file.

Keeping everything in a single file written by temp-file + fsync + rename means the state on disk is always
one complete epoch boundary: a run killed at any moment resumes from the last one, never from a mixture.

A state is read back in two steps. `read_state` checks everything the file alone can tell (the progress, the
optimizer's groups, the RNG states, the vocabulary) before any feature is extracted, so a damaged or hand-edited
file is one `CheckpointError` naming it, not a traceback after hours of extraction; `load_state` then puts it
into the built model and optimizer, refusing what does not fit them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioner.models.checkpoint import CheckpointError, load_tensors, save_tensors

STATE_FORMAT = "captioner-train-state"
COUNTS = ("epoch", "step", "best_epoch", "bad_epochs")
"""The progress fields that count something: whole numbers, never negative."""


@dataclass
class Progress:
    """Where a run stands, saved after every epoch."""

    epoch: int = 0
    """Completed epochs (cross-entropy and self-critical together)."""
    step: int = 0
    """Optimizer steps taken."""
    best_score: float = float("-inf")
    """-inf while no epoch has a score (saved as null: the state's JSON stays strict)."""
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SavedState:
    """A state file's contents, checked by `read_state` as far as the file alone allows."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    progress: Progress
    vocab: list[str]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +-inf) replaced by None, in lists and dicts too: a run's JSON
    files are strict JSON (`json.dumps(allow_nan=False)`), which other tools' parsers require."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_state(path: Path, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
               vocab: list[str], generator: torch.Generator, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Atomically write the whole run state; `extra` holds other tensors of the run (the weight average)."""
    tensors = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    optim = optimizer.state_dict()
    for index, slots in optim["state"].items():
        for name, value in slots.items():
            tensors[f"optim.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    meta = {"format": STATE_FORMAT, "progress": progress.__dict__, "param_groups": optim["param_groups"],
            "vocab": vocab}
    save_tensors(path, tensors, json_safe(meta))


def read_state(path: Path) -> SavedState:
    """Read a state written by `save_state` and check what needs no model: before features are extracted.

    Raises:
        CheckpointError: damaged file, other format, or progress, optimizer groups, optimizer slots, RNG states
            or vocabulary of the wrong kind; the message names the file and the entry.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a captioner training state")
    progress = _progress(path, meta.get("progress"))
    _check_groups(path, meta.get("param_groups"))
    _check_slots(path, tensors, {p for group in meta["param_groups"] for p in group["params"]})
    _check_rng(path, tensors)
    vocab = meta.get("vocab")
    if not isinstance(vocab, list) or not all(isinstance(word, str) for word in vocab):
        raise CheckpointError(f"{path}: vocab must be a list of words, got {type(vocab).__name__}")
    return SavedState(path, tensors, meta, progress, vocab)


def _progress(path: Path, raw: Any) -> Progress:
    """The saved progress as a `Progress`, each field of its kind; a null (or -inf) best score is no best."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: progress must be a JSON object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(Progress)}
    unknown = sorted(map(str, set(raw) - known))
    if unknown:
        raise CheckpointError(f"{path}: progress has unknown key(s) {', '.join(map(repr, unknown))}")
    progress = Progress(**raw)
    for name in COUNTS:
        value = getattr(progress, name)
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{path}: progress.{name} must be a whole number >= 0, got {value!r:.40}")
    progress.best_score = _best_score(path, progress.best_score)
    _check_history(path, progress.history)
    return progress


def _best_score(path: Path, value: Any) -> float:
    """A finite best score, or -inf for none (null): a NaN was never beaten, so no later epoch became the best."""
    if value is None:
        return float("-inf")
    if type(value) not in (int, float) or math.isnan(value) or value == float("inf"):
        raise CheckpointError(f"{path}: progress.best_score must be a finite number (or null: no best yet), "
                              f"got {value!r:.40}")
    return float(value)


def _check_history(path: Path, history: Any) -> None:
    """One JSON object an epoch, as `_validate_and_checkpoint` appends them: the curves and the log read them."""
    if not isinstance(history, list):
        raise CheckpointError(f"{path}: progress.history must be a list, got {type(history).__name__}")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or type(row.get("epoch")) is not int:
            raise CheckpointError(f"{path}: progress.history[{i}] must be an object with a whole-number epoch")
        for key, value in row.items():
            if key != "phase" and value is not None and type(value) not in (int, float):
                raise CheckpointError(f"{path}: progress.history[{i}].{key} must be a number or null, "
                                      f"got {value!r:.40}")


def _check_groups(path: Path, groups: Any) -> None:
    """The optimizer's groups: a list of objects, each listing its parameters by number."""
    if not isinstance(groups, list) or not groups:
        raise CheckpointError(f"{path}: param_groups must be a non-empty list, got {groups!r:.40}")
    for i, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise CheckpointError(f"{path}: param_groups[{i}] must be an object with a list of parameter numbers "
                                  "in 'params'")


def _check_slots(path: Path, tensors: dict[str, torch.Tensor], numbers: set[int]) -> None:
    """Optimizer tensors are named optim.<parameter number>.<slot>, for a parameter that a group lists (the
    optimizer would keep another's moments without using them)."""
    for key in tensors:
        if key.startswith("optim."):
            parts = key.split(".", 2)
            if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
                raise CheckpointError(f"{path}: tensor {key!r:.60} is not named optim.<parameter number>.<slot>")
            if int(parts[1]) not in numbers:
                raise CheckpointError(f"{path}: tensor {key!r:.60} is for a parameter no param_groups entry lists")


def _check_rng(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Both RNG states are there, as the bytes and of the size this PyTorch keeps (set_state refuses others)."""
    expected = {"rng.torch": torch.get_rng_state(), "rng.generator": torch.Generator().get_state()}
    for key, like in expected.items():
        value = tensors.get(key)
        if value is None:
            raise CheckpointError(f"{path}: the random number state {key} is missing")
        if value.dtype != like.dtype or value.shape != like.shape:
            raise CheckpointError(f"{path}: the random number state {key} is {value.dtype} of shape "
                                  f"{tuple(value.shape)}, expected {like.dtype} of shape {tuple(like.shape)}")


def load_state(state: Path | SavedState, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
               generator: torch.Generator) -> tuple[Progress, list[str], dict[str, torch.Tensor]]:
    """Restore a run state written by `save_state` (a path, or what `read_state` read) into the given objects.

    Returns:
        The progress, the vocabulary and the `extra` tensors saved with the state.

    Raises:
        CheckpointError: damaged file, other format, or weights or optimizer state that do not fit the model.
    """
    saved = state if isinstance(state, SavedState) else read_state(state)
    path, tensors = saved.path, saved.tensors
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        decoder.load_state_dict(model, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: model weights do not fit the configured model ({exc})") from exc
    _load_optimizer(saved, optimizer)
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return saved.progress, saved.vocab, extra


def _load_optimizer(saved: SavedState, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer's groups and moments; ones that do not fit the model's parameters are refused here,
    not by a shape error in the first step."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": saved.meta["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{saved.path}: the optimizer state does not fit the configured model ({exc})") from exc
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(f"{saved.path}: the optimizer's {name} of shape {tuple(value.shape)} does "
                                          f"not fit a parameter of shape {tuple(param.shape)}")
