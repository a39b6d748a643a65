"""The `data` section: one dataset or several (`datasets`), and what they share."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from captioner.config.checks import at_least, finite, not_a_file, raise_problems
from captioner.config.yaml_io import short_repr


@dataclass
class DatasetConfig:
    """One dataset: where it lives, how it is read and split, and its share of training and model selection."""

    format: str = "flickr8k"
    """One of: flickr8k, karpathy, coco, csv, jsonl."""
    name: str = ""
    """Label of this dataset in logs, metrics.jsonl, curves and the checkpoint (default: its format)."""
    root: str = ""
    """Dataset folder (flickr8k: holds Images/ and the token and split files)."""
    annotations: str = ""
    """Annotation file for karpathy, coco, csv and jsonl formats."""
    images: str = ""
    """Image folder for karpathy, coco, csv and jsonl formats (defaults to the annotation file's folder)."""
    val_annotations: str = ""
    """coco/csv/jsonl only: a second annotation file for validation (else val_fraction of train is held out)."""
    val_fraction: float = 0.05
    """Share of images held out for validation when the format has no validation split."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "dev"
    """Split used for model selection (flickr8k: dev; karpathy: val)."""
    train_list: str = ""
    """coco/csv/jsonl only: a file listing the training images, one file name (as the annotations name it) per
    line, in place of the hash split (e.g. coco_small's train.txt)."""
    val_list: str = ""
    """coco/csv/jsonl only: a file listing the validation images, as `train_list` (e.g. coco_small's dev.txt)."""
    max_images: int = 0
    """Use only the first N training images (0 = all); handy for quick experiments."""
    weight: float = 1.0
    """Sampling weight: how often each training image of this dataset is shown per epoch on average. 2 shows a
    small dataset twice; 0.5 shows a random half of a large one, drawn anew every epoch."""
    selection_weight: float = 1.0
    """Weight of this dataset's validation CIDEr-D in the score that selects the best epoch (a weighted mean over
    the datasets; 0 validates and logs it without letting it choose)."""

    def label(self) -> str:
        """The dataset's name in logs and metrics."""
        return self.name or self.format

    def __post_init__(self) -> None:
        raise_problems(self._problems("data"))

    def _problems(self, where: str) -> list[str]:
        problems = []
        if self.format not in ("flickr8k", "karpathy", "coco", "csv", "jsonl"):
            problems.append(f"{where}.format must be one of flickr8k, karpathy, coco, csv, jsonl; got {self.format!r}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"{where}.val_fraction must be in (0, 1)")
        if (self.train_list or self.val_list) and self.format in ("flickr8k", "karpathy"):
            problems.append(f"{where}.train_list/val_list are for coco, csv and jsonl; "
                            f"{self.format} has its own splits")
        if self.val_list and self.val_annotations:
            problems.append(f"{where}: give val_list or val_annotations, not both")
        if self.name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            problems.append(f"{where}.name must be 1-64 letters, digits, '_', '.' or '-', got {short_repr(self.name)}")
        problems += [p.replace("section.", f"{where}.") for p in finite(self, "section")]
        problems += at_least(self, where, {"max_images": 0})
        if not 0.0 <= self.weight <= 100.0:
            problems.append(f"{where}.weight must be in [0, 100], got {self.weight}")
        if not 0.0 <= self.selection_weight <= 100.0:
            problems.append(f"{where}.selection_weight must be in [0, 100], got {self.selection_weight}")
        return problems


_DATASET_FIELDS = tuple(f.name for f in dataclasses.fields(DatasetConfig))


@dataclass
class DataConfig(DatasetConfig):
    """The training data: one dataset given by the per-dataset keys (format ... selection_weight), or several in
    `datasets`, each with those keys; vocabulary, caption length, feature cache and the missing-image rule are
    shared by all."""

    min_word_count: int = 5
    """Words seen fewer times in the training captions (of all datasets) become <unk>."""
    max_caption_length: int = 30
    """Training captions are cut to this many words."""
    cache_dir: str = ".cache/features"
    """Folder of the encoder feature cache."""
    on_missing: str = "error"
    """What a missing or unreadable image does: `error` stops with the list, `skip` drops them and counts."""
    mirror: bool = False
    """Also extract the training images mirrored left-right; each cross-entropy epoch then shows every image either
    way round, at random, with 'left' and 'right' swapped in the captions of a mirrored one."""
    datasets: list[DatasetConfig] = field(default_factory=list)
    """Several datasets trained on together, each with the keys above (format, name, root, ..., weight,
    selection_weight); one vocabulary is built over all their training captions and every epoch validates on
    each one's validation split. When given, the single-dataset keys of `data` stay unset."""

    def sources(self) -> list[DatasetConfig]:
        """The datasets to train on: `datasets`, or the one the single-dataset keys describe."""
        if self.datasets:
            return list(self.datasets)
        return [DatasetConfig(**{name: getattr(self, name) for name in _DATASET_FIELDS})]

    def __post_init__(self) -> None:
        problems = self._problems("data")
        if self.on_missing not in ("error", "skip"):
            problems.append(f"data.on_missing must be 'error' or 'skip', got {self.on_missing!r}")
        if self.min_word_count < 1:
            problems.append("data.min_word_count must be >= 1")
        problems += at_least(self, "data", {"max_caption_length": 1})
        problems += not_a_file(self.cache_dir, "data.cache_dir")
        if self.datasets:
            defaults = DatasetConfig()
            problems += [f"data.{name} is set per dataset when data.datasets is given: move it into each entry"
                         for name in _DATASET_FIELDS if getattr(self, name) != getattr(defaults, name)]
            labels = [d.label() for d in self.datasets]
            problems += [f"data.datasets: two datasets are named {label!r}; give each a distinct name"
                         for label in sorted({x for x in labels if labels.count(x) > 1})]
            if len(self.datasets) > 64:
                problems.append(f"data.datasets: at most 64 datasets, got {len(self.datasets)}")
            if not any(d.selection_weight for d in self.datasets):
                problems.append("data.datasets: at least one dataset needs selection_weight > 0")
            if not any(d.weight for d in self.datasets):
                problems.append("data.datasets: at least one dataset needs weight > 0")
        elif not self.weight:
            problems.append("data.weight must be > 0 for the only dataset")
        raise_problems(problems)
