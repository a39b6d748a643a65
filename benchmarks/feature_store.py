"""Peak memory and batch read time over one epoch of random batches: the feature store versus one .npy per image.

Writes a synthetic store of `--images` fp16 (N, D) rows (the real COCO shape is 120,000 x 81 x 1280, ~25 GB) and
an old-layout cache of `--old-images` files, then in a fresh process per layout reads one epoch of random batches
the way training does (`data.features[chosen].float()`): the new store through `FeatureRows`, the old cache as
today's `FeatureCache.load` did (np.load every file, np.stack, then index the in-memory tensor). Peak RSS is the
process's high-water mark (VmHWM); growth is that minus the RSS after the imports.

Page cache: before the first epoch the written files are fsynced and evicted from the page cache with
posix_fadvise(POSIX_FADV_DONTNEED) (per file, no root needed, nothing else's cache is touched), so epoch 1 reads
cold from disk; `--epochs 2` then runs a second epoch in the same process, as warm as the free memory allows (a
store larger than the page cache stays partly cold). The synthetic rows are one block of 256 random rows written
over and over: generation costs no CPU, the write is I/O-bound.

    python benchmarks/feature_store.py --images 120000 --old-images 10000 --epochs 2
"""

from __future__ import annotations

import argparse
import os
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


def evict(folder: Path) -> None:
    """fsync every file under `folder` and drop its pages from the page cache (the next read is cold)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _meminfo_mb(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _rss_mb(field: str) -> float:
    """A /proc/self/status memory line in MB (VmHWM is this process's own peak; ru_maxrss inherits the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def epoch(kind: str, folder: Path, images: int, batch: int, epochs: int) -> None:
    """Epochs of random batches in this process; prints 'peak_mb growth_mb load_s ms_epoch1 ms_epoch2 ...'."""
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
    means = []
    for e in range(epochs):
        order = torch.randperm(images).tolist()
        times = []
        epoch_started = time.perf_counter()
        for start in range(0, images, batch):
            t = time.perf_counter()
            x = features[order[start:start + batch]].float()  # (b, N, D), as iterate_batches + the training step
            times.append(time.perf_counter() - t)
            del x
            if len(times) % 500 == 0:
                print(f"  {kind} epoch {e + 1}: {len(times)} batches, {time.perf_counter() - epoch_started:.0f} s, "
                      f"RSS {_rss_mb('VmRSS'):.0f} MB, page cache {_meminfo_mb('Cached') / 1024:.1f} GB",
                      file=sys.stderr, flush=True)
        means.append(1000 * np.mean(times))
        print(f"  {kind} epoch {e + 1}: {len(times)} batches in {time.perf_counter() - epoch_started:.0f} s, "
              f"mean {means[-1]:.2f} ms, p50 {1000 * np.median(times):.2f} ms, "
              f"p99 {1000 * np.percentile(times, 99):.2f} ms, peak RSS {_rss_mb('VmHWM'):.0f} MB",
              file=sys.stderr, flush=True)
    peak = _rss_mb("VmHWM")
    print(f"{peak:.0f} {peak - base:.0f} {load_s:.2f} " + " ".join(f"{m:.2f}" for m in means))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120_000, help="rows of the new store")
    parser.add_argument("--old-images", type=int, default=10_000, help="files of the old per-image cache")
    parser.add_argument("--grid", type=int, default=81, help="N, grid cells per image")
    parser.add_argument("--dim", type=int, default=1280, help="D, channels per cell")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="epoch 1 cold (files evicted), later ones warm")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--_epoch", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._epoch:
        kind, folder, images = args._epoch
        return epoch(kind, Path(folder), int(images), args.batch, args.epochs)

    root = Path(args.dir or tempfile.mkdtemp(prefix="feature-store-bench-"))
    grid = (args.grid, args.dim)
    row_mb = args.grid * args.dim * 2 / 2**20
    try:
        rows = []
        print(f"{os.cpu_count()} CPUs, MemTotal {_meminfo_mb('MemTotal') / 1024:.1f} GB, "
              f"MemAvailable {_meminfo_mb('MemAvailable') / 1024:.1f} GB", file=sys.stderr, flush=True)
        for kind, count, build in (("store", args.images, build_store), ("old", args.old_images, build_old)):
            if count <= 0:
                continue
            folder = root / kind
            t = time.perf_counter()
            build(folder, count, grid)
            write_s = time.perf_counter() - t
            evict(folder)
            print(f"  {kind}: wrote {count} rows in {write_s:.0f} s; evicted from the page cache", file=sys.stderr,
                  flush=True)
            out = subprocess.run([sys.executable, __file__, "--_epoch", kind, str(folder), str(count),
                                  "--batch", str(args.batch), "--epochs", str(args.epochs)],
                                 stdout=subprocess.PIPE, text=True, check=True).stdout
            peak, grown, load_s, *batch_ms = out.split()
            rows.append((kind, count, count * row_mb / 1024, write_s, load_s, peak, grown, batch_ms))
            shutil.rmtree(folder)
        print(f"rows of {args.grid}x{args.dim} fp16 ({row_mb:.3f} MB), batch {args.batch}, random batches; "
              f"epoch 1 cold (files evicted from the page cache), later epochs warm")
        print(f"{'layout':<22}{'images':>8}{'GiB':>7}{'write s':>9}{'open s':>8}{'peak RSS MB':>13}"
              f"{'RSS growth MB':>15}" + "".join(f"{f'ms/batch e{e + 1}':>15}" for e in range(args.epochs)))
        names = {"store": "feature store (new)", "old": "one .npy per image"}
        for kind, count, gb, write_s, load_s, peak, grown, batch_ms in rows:
            print(f"{names[kind]:<22}{count:>8}{gb:>7.1f}{write_s:>9.1f}{float(load_s):>8.2f}{peak:>13}{grown:>15}"
                  + "".join(f"{m:>15}" for m in batch_ms))
        old = [r for r in rows if r[0] == "old"]
        if old:
            print(f"old layout scaled to {args.images} images: RSS growth "
                  f"~{int(old[0][6]) * args.images / old[0][1]:.0f}"
                  f" MB (it holds every row in memory)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
