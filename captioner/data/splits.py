"""Which images and captions a split holds: split lists, a hash split, the dataset's own splits, and which of
its images can be read.

COCO, CSV and JSONL take their splits from split lists (`train_list`, `val_list`: one file name per line), a second
annotation file, or else hold out a deterministic share of images (by a hash of the file name) so that every run
and every machine agrees on the split. Flickr8k and Karpathy files name their own splits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from captioner.config import DatasetConfig
from captioner.data.readers import (
    DatasetError,
    Sample,
    read_coco,
    read_flickr8k,
    read_karpathy,
    read_table,
    require_file,
)


def _held_out(image: Path, fraction: float) -> bool:
    digest = hashlib.sha1(image.name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def read_split_list(path: str | Path) -> list[str]:
    """Image names of a split list: one per line, blank lines and outer whitespace ignored."""
    listed = require_file(Path(path), "split list")
    try:  # utf-8-sig: a byte order mark would be part of the first name (see `_read_text`)
        names = [line.strip() for line in listed.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{listed}: not UTF-8 text ({exc.reason})") from exc
    if not names:
        raise DatasetError(f"{listed}: the split list is empty")
    return names


def _listed(samples: list[Sample], list_file: str, base: Path) -> list[Sample]:
    """The samples a split list names, in the list's order. A name is the image's path relative to the image
    folder (for COCO its `file_name`); a listed name without captions is an error, not a silent drop."""
    by_name: dict[str, Sample] = {}
    for s in samples:
        try:
            by_name[s.image.relative_to(base).as_posix()] = s
        except ValueError:  # an absolute path outside the folder (CSV rows may hold those)
            by_name[s.image.as_posix()] = s
    names = read_split_list(list_file)
    absent = [n for n in names if n not in by_name]
    if absent:
        raise DatasetError(f"{list_file}: {len(absent)} listed image(s) have no captions in the annotations, "
                           f"e.g. {absent[:3]}")
    return [by_name[n] for n in dict.fromkeys(names)]


SPLITS = ("train", "dev", "val", "test")
"""The split names of the flickr8k, coco, csv and jsonl readers (karpathy's come from its file)."""


def check_split(fmt: str, split: str) -> None:
    """Refuse a split name the reader of `fmt` does not know. Why: coco, csv and jsonl took any name other than
    dev/val/test for the training share, so `--split bogus` scored the training images under that name."""
    if fmt != "karpathy" and split not in SPLITS:
        raise DatasetError(f"unknown {fmt} split {split!r}; choose one of {', '.join(SPLITS)}")


def _check_disjoint(cfg: DatasetConfig) -> None:
    """Refuse a train list and a dev list that name the same image. Why: the run validated on images it trained
    on, and chose its best epoch and reported its scores from them, without a word."""
    if not (cfg.train_list and cfg.val_list):
        return
    shared = sorted(set(read_split_list(cfg.train_list)) & set(read_split_list(cfg.val_list)))
    if shared:
        raise DatasetError(f"{cfg.label()}: data.train_list {cfg.train_list} and data.val_list {cfg.val_list} "
                           f"share {len(shared)} image(s), e.g. {shared[:3]}: the dev split would score images "
                           "the model trained on")


def read_dataset(cfg: DatasetConfig, split: str) -> list[Sample]:
    """Samples of `split` ("train", "dev"/"val" or "test") for the dataset `cfg` describes."""
    fmt = cfg.format
    if fmt == "flickr8k":
        return read_flickr8k(cfg.root, split)
    if fmt == "karpathy":
        return read_karpathy(cfg.annotations, cfg.images or Path(cfg.annotations).parent, split)
    check_split(fmt, split)
    is_val = split in ("dev", "val")
    if is_val and cfg.val_annotations:
        annotations = cfg.val_annotations
    else:
        annotations = cfg.annotations
    samples = (read_coco(annotations, cfg.images) if fmt == "coco" else read_table(annotations, cfg.images or None))
    # A split with its own list takes the images listed; one without falls back to val_annotations or the hash
    # split, which for the other split then leaves out what a list claims (so the two never overlap).
    list_file = {"train": cfg.train_list, "dev": cfg.val_list, "val": cfg.val_list}.get(split, "")
    base = Path(cfg.images) if cfg.images or fmt == "coco" else Path(annotations).parent  # as the readers join
    if list_file:
        _check_disjoint(cfg)
        return _listed(samples, list_file, base)
    if split == "test" and (cfg.train_list or cfg.val_list):
        raise DatasetError(f"{cfg.label()}: no split list for the 'test' split (data.train_list is the train "
                           "split's, data.val_list the dev split's)")
    other = cfg.val_list if split == "train" else cfg.train_list
    if other and not cfg.val_annotations:
        claimed = {s.image for s in _listed(samples, other, base)}
        return [s for s in samples if s.image not in claimed]
    if cfg.val_annotations or split == "test":
        return samples
    return [s for s in samples if _held_out(s.image, cfg.val_fraction) == is_val]


def _usable(image: Path) -> bool:
    """Whether `image` is a non-empty file; a name the file system refuses (too long, ...) is a missing image."""
    try:
        return image.is_file() and image.stat().st_size > 0
    except OSError:
        return False


def check_images(samples: list[Sample], on_missing: str, what: str = "dataset") -> tuple[list[Sample], list[Path]]:
    """Find images that are missing or empty. `on_missing="error"` raises with the list; "skip" drops them.

    Returns:
        The usable samples and the list of dropped images.
    """
    missing = [s.image for s in samples if not _usable(s.image)]
    if missing and on_missing == "error":
        listed = "\n  ".join(str(p) for p in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DatasetError(f"{len(missing)} image(s) of the {what} are missing or empty:\n  {listed}{more}\n"
                           "(set data.on_missing=skip to train without them)")
    bad = set(missing)
    return [s for s in samples if s.image not in bad], missing
