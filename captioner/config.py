"""Typed configuration: one dataclass per concern, YAML in and out, validated before any work.

The YAML recipes in `configs/` mirror these dataclasses key for key, so a typo is an error, not a silently
ignored setting. `load_config` applies dotted `--set section.key=value` overrides on top of the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from captioner.config_io import YamlInputError, load_yaml, short_repr


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every problem found."""


MAX_WIDTH = 8192
"""Largest layer width a config (or a checkpoint's config) may ask for: the models here use 16 to 2048."""
MAX_BEAM_SIZE = 100
"""Most beams a decode may ask for, in a config, the API or the CLI: the search holds every beam's copy of the
grid features, so `--beam-size 1000000` asked for gigabytes and failed with an allocator traceback."""
MAX_DECODE_LENGTH = 1000
"""Most words a decode may ask for, in a config, the API or the CLI: buffers are sized by it up front
(`--max-length 1000000000` tried to allocate 24 GB)."""


@dataclass
class ModelConfig:
    """Architecture of the captioning model."""

    encoder: str = "efficientnet_lite0"
    """Registered encoder name (see `captioner.models.encoder.available_encoders()`)."""
    encoder_weights: str | None = None
    """Local weights file for encoders that do not ship their own (e.g. resnet50)."""
    image_size: int = 0
    """Side of the square the encoder sees (0: the size its weights were trained at). A larger size gives a
    finer grid, one cell per 32 pixels, and objects the size the ImageNet training crops showed them at."""
    decoder: str = "attention"
    """`attention` (Show, Attend and Tell) or `show_tell` (no attention, image vector conditions the LSTM)."""
    embed_dim: int = 256
    """Word embedding size."""
    hidden_dim: int = 512
    """LSTM hidden and cell size."""
    attention_dim: int = 256
    """Size of the additive attention's hidden layer."""
    feature_dim: int = 512
    """Grid features are projected to this size once per image before attention (0 keeps the encoder's)."""
    dropout: float = 0.5
    """Dropout on what the output layer reads: the LSTM's hidden state, or the deep output."""
    feature_dropout: float = 0.5
    """Dropout on the projected grid features (what attention reads and the initial state is made from)."""
    deep_output: bool = False
    """Attention decoder only: predict each word from tanh(L_h h + L_z context + E word) (Show, Attend and Tell's
    deep output) instead of from the hidden state alone."""
    encoder_head: int = 0
    """0 keeps the encoder whole and frozen. Otherwise the width of its last 1x1 convolution (1280 for
    efficientnet_lite0), which then leaves the encoder for the decoder's first layer: initialised from the
    pretrained weights (batch norm folded in) and trained with the decoder, on features cached one layer earlier.
    This fine-tunes the top of the CNN: captioning costs the same (the product moves from the encoder to the
    decoder's per-image work), training epochs about a fifth more."""

    def __post_init__(self) -> None:
        problems = []
        if self.decoder not in ("attention", "show_tell"):
            problems.append(f"model.decoder must be 'attention' or 'show_tell', got {self.decoder!r}")
        if self.deep_output and self.decoder != "attention":
            problems.append("model.deep_output needs model.decoder: attention (it reads the attention context)")
        for name in ("embed_dim", "hidden_dim", "attention_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"model.{name} must be positive")
        for name in ("feature_dim", "encoder_head"):
            if getattr(self, name) < 0:
                problems.append(f"model.{name} must be >= 0")
        if self.image_size and not 32 <= self.image_size <= 1024:
            problems.append(f"model.image_size must be 0 (the encoder's own) or 32..1024, got {self.image_size}")
        for name in ("dropout", "feature_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"model.{name} must be in [0, 1)")
        for name in ("embed_dim", "hidden_dim", "attention_dim", "feature_dim", "encoder_head"):
            if getattr(self, name) > MAX_WIDTH:
                problems.append(f"model.{name} must be <= {MAX_WIDTH}, got {getattr(self, name)}")
        _raise(problems)


@dataclass
class DecodeConfig:
    """Beam search settings used for validation, evaluation and as API defaults."""

    beam_size: int = 3
    """Number of beams; 1 is greedy decoding."""
    max_length: int = 20
    """Maximum number of generated words (the end token included)."""
    min_length: int = 1
    """The end token is forbidden before this many words."""
    length_penalty: float = 0.0
    """Exponent a in score = log p / length**a; 0 ranks by total log-probability."""
    no_repeat_ngram: int = 0
    """n > 0 forbids a word that would repeat an n-gram already in the caption (0 = no such rule)."""

    def __post_init__(self) -> None:
        problems = []
        if self.beam_size < 1:
            problems.append("decode.beam_size must be >= 1")
        if self.max_length < 1:
            problems.append("decode.max_length must be >= 1")
        if not 0 <= self.min_length <= self.max_length:
            problems.append("decode.min_length must be in [0, max_length]")
        if self.no_repeat_ngram < 0:
            problems.append("decode.no_repeat_ngram must be >= 0")
        if not 0.0 <= self.length_penalty <= 2.0:  # also refuses nan; the app's slider spans 0-2
            problems.append(f"decode.length_penalty must be in [0, 2], got {self.length_penalty}")
        if self.max_length > MAX_DECODE_LENGTH:
            problems.append(f"decode.max_length must be <= {MAX_DECODE_LENGTH}, got {self.max_length}")
        if self.beam_size > MAX_BEAM_SIZE:
            problems.append(f"decode.beam_size must be <= {MAX_BEAM_SIZE}, got {self.beam_size}")
        _raise(problems)


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
        _raise(self._problems("data"))

    def _problems(self, where: str) -> list[str]:
        problems = []
        if self.format not in ("flickr8k", "karpathy", "coco", "csv", "jsonl"):
            problems.append(f"{where}.format must be one of flickr8k, karpathy, coco, csv, jsonl; got {self.format!r}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"{where}.val_fraction must be in (0, 1)")
        if (self.train_list or self.val_list) and self.format in ("flickr8k", "karpathy"):
            problems.append(f"{where}.train_list/val_list are for coco, csv and jsonl; {self.format} has its own splits")
        if self.val_list and self.val_annotations:
            problems.append(f"{where}: give val_list or val_annotations, not both")
        if self.name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            problems.append(f"{where}.name must be 1-64 letters, digits, '_', '.' or '-', got {short_repr(self.name)}")
        problems += [p.replace("section.", f"{where}.") for p in _finite(self, "section")]
        problems += _at_least(self, where, {"max_images": 0})
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
        problems += _at_least(self, "data", {"max_caption_length": 1})
        problems += _not_a_file(self.cache_dir, "data.cache_dir")
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
        _raise(problems)


@dataclass
class TrainConfig:
    """Optimisation, schedule, validation and output settings."""

    out_dir: str = "runs/flickr8k"
    """Run directory: checkpoints, resolved config, metrics log and curves."""
    epochs: int = 20
    """Maximum number of epochs."""
    batch_size: int = 64
    """Images per batch (each image contributes captions_per_image captions)."""
    captions_per_image: int = 5
    """How many of an image's reference captions are trained on per step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    encoder_head_lr: float = 1.0
    """Learning rate of the tuned encoder head (`model.encoder_head`) relative to the decoder's. The head starts
    from pretrained weights and the decoder from random ones, yet on Flickr8k a tenth of the rate did worse (best
    dev CIDEr-D 0.5472, at its last epoch, against 0.5550; one run each)."""
    warmup_steps: int = 200
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """The cosine schedule decays to lr * min_lr_ratio."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    word_dropout: float = 0.0
    """Probability that a teacher-forced input word is shown as <unk> (the word to predict is unchanged)."""
    attention_reg: float = 1.0
    """Weight of the doubly stochastic attention penalty (Show, Attend and Tell eq. 14)."""
    grad_clip: float = 5.0
    """Gradient norm clip (0 disables)."""
    seed: int = 0
    """Seed for weights, shuffling and dropout."""
    patience: int = 4
    """Stop after this many epochs without a better validation CIDEr (0 disables early stopping)."""
    val_max_images: int = 0
    """Decode at most this many validation images per epoch (0 = all)."""
    ema_decay: float = 0.0
    """Decay of the moving average of the weights that is validated and kept as the model (0 = no average); the
    decay after n steps is min(ema_decay, (1 + n) / (10 + n)), so short runs are not dominated by the start."""
    scst_epochs: int = 0
    """Self-critical sequence training epochs with a CIDEr-D reward after cross-entropy (0 = none)."""
    scst_lr: float = 2e-5
    """Learning rate during self-critical training."""
    scst_samples: int = 5
    """Sampled captions per image in self-critical training (their mean reward is the baseline)."""
    scst_candidates: str = "sample"
    """Where self-critical candidates come from: `sample` (sampled from the model) or `beam` (the n-best list of
    a beam search of width scst_samples)."""
    scst_dropout: bool = False
    """Keep dropout on while self-critical candidates are drawn and scored. Off (the default), the candidates
    and their rewards are those of the model that is validated and shipped."""
    init_from: str = ""
    """Start from a trained model instead of random weights: a shipped model's name (`captioner models` lists
    them) or a checkpoint path. The run keeps its vocabulary (`data.min_word_count` is not applied) and its
    weights, scores it on the validation splits as epoch 0 (the score a later epoch must beat to be kept), then
    trains `epochs` cross-entropy epochs at `lr` (lower it: the model is trained already) and `scst_epochs`
    self-critical ones; `epochs: 0` goes straight to self-critical training. The `model` section must describe
    the starting model's network (only the dropout rates may differ). `--resume` continues from the run's own
    state and does not read this model again."""
    num_workers: int = 0
    """Image-decoding worker processes while extracting features."""
    skip_cache_check: bool = False
    """Trust cached features without re-checking the image files' size and modification time."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("batch_size", "captions_per_image"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name} must be >= 1")
        if self.epochs < (0 if self.init_from else 1):
            problems.append("train.epochs must be >= 1 (or >= 0 with train.init_from)")
        if self.init_from and not self.epochs and not self.scst_epochs:
            problems.append("train.init_from with train.epochs: 0 needs train.scst_epochs >= 1")
        if not self.lr > 0:  # also nan
            problems.append(f"train.lr must be > 0, got {self.lr}")
        if self.encoder_head_lr < 0:
            problems.append("train.encoder_head_lr must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append("train.label_smoothing must be in [0, 1)")
        if not 0.0 <= self.word_dropout < 1.0:
            problems.append("train.word_dropout must be in [0, 1)")
        if self.scst_candidates not in ("sample", "beam"):
            problems.append(f"train.scst_candidates must be 'sample' or 'beam', got {self.scst_candidates!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append("train.ema_decay must be in [0, 1)")
        problems += _finite(self, "train")
        problems += _at_least(self, "train", {"warmup_steps": 0, "patience": 0, "val_max_images": 0,
                                              "scst_epochs": 0, "scst_samples": 1, "num_workers": 0})
        for name in ("weight_decay", "grad_clip", "attention_reg"):
            if getattr(self, name) < 0:
                problems.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.scst_lr <= 0:
            problems.append(f"train.scst_lr must be > 0, got {self.scst_lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.out_dir:
            problems.append("train.out_dir must not be empty")
        problems += _not_a_file(self.out_dir, "train.out_dir")
        _raise(problems)


@dataclass
class Config:
    """A whole training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def _finite(obj: Any, section: str) -> list[str]:
    """Problems for every float field of `obj` that is nan or infinite."""
    return [f"{section}.{f.name} must be a finite number, got {getattr(obj, f.name)}"
            for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), float) and not math.isfinite(getattr(obj, f.name))]


def _at_least(obj: Any, section: str, lows: dict[str, int]) -> list[str]:
    return [f"{section}.{name} must be >= {low}, got {getattr(obj, name)}" for name, low in lows.items()
            if getattr(obj, name) < low]


def _not_a_file(value: str, key: str) -> list[str]:
    return [f"{key} {value} exists and is a file, not a folder"] if value and Path(value).is_file() else []


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


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
        raise ConfigError(f"invalid config:\n  - {where}: expected {annotation}, got {short_repr(value)}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of 309+ digits (YAML, --set, a checkpoint's JSON): no float holds it
            raise ConfigError(f"invalid config:\n  - {where} must be a finite number, got an integer too "
                              "large for a float") from None
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"invalid config:\n  - {where}: expected true/false, got {short_repr(value)}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"invalid config:\n  - {where}: expected an integer, got {short_repr(value)}")
    if not isinstance(value, annotation):
        raise ConfigError(
            f"invalid config:\n  - {where}: expected {annotation.__name__}, got {type(value).__name__} {short_repr(value)}"
        )
    return value


def dataclass_from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build config dataclass `cls` from a mapping, rejecting unknown keys and wrong types (ConfigError)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config:\n  - {where or 'top level'}: expected a mapping, got {short_repr(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - set(fields))  # YAML keys may be 1, True (yes/on) or None (~)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            "invalid config:\n  - unknown key(s) "
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
                raise ConfigError(f"invalid config:\n  - {key}: expected a list, got {short_repr(value)}")
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
        raise ConfigError(re.sub(r"- data(?=[.:])(?!\.datasets\[)", f"- {where}", str(exc))) from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping (unknown keys and wrong types raise ConfigError)."""
    return dataclass_from_dict(Config, raw, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict form of any config dataclass (JSON and YAML safe)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"invalid config:\n  - override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    try:
        return key.strip().split("."), load_yaml(text)
    except YamlInputError as exc:
        raise ConfigError(f"invalid config:\n  - override {short_repr(item)}: {exc}") from exc


def _index(node: list, key: str, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"invalid config:\n  - override {short_repr(item)}: {key} is not an entry of that list "
                          f"(0..{len(node) - 1})")
    return int(key)


def _step(node: Any, key: str, item: str) -> Any:
    """One step of a dotted override: into a section, or by position into a list (`data.datasets.1.weight`)."""
    if isinstance(node, list):
        node = node[_index(node, key, item)]
    else:
        node = node.setdefault(key, {})
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"invalid config:\n  - override {short_repr(item)}: {key} is not a section")
    return node


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply `section.key=value` overrides and validate the result.

    Raises:
        ConfigError: the file is missing, empty, not UTF-8 or not YAML, has a duplicate key or expands to an
            absurd size (`captioner.config_io`), a key is unknown, or a value has the wrong type or range.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"invalid config:\n  - config file {path} does not exist")
        try:
            raw = load_yaml(path.read_bytes())
        except YamlInputError as exc:
            raise ConfigError(f"invalid config:\n  - {path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"invalid config:\n  - cannot read {path}: {exc.strerror}") from exc
        if raw is None:
            raise ConfigError(f"invalid config:\n  - {path} is empty")
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid config:\n  - {path}: the top level must be a mapping")
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


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the format `load_config` reads back)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
