"""Peak memory and batch read time over one epoch of random batches: the feature store versus one .npy per image.

Writes a synthetic store of `--images` fp16 (N, D) rows (the real COCO shape is 120,000 x 81 x 1280, ~25 GB) and
an old-layout cache of `--old-images` files, then in a fresh process per layout reads one epoch of random batches
the way training does (`data.features[chosen].float()`): the new store through `FeatureRows`, the old cache as
today's `FeatureCache.load` did (np.load every file, np.stack, then index the in-memory tensor). Peak RSS is the
process's high-water mark (VmHWM); growth is that minus the RSS after the imports. The page cache is not dropped
(no root): read times are warm-cache times unless the data outgrows memory.

    python benchmarks/feature_store.py --images 120000 --old-images 10000
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_store(folder: Path, images: int, grid: tuple[int, int]) -> None:
    from captioner.data.feature_store import FeatureStore

    store = FeatureStore(folder, flush_every=4096)
    writer = store.writer(images)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((256, *grid)).astype(np.float16)  # (b, N, D) reused: writing, not RNG, is timed
    for start in range(0, images, 256):
        count = min(256, images - start)
        writer.add([f"img{i}" for i in range(start, start + count)], block[:count])
    writer.close()


def build_old(folder: Path, images: int, grid: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).standard_normal((256, *grid)).astype(np.float16)
    for i in range(images):
        np.save(folder / f"img{i}.npy", block[i % 256], allow_pickle=False)


def _rss_mb(field: str) -> float:
    """A /proc/self/status memory line in MB (VmHWM is this process's own peak; ru_maxrss inherits the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def epoch(kind: str, folder: Path, images: int, batch: int) -> None:
    """One epoch of random batches in this process; prints 'peak_mb growth_mb load_s mean_batch_ms'."""
    import torch

    base = _rss_mb("VmRSS")
    started = time.perf_counter()
    if kind == "store":
        from captioner.data.feature_store import FeatureStore

        features = FeatureStore(folder).rows([f"img{i}" for i in range(images)])
    else:  # today's FeatureCache.load
        features = torch.from_numpy(np.stack([np.load(folder / f"img{i}.npy", allow_pickle=False)
                                              for i in range(images)]))
    load_s = time.perf_counter() - started
    order = torch.randperm(images).tolist()
    times = []
    for start in range(0, images, batch):
        t = time.perf_counter()
        x = features[order[start:start + batch]].float()  # (b, N, D), as iterate_batches + the training step
        times.append(time.perf_counter() - t)
        del x
    peak = _rss_mb("VmHWM")
    print(f"{peak:.0f} {peak - base:.0f} {load_s:.2f} {1000 * np.mean(times):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120_000, help="rows of the new store")
    parser.add_argument("--old-images", type=int, default=10_000, help="files of the old per-image cache")
    parser.add_argument("--grid", type=int, default=81, help="N, grid cells per image")
    parser.add_argument("--dim", type=int, default=1280, help="D, channels per cell")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--_epoch", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._epoch:
        kind, folder, images = args._epoch
        return epoch(kind, Path(folder), int(images), args.batch)

    root = Path(args.dir or tempfile.mkdtemp(prefix="feature-store-bench-"))
    grid = (args.grid, args.dim)
    row_mb = args.grid * args.dim * 2 / 2**20
    try:
        rows = []
        for kind, count, build in (("store", args.images, build_store), ("old", args.old_images, build_old)):
            folder = root / kind
            t = time.perf_counter()
            build(folder, count, grid)
            write_s = time.perf_counter() - t
            out = subprocess.run([sys.executable, __file__, "--_epoch", kind, str(folder), str(count),
                                  "--batch", str(args.batch)], capture_output=True, text=True, check=True).stdout
            peak, grown, load_s, batch_ms = out.split()
            rows.append((kind, count, count * row_mb / 1024, write_s, load_s, peak, grown, batch_ms))
            shutil.rmtree(folder)
        print(f"rows of {args.grid}x{args.dim} fp16 ({row_mb:.3f} MB), batch {args.batch}, one epoch of random batches")
        print(f"{'layout':<22}{'images':>8}{'GB':>7}{'write s':>9}{'open s':>8}{'peak RSS MB':>13}"
              f"{'RSS growth MB':>15}{'ms/batch':>10}")
        names = {"store": "feature store (new)", "old": "one .npy per image"}
        for kind, count, gb, write_s, load_s, peak, grown, batch_ms in rows:
            print(f"{names[kind]:<22}{count:>8}{gb:>7.1f}{write_s:>9.1f}{float(load_s):>8.2f}{peak:>13}{grown:>15}"
                  f"{batch_ms:>10}")
        old = rows[1]
        print(f"old layout scaled to {args.images} images: RSS growth ~{int(old[6]) * args.images / old[1]:.0f} MB "
              f"(it holds every row in memory)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
