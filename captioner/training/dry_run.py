"""`captioner train --dry-run`: check a recipe and its data as training would read them, without the work.

Reads every dataset's two splits with the same readers, limits and missing-image rule as `fit`, builds the
vocabulary from the training captions as `fit` does, and reports counts per split; refuses a `train.out_dir` the
run would refuse (a previous run without --resume, a recipe's own folder). No features are extracted and nothing
is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from captioner.config import Config, DatasetConfig, config_to_dict
from captioner.config.checks import config_error
from captioner.data.splits import check_images, read_dataset
from captioner.training.prepare import build_vocabulary, empty_split, split_name
from captioner.training.run_folder import STATE, refusal
from captioner.training.start import starting_model


@dataclass
class SplitReport:
    """What one split of one of the recipe's datasets holds."""

    split: str
    images: int
    """Images listed by the annotations (after `max_images` / `train.val_max_images`)."""
    captions: int
    """Reference captions of the usable images."""
    missing: int
    """Images missing or empty on disk (an error unless `data.on_missing: skip`)."""
    dataset: str = ""
    """The dataset's label (`name`, else its format)."""


@dataclass
class DryRunReport:
    """The result of `dry_run`: a train and a validation report per dataset, and the vocabulary training would
    build over all training captions."""

    splits: list[SplitReport]
    vocabulary: int
    """Words in the vocabulary the run will use, special tokens included: built from the training captions, or
    the starting model's."""
    vocabulary_from: str = ""
    """`train.init_from` when the run keeps its starting model's vocabulary, else empty (built from the data)."""
    run_folder: str = ""
    """What the run would do with `train.out_dir`: create it, write into it, or resume the run there."""


def _split(cfg: Config, source: DatasetConfig, split: str, limit: int) -> tuple[SplitReport, list[str]]:
    samples = read_dataset(source, split)
    if limit:
        samples = samples[:limit]
    what = split_name(cfg, source, split)
    usable, missing = check_images(samples, cfg.data.on_missing, what)
    if not usable:  # as training stops, before extracting any features
        raise empty_split(source, split, what, len(samples))
    captions = [c for s in usable for c in s.captions]
    return SplitReport(split, len(samples), len(captions), len(missing), source.label()), captions


def _run_folder(cfg: Config, resume: bool) -> str:
    """What `fit` would make of `train.out_dir`, looked at without its lock (nothing is written). Why: a recipe
    whose out_dir held a finished run passed the check, and the run itself then refused to start."""
    run = Path(cfg.train.out_dir)
    if not run.exists():
        return f"{run} (created by the run)"
    problem = refusal(run, resume)
    if problem:
        raise config_error(problem)
    if resume and (run / STATE).exists():
        return f"{run} (the run there is resumed)"
    return f"{run} (written into)"


def dry_run(cfg: Config, resume: bool = False) -> DryRunReport:
    """Validate `cfg`'s data paths and run folder, read every dataset's two splits and build the vocabulary, as
    `fit(cfg, resume)` would.

    Raises:
        ConfigError: a data path the config names does not exist, or `train.out_dir` holds files the run would
            overwrite (a previous run without `resume`, or no run to resume with it).
        EncoderError: `model.encoder` is not a registered encoder.
        DatasetError: annotations cannot be read, a split has no usable images, or images are missing with
            `data.on_missing: error`.
    """
    from captioner.models.encoder import EncoderError, available_encoders
    from captioner.training.prepare import validate_paths  # the check `fit` runs first

    validate_paths(cfg)
    folder = _run_folder(cfg, resume)
    if cfg.model.encoder not in available_encoders():
        raise EncoderError(f"unknown encoder {cfg.model.encoder!r}; "
                           f"choose one of {', '.join(available_encoders())}")
    splits, train_captions = [], []
    for source in cfg.data.sources():
        if source.weight:  # as `prepare_data`: weight 0 is validated, not trained on
            train, captions = _split(cfg, source, source.train_split, source.max_images)
            splits.append(train)
            train_captions += captions
        splits.append(_split(cfg, source, source.val_split, cfg.train.val_max_images)[0])
    if cfg.train.init_from:  # the run checks its starting model before extracting anything: so does the check
        return DryRunReport(splits, len(starting_model(cfg).vocab), cfg.train.init_from, folder)
    vocab = build_vocabulary(train_captions, cfg.data.min_word_count)
    return DryRunReport(splits, len(vocab), run_folder=folder)


def format_report(cfg: Config, report: DryRunReport) -> str:
    """The resolved config as YAML, then the data summary as YAML comments (the whole text is valid YAML)."""
    lines = [yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "",
             "# data check (no features extracted)"]
    for s in report.splits:
        where = f"{s.dataset} " if cfg.data.datasets else ""
        lines.append(f"# {where}{s.split}: {s.images} images, {s.captions} captions, {s.missing} missing")
    if report.vocabulary_from:
        lines.append(f"# vocabulary: {report.vocabulary} words, the starting model's "
                     f"(train.init_from {report.vocabulary_from!r})")
    else:
        lines.append(f"# vocabulary: {report.vocabulary} words over all training captions "
                     f"(min_word_count {cfg.data.min_word_count})")
    if report.run_folder:
        lines.append(f"# run folder: {report.run_folder}")
    return "\n".join(lines) + "\n"
