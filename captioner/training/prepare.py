"""From a config to cached features: read each dataset's splits, check the images, run the encoder once per image.

Under torchrun each rank encodes its share of the images into its own shard of the shared feature store; every
rank then reads all of them. The splits hold views of the store (`FeatureRows`): batches read their rows from disk.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.config import Config, DatasetConfig
from captioner.config.checks import config_error
from captioner.data.dataset import CaptionSet
from captioner.data.features import FeatureCache
from captioner.data.readers import DatasetError, Sample
from captioner.data.splits import check_images, read_dataset
from captioner.escapes import path_line, text_field
from captioner.models.encoder import build_encoder
from captioner.models.vocab import SPECIALS, Vocabulary, tokenize
from captioner.training.distributed import Dist, gather
from captioner.training.log import log


@dataclass
class Prepared:
    train: CaptionSet
    """Every dataset's training images in one set, each with its dataset's sampling weight."""
    vals: dict[str, CaptionSet]
    """Validation set per dataset, by its label, in the config's order."""
    encoder_dim: int
    encoder_head: torch.nn.Linear | None = None
    """The pretrained head cut off the encoder (`model.encoder_head`), for the decoder to start from."""
    selection: dict[str, float] = field(default_factory=dict)
    """Weight of each dataset's validation CIDEr-D in the selection score, by label."""


def split_name(cfg: Config, source: DatasetConfig, split: str) -> str:
    """How messages name a split: "dev split", or "coco_small dev split" in a recipe of several datasets."""
    return f"{source.label()} {split} split" if cfg.data.datasets else f"{split} split"


def empty_split(source: DatasetConfig, split: str, what: str, read: int) -> DatasetError:
    """The error for a split left with no usable image, saying why and what would fill it; `read`: the samples
    the split had before missing images were dropped.

    Why: a small CSV, JSONL or COCO file without a validation file or list holds out data.val_fraction of its
    images, which for the README's three-row example is none, and the error said only "no usable images"."""
    if read:
        return DatasetError(f"the {what} has no usable images (all {read} are missing or unreadable)")
    own_list = source.val_list if split in ("dev", "val") else source.train_list
    if split in ("dev", "val") and source.format in ("coco", "csv", "jsonl") and not (source.val_annotations
                                                                                       or own_list):
        return DatasetError(f"the {what} has no images: it holds out val_fraction ({source.val_fraction:g}) of the "
                            "annotation file's images, which is none of them here; raise data.val_fraction, or "
                            "name the validation images with data.val_annotations or data.val_list")
    return DatasetError(f"the {what} has no images")


def _read(cfg: Config, source: DatasetConfig, split: str, limit: int, dist: Dist) -> list[Sample]:
    """One dataset's split as training reads it: the first `limit` images, missing files checked."""
    samples = read_dataset(source, split)
    if limit:
        samples = samples[:limit]
    what = split_name(cfg, source, split)
    read = len(samples)
    samples, missing = check_images(samples, cfg.data.on_missing, what)
    if missing and dist.is_main:
        log(f"skipping {len(missing)} missing images of the {what} (data.on_missing=skip)")
    if not samples:  # here, before any split is encoded: not after the training split's hours of extraction
        raise empty_split(source, split, what, read)
    return samples


def build_vocabulary(captions: Iterable[str], min_count: int) -> Vocabulary:
    """The vocabulary of the training captions (`data.min_word_count`); one that would hold no word is refused, as
    its model could only ever say <unk> (validation then failed with an IndexError traceback)."""
    captions = list(captions)
    vocab = Vocabulary.build(captions, min_count)
    if len(vocab) == len(SPECIALS):
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        top = counts.most_common(1)
        most = f" (the most frequent, {top[0][0]!r}, occurs {top[0][1]} times)" if top else ""
        raise DatasetError(f"no word of the training captions occurs data.min_word_count={min_count} times{most}: "
                           "the vocabulary would be empty; lower data.min_word_count")
    return vocab


def _extract(cfg: Config, cache: FeatureCache, samples: list[Sample], what: str, dist: Dist,
             mirrored: FeatureCache | None = None, weights: list[float] | None = None) -> CaptionSet:
    """Encode (or reuse) the images of `samples` and return them as a CaptionSet reading the feature store;
    `weights` are the samples' sampling weights (kept for the usable ones)."""
    weight_of = dict(zip((id(s) for s in samples), weights or [1.0] * len(samples)))
    images = [s.image for s in samples]
    # Each rank encodes its share of the images; afterwards every rank reads all of them from the cache.
    mine = cache.extract(images[dist.rank::dist.world], num_workers=max(1, cfg.train.num_workers),
                         progress=dist.is_main)
    failures = [f for part in gather(mine, dist) for f in part]
    if failures:
        if cfg.data.on_missing == "error":
            raise DatasetError(f"{len(failures)} unreadable image(s) in the {what}:{_listed(failures)}")
        if dist.is_main:
            log(f"skipping {len(failures)} unreadable images of the {what}")
        bad = {p for p, _ in failures}
        samples = [s for s in samples if s.image not in bad]
    if not samples:
        raise DatasetError(f"the {what} has no usable images")
    images = [s.image for s in samples]
    if mirrored is not None:  # the readable images, mirrored left-right
        mine = mirrored.extract(images[dist.rank::dist.world], num_workers=max(1, cfg.train.num_workers),
                                progress=dist.is_main)
        lost = [f for part in gather(mine, dist) for f in part]  # also every rank's share done before reading
        if lost:  # read a moment ago: the files changed under the run
            raise DatasetError(f"{len(lost)} image(s) of the {what} became unreadable:{_listed(lost)}")
    kept = [weight_of[id(s)] for s in samples]
    return CaptionSet(images, cache.load(images), [s.captions for s in samples],
                      mirrored.load(images) if mirrored is not None else None,
                      weights=None if all(w == 1.0 for w in kept) else kept)


def _listed(failures: list[tuple[Path, str]]) -> str:
    """The first 20 failures, one "path: reason" per indented line (each on one line, its controls shown)."""
    return "".join(f"\n  {path_line(p)}: {text_field(why)}" for p, why in failures[:20])


def prepare_data(cfg: Config, dist: Dist | None = None) -> Prepared:
    """Read every dataset's two splits, check images, and extract (or reuse) their encoder features.

    The training images of all datasets form one set (each image keeps its dataset's sampling weight); each
    dataset keeps its own validation set."""
    dist = dist or Dist()
    encoder = build_encoder(cfg.model.encoder, cfg.model.encoder_weights, image_size=cfg.model.image_size,
                            headless=bool(cfg.model.encoder_head))
    if encoder.head is not None and encoder.head.out_features != cfg.model.encoder_head:
        raise config_error(f"model.encoder_head is {cfg.model.encoder_head} but {encoder.name}'s "
                           f"last 1x1 convolution has {encoder.head.out_features} channels")
    cache = FeatureCache(cfg.data.cache_dir, encoder)
    mirrored = FeatureCache(cfg.data.cache_dir, encoder, mirrored=True) if cfg.data.mirror else None
    sources = cfg.data.sources()
    # Every split of every dataset is read (and its files checked) before the first image is encoded, so a bad
    # list or a missing file stops the run before hours of extraction, not after.
    train_samples: list[Sample] = []
    weights: list[float] = []
    val_samples = {}
    for source in sources:
        if source.weight:  # weight 0: validated and logged, not trained on
            samples = _read(cfg, source, source.train_split, source.max_images, dist)
            train_samples += samples
            weights += [source.weight] * len(samples)
        val_samples[source.label()] = _read(cfg, source, source.val_split, cfg.train.val_max_images, dist)
    what = "training split" if cfg.data.datasets else f"{sources[0].train_split} split"
    train = _extract(cfg, cache, train_samples, what, dist, mirrored, weights)
    vals = {}
    for source in sources:
        vals[source.label()] = _extract(cfg, cache, val_samples[source.label()],
                                        split_name(cfg, source, source.val_split), dist)
    return Prepared(train, vals, encoder.feature_dim, encoder.head,
                    selection={source.label(): source.selection_weight for source in sources})


def validate_paths(cfg: Config) -> None:
    """Fail before any work when the data the config names does not exist."""
    many = bool(cfg.data.datasets)
    problems = []
    for i, source in enumerate(cfg.data.sources()):
        where = f"data.datasets[{i}]" if many else "data"
        if source.format == "flickr8k":
            if not Path(source.root).is_dir():
                problems.append(f"{where}.root {source.root!r} is not a folder")
        else:
            if not Path(source.annotations).is_file():
                problems.append(f"{where}.annotations {source.annotations!r} does not exist")
            for key in ("val_annotations", "train_list", "val_list"):
                value = getattr(source, key)
                if value and not Path(value).is_file():
                    problems.append(f"{where}.{key} {value!r} does not exist")
        if source.images and not Path(source.images).is_dir():
            problems.append(f"{where}.images {source.images!r} is not a folder")
    if cfg.model.encoder_weights and not Path(cfg.model.encoder_weights).is_file():
        problems.append(f"model.encoder_weights {cfg.model.encoder_weights!r} does not exist")
    for key, folder in (("train.out_dir", cfg.train.out_dir), ("data.cache_dir", cfg.data.cache_dir)):
        problem = folder_problem(folder)
        if problem:
            problems.append(f"{key} {folder}: {problem}")
    if problems:
        raise config_error(*problems)


def folder_problem(folder: str) -> str | None:
    """Why `folder` can be neither used nor made as a folder, or None when it can (as far as its path tells).

    Looked at before anything is written: `mkdir(parents=True, exist_ok=True)` later failed with a traceback on a
    dangling symbolic link (FileExistsError), a regular file on the path (NotADirectoryError) or a symbolic link
    loop (ELOOP), the last after the run folder's config.yaml was written. Permissions are left to the write
    itself (exit 4): they can change, and root ignores them.
    """
    path = Path(folder)
    looping: Path | None = None
    for part in (path, *path.parents):
        try:
            os.stat(part)
        except FileNotFoundError:
            if part.is_symlink():
                return f"{part} is a symbolic link to {os.readlink(part)}, which does not exist"
            continue
        except NotADirectoryError:  # a file further up: found by the loop
            continue
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                return f"cannot be looked at ({exc.strerror or exc})"
            looping = part  # the outermost part still in the loop is the link that makes it
            continue
        if looping is not None:
            return f"{looping} is inside a loop of symbolic links"
        return None if part.is_dir() else f"{part} is a file, not a folder"
    return None
