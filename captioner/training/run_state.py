"""The resumable state of a training run: model, optimizer, RNG and progress in one atomic safetensors file.

Keeping everything in a single file written by temp-file + fsync + rename means the state on disk is always
one complete epoch boundary: a run killed at any moment resumes from the last one, never from a mixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioner.models.checkpoint import CheckpointError, load_tensors, save_tensors

STATE_FORMAT = "captioner-train-state"


@dataclass
class Progress:
    """Where a run stands, saved after every epoch."""

    epoch: int = 0
    """Completed epochs (cross-entropy and self-critical together)."""
    step: int = 0
    """Optimizer steps taken."""
    best_score: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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
    save_tensors(path, tensors, meta)


def load_state(path: Path, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
               generator: torch.Generator) -> tuple[Progress, list[str], dict[str, torch.Tensor]]:
    """Restore a run state written by `save_state` into the given objects.

    Returns:
        The progress, the vocabulary and the `extra` tensors saved with the state.

    Raises:
        CheckpointError: damaged file, other format, or weights that do not fit the model.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a captioner training state")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        decoder.load_state_dict(model, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: model weights do not fit the configured model ({exc})") from exc
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    progress = Progress(**meta["progress"])
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return progress, meta["vocab"], extra
