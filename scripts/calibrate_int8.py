"""Measure the int8 encoder's activation ranges for a checkpoint, on training images, once.

    .venv/bin/python scripts/calibrate_int8.py --images ../shared/data/flickr8k/Images \
        --list ../shared/data/flickr8k/Flickr_8k.trainImages.txt [--checkpoint captioner/weights/flickr8k.safetensors]
        [--count 256] [--seed 0]

`--images`/`--list` may be given several times, in pairs (a model trained on several datasets: its training
images of each); the images are drawn from all of them together.

Writes `<checkpoint>.int8.json` (beside the checkpoint), which `--precision int8` / `precision="int8"` reads.
Use training images only: the ranges are a choice made from data, like the weights. `--count` images are drawn
with `--seed` from the list (every image of `--images` without one), preprocessed as captioning does.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from captioner import Captioner
from captioner.api import default_model_path
from captioner.images import ImageLoadError
from captioner.runtime.fast import export_onnx
from captioner.runtime.int8 import calibrate, calibration_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True, action="append", help="folder of images (repeatable)")
    parser.add_argument("--list", type=Path, action="append",
                        help="file names to draw from, one per line (a training split); one per --images")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the general model")
    parser.add_argument("--count", type=int, default=256, help="images drawn from the lists (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per calibration batch (default: 16)")
    args = parser.parse_args()
    if args.count < 1 or args.batch_size < 1:
        parser.error("--count and --batch-size must be >= 1")
    checkpoint = args.checkpoint or default_model_path()
    lists = args.list or [None] * len(args.images)
    if len(lists) != len(args.images):
        parser.error("give one --list per --images, or none")
    try:
        names = _names(args.images, lists)
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read the images or their list: {exc}")
    chosen = random.Random(args.seed).sample(names, min(args.count, len(names)))
    cap = Captioner.load(checkpoint, precision="reference")
    batches = _batches(cap, chosen, args.batch_size)
    first = next(batches, None)
    if first is None:
        parser.error(f"none of the {len(chosen)} chosen images could be read")
    out = calibration_path(checkpoint)
    seen = calibrate(export_onnx(cap.encoder), itertools.chain([first], batches), cap.encoder.cache_key(), out)
    print(f"{out}: ranges from {seen} images of {', '.join(map(str, args.list or args.images))}")
    return 0


def _names(folders: list[Path], lists: list[Path | None]) -> list[Path]:
    """Every image path the lists name (or every file of a folder given without a list)."""
    names = []
    for folder, listed in zip(folders, lists):
        names += [folder / n for n in ([line.strip() for line in listed.read_text().splitlines() if line.strip()]
                                       if listed else sorted(p.name for p in folder.iterdir() if p.is_file()))]
    return names


def _batches(cap: Captioner, chosen: list[Path], size: int) -> Iterator[np.ndarray]:
    """The chosen images preprocessed as captioning does, `size` at a time; an image that cannot be read is named
    on stderr and left out (a listed file that is missing or not an image ended the run in a traceback)."""
    batch: list[torch.Tensor] = []
    for name in chosen:
        try:
            batch.append(cap.preprocess(name))
        except ImageLoadError as exc:
            print(f"calibrate_int8: skipped {exc}", file=sys.stderr)
        if len(batch) == size:
            yield torch.stack(batch).numpy().astype(np.float32)
            batch = []
    if batch:
        yield torch.stack(batch).numpy().astype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
