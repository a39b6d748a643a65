"""From a config to cached features: read the splits, check the images, run the encoder once per image.

Under torchrun each rank encodes its share of the images into its own shard of the shared feature store; every
rank then reads all of them. The splits hold views of the store (`FeatureRows`): batches read their rows from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.config import Config, ConfigError
from captioner.data.dataset import CaptionSet
from captioner.data.features import FeatureCache
from captioner.data.readers import DatasetError, check_images, read_dataset
from captioner.models.encoder import build_encoder
from captioner.training.distributed import Dist, gather
from captioner.training.log import log


@dataclass
class Prepared:
    train: CaptionSet
    val: CaptionSet
    encoder_dim: int
    encoder_head: torch.nn.Linear | None = None
    """The pretrained head cut off the encoder (`model.encoder_head`), for the decoder to start from."""


def _load_split(cfg: Config, cache: FeatureCache, split: str, limit: int, dist: Dist,
                mirrored: FeatureCache | None = None) -> CaptionSet:
    samples = read_dataset(cfg.data, split)
    if limit:
        samples = samples[:limit]
    samples, missing = check_images(samples, cfg.data.on_missing, f"{split} split")
    if missing and dist.is_main:
        log(f"skipping {len(missing)} missing images of the {split} split (data.on_missing=skip)")
    images = [s.image for s in samples]
    # Each rank encodes its share of the images; afterwards every rank reads all of them from the cache.
    mine = cache.extract(images[dist.rank::dist.world], num_workers=max(1, cfg.train.num_workers),
                         progress=dist.is_main)
    failures = [f for part in gather(mine, dist) for f in part]
    if failures:
        if cfg.data.on_missing == "error":
            raise DatasetError(f"{len(failures)} unreadable image(s) in the {split} split:{_listed(failures)}")
        if dist.is_main:
            log(f"skipping {len(failures)} unreadable images of the {split} split")
        bad = {p for p, _ in failures}
        samples = [s for s in samples if s.image not in bad]
    if not samples:
        raise DatasetError(f"the {split} split has no usable images")
    images = [s.image for s in samples]
    if mirrored is not None:  # the readable images, mirrored left-right
        mine = mirrored.extract(images[dist.rank::dist.world], num_workers=max(1, cfg.train.num_workers),
                                progress=dist.is_main)
        lost = [f for part in gather(mine, dist) for f in part]  # also every rank's share done before reading
        if lost:  # read a moment ago: the files changed under the run
            raise DatasetError(f"{len(lost)} image(s) of the {split} split became unreadable:{_listed(lost)}")
    return CaptionSet(images, cache.load(images), [s.captions for s in samples],
                      mirrored.load(images) if mirrored is not None else None)


def _listed(failures: list[tuple[Path, str]]) -> str:
    """The first 20 failures, one "path: reason" per indented line."""
    return "".join(f"\n  {p}: {why}" for p, why in failures[:20])


def prepare_data(cfg: Config, dist: Dist | None = None) -> Prepared:
    """Read both splits, check images, and extract (or reuse) their encoder features."""
    dist = dist or Dist()
    encoder = build_encoder(cfg.model.encoder, cfg.model.encoder_weights, image_size=cfg.model.image_size,
                            headless=bool(cfg.model.encoder_head))
    if encoder.head is not None and encoder.head.out_features != cfg.model.encoder_head:
        raise ConfigError(f"invalid config:\n  - model.encoder_head is {cfg.model.encoder_head} but {encoder.name}'s "
                          f"last 1x1 convolution has {encoder.head.out_features} channels")
    cache = FeatureCache(cfg.data.cache_dir, encoder)
    mirrored = FeatureCache(cfg.data.cache_dir, encoder, mirrored=True) if cfg.data.mirror else None
    train = _load_split(cfg, cache, cfg.data.train_split, cfg.data.max_images, dist, mirrored)
    val = _load_split(cfg, cache, cfg.data.val_split, cfg.train.val_max_images, dist)
    return Prepared(train, val, encoder.feature_dim, encoder.head)


def validate_paths(cfg: Config) -> None:
    """Fail before any work when the data the config names does not exist."""
    problems = []
    if cfg.data.format == "flickr8k":
        if not Path(cfg.data.root).is_dir():
            problems.append(f"data.root {cfg.data.root!r} is not a folder")
    else:
        if not Path(cfg.data.annotations).is_file():
            problems.append(f"data.annotations {cfg.data.annotations!r} does not exist")
        if cfg.data.val_annotations and not Path(cfg.data.val_annotations).is_file():
            problems.append(f"data.val_annotations {cfg.data.val_annotations!r} does not exist")
    if cfg.data.images and not Path(cfg.data.images).is_dir():
        problems.append(f"data.images {cfg.data.images!r} is not a folder")
    if cfg.model.encoder_weights and not Path(cfg.model.encoder_weights).is_file():
        problems.append(f"model.encoder_weights {cfg.model.encoder_weights!r} does not exist")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
