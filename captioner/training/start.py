"""A run that starts from a trained model (`train.init_from`) rather than from random weights.

The run fine-tunes the model's decoder on features of the config's encoder, so the two must describe the same
network: every model setting but the dropout rates has to match, and a mismatch is refused before any feature is
extracted, each difference named. The model's vocabulary is kept (its output layer is one row per word).
"""

from __future__ import annotations

from captioner.config import Config, config_to_dict
from captioner.config.checks import config_error
from captioner.models.checkpoint import CaptionModel, CheckpointError, load_model
from captioner.models.shipped import UnknownModelError, resolve

MAY_DIFFER = ("dropout", "feature_dropout")
"""Model settings a run may change from its starting model's: they regularise training, the network is the same."""


def starting_model(cfg: Config) -> CaptionModel:
    """The model `train.init_from` names, checked against the config's model section.

    Raises:
        ConfigError: an unknown name, a missing, unreadable or damaged file, or a model that differs from the
            config's; the message starts with `train.init_from` and names the file.
    """
    name = cfg.train.init_from
    try:
        path = resolve(name)
        if path.is_dir():
            hint = path / "best.safetensors"
            raise CheckpointError(f"{path}: is a folder" + (f"; did you mean {hint}?" if hint.is_file() else ""))
        start = load_model(path)
    except (UnknownModelError, CheckpointError) as exc:
        raise config_error(f"train.init_from: {exc}") from exc
    problems = differences(cfg, start, name)
    if problems:
        raise config_error(*problems)
    return start


def differences(cfg: Config, start: CaptionModel, name: str) -> list[str]:
    """One line per model setting of `start` that the config sets otherwise (dropout rates excepted)."""
    mine, theirs = config_to_dict(cfg.model), config_to_dict(start.model_cfg)
    return [f"train.init_from {name!r} has model.{key}: {theirs[key]!r}, this config {mine[key]!r}"
            for key in mine if key not in MAY_DIFFER and mine[key] != theirs.get(key)]


def check_features(start: CaptionModel, encoder_dim: int, name: str) -> None:
    """The starting model must read grids as wide as the config's encoder gives (a hand-edited checkpoint may
    claim the same encoder and another width)."""
    if start.encoder_dim != encoder_dim:
        raise config_error(f"train.init_from {name!r} reads {start.encoder_dim}-channel "
                           f"features, this config's encoder gives {encoder_dim}")
