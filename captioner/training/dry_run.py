"""`captioner train --dry-run`: check a recipe and its data as training would read them, without the work.

Reads both splits with the same readers, limits and missing-image rule as `fit`, builds the vocabulary from
the training captions as `fit` does, and reports counts per split. No features are extracted and nothing is
written.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from captioner.config import Config, config_to_dict
from captioner.data.readers import DatasetError, check_images, read_dataset
from captioner.models.vocab import Vocabulary


@dataclass
class SplitReport:
    """What one split of the recipe's data holds."""

    split: str
    images: int
    """Images listed by the annotations (after `data.max_images` / `train.val_max_images`)."""
    captions: int
    """Reference captions of the usable images."""
    missing: int
    """Images missing or empty on disk (an error unless `data.on_missing: skip`)."""


@dataclass
class DryRunReport:
    """The result of `dry_run`: one report per split and the vocabulary training would build."""

    train: SplitReport
    val: SplitReport
    vocabulary: int
    """Words in the vocabulary built from the training captions, special tokens included."""


def _split(cfg: Config, split: str, limit: int) -> tuple[SplitReport, list[str]]:
    samples = read_dataset(cfg.data, split)
    if limit:
        samples = samples[:limit]
    usable, missing = check_images(samples, cfg.data.on_missing, f"{split} split")
    if not usable:  # as training would stop, after extracting the other split's features
        raise DatasetError(f"the {split} split has no usable images")
    captions = [c for s in usable for c in s.captions]
    return SplitReport(split, len(samples), len(captions), len(missing)), captions


def dry_run(cfg: Config) -> DryRunReport:
    """Validate `cfg`'s data paths, read both splits and build the vocabulary, as `fit(cfg)` would.

    Raises:
        ConfigError: a data path the config names does not exist.
        EncoderError: `model.encoder` is not a registered encoder.
        DatasetError: annotations cannot be read, a split has no usable images, or images are missing with
            `data.on_missing: error`.
    """
    from captioner.models.encoder import EncoderError, available_encoders
    from captioner.training.prepare import validate_paths  # the check `fit` runs first

    validate_paths(cfg)
    if cfg.model.encoder not in available_encoders():
        raise EncoderError(f"unknown encoder {cfg.model.encoder!r}; "
                           f"choose one of {', '.join(available_encoders())}")
    train, train_captions = _split(cfg, cfg.data.train_split, cfg.data.max_images)
    val, _ = _split(cfg, cfg.data.val_split, cfg.train.val_max_images)
    vocab = Vocabulary.build(train_captions, cfg.data.min_word_count)
    return DryRunReport(train, val, len(vocab))


def format_report(cfg: Config, report: DryRunReport) -> str:
    """The resolved config as YAML, then the data summary as YAML comments (the whole text is valid YAML)."""
    lines = [yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "",
             "# data check (no features extracted)"]
    for s in (report.train, report.val):
        lines.append(f"# {s.split}: {s.images} images, {s.captions} captions, {s.missing} missing")
    lines.append(f"# vocabulary: {report.vocabulary} words (min_word_count {cfg.data.min_word_count})")
    return "\n".join(lines) + "\n"
