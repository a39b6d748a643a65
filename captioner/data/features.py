"""On-disk cache of encoder grids, so decoder epochs cost no CNN time.

Layout: `<cache_dir>/<encoder key hash>/` is a `FeatureStore` (a few large fp16 shards and their indexes, see
`feature_store.py`). The folder is keyed by the encoder's name, weights and preprocessing; a row by the image's
absolute path, size and modification time. A different encoder, preprocessing or a changed image file therefore
never reuses stale features. An interrupted extraction keeps every row its index lists and continues from there.
Caches of the old layout (one `<image key hash>.npy` per image) are read once into the store, with a log line.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps
from tqdm import tqdm

from captioner.data.feature_store import FeatureRows, FeatureStore, StoreError, log
from captioner.data.readers import DatasetError
from captioner.images import ImageLoadError, open_image
from captioner.models.encoder import Encoder

# Features since PyTorch took over bicubic/bilinear resizing from PIL (within 2 pixel levels, not identical):
# caches written before are not reused. Kept out of `Preprocess.key()`, which int8 calibration files record.
_RESIZE_VERSION = "|resize=torch-antialias"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class FeatureCache:
    """Encoder features per image file, computed once and read from disk row by row afterwards."""

    def __init__(self, cache_dir: str | Path, encoder: Encoder, mirrored: bool = False, flush_every: int = 512):
        """`mirrored` caches the features of the images flipped left-right (training augmentation), apart.
        `flush_every` rows at most are recomputed after an interrupted extraction."""
        self.encoder = encoder
        self.mirrored = mirrored
        key = encoder.cache_key() + _RESIZE_VERSION + ("|mirrored left-right" if mirrored else "")
        self.folder = Path(cache_dir) / _digest(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "ENCODER.txt").write_text(key + "\n")
        self.row_shape = (encoder.grid_size ** 2, encoder.feature_dim)  # (N, D) of one image's grid
        self.store = FeatureStore(self.folder, flush_every, stamp=key, row_shape=self.row_shape)

    @staticmethod
    def key_for(image: Path) -> str:
        """The row key: the image's absolute path, size and modification time."""
        image = Path(image).resolve()
        stat = image.stat()
        return _digest(f"{image}|{stat.st_size}|{stat.st_mtime_ns}")

    def path_for(self, image: Path) -> Path:
        """Where the old layout kept the image's features (read once into the store when found)."""
        return self.folder / f"{self.key_for(image)}.npy"

    def is_cached(self, image: Path) -> bool:
        return self.key_for(image) in self.store.index()

    def extract(self, images: Sequence[Path], batch_size: int = 32, num_workers: int = 2,
                progress: bool = True) -> list[tuple[Path, str]]:
        """Compute and store features for every image not cached yet.

        Returns:
            (image, reason) for each image that could not be decoded; its features are not stored.
        """
        done = self.store.index()
        failures: list[tuple[Path, str]] = []
        # Each key is taken before its image is read: one rewritten while it is encoded is then stored under its
        # old key (and encoded again by the next run), never its old pixels under the new key. An image gone since
        # the split was checked is a failure like an unreadable one, not a FileNotFoundError.
        keys: dict[Path, str] = {}
        for p in dict.fromkeys(images):
            try:
                keys[p] = self.key_for(p)
            except OSError as exc:
                failures.append((p, f"cannot be read ({exc.strerror or exc})"))
        todo = [p for p, k in keys.items() if k not in done]
        if not todo:
            return failures
        writer = self.store.writer(len(todo))
        todo = self._import_old_layout(todo, writer)
        if not todo:
            writer.close()
            return failures
        prep, encoder, mirrored = self.encoder.preprocess, self._compute, self.mirrored

        def load(path: Path) -> torch.Tensor | str:
            try:
                image = open_image(path, prep.size)
                return prep(ImageOps.mirror(image) if mirrored else image)
            except ImageLoadError as exc:
                return exc.reason

        bar = tqdm(total=len(todo), unit="img", desc="extracting features", disable=not progress)
        with ThreadPoolExecutor(max(1, num_workers)) as pool, torch.inference_mode():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                loaded = list(pool.map(load, chunk))
                good = [(p, x) for p, x in zip(chunk, loaded) if isinstance(x, torch.Tensor)]
                failures += [(p, x) for p, x in zip(chunk, loaded) if isinstance(x, str)]
                if good:
                    grids = encoder(torch.stack([x for _, x in good])).to(torch.float16).numpy()  # (b, N, D)
                    writer.add([keys[p] for p, _ in good], grids)
                bar.update(len(chunk))
        writer.close()
        bar.close()
        return failures

    def _import_old_layout(self, todo: list[Path], writer) -> list[Path]:
        """Copy the one-file-per-image entries of `todo` into the store; what is left to compute. A damaged old
        file is named and recomputed."""
        old = [p for p in todo if self.path_for(p).is_file()]
        if not old:
            return todo
        log(f"reading {len(old)} per-image feature files of the old cache layout in {self.folder} into the store "
            "(the old files can be deleted)")
        imported = set()
        for path in old:
            file = self.path_for(path)
            try:
                grid = np.load(file, allow_pickle=False)
                if grid.dtype != np.float16 or grid.shape != self.row_shape:
                    raise ValueError(f"expected an fp16 {self.row_shape} array, found {grid.dtype} {grid.shape}")
            except (OSError, ValueError) as exc:
                log(f"feature cache file {file} is damaged ({exc}); recomputing it")
                file.unlink(missing_ok=True)
                continue
            writer.add([self.key_for(path)], grid[None])
            imported.add(path)
        return [p for p in todo if p not in imported]

    @functools.cached_property
    def _compute(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What extraction runs, built once per cache (every split reuses it). On a CPU that is the fp32 fast
        path: the same function as `Encoder.forward` (ONNX Runtime or folded batch norm; differences far below
        the fp16 the cache stores), two to three times faster."""
        on_cpu = all(p.device.type == "cpu" for p in self.encoder.parameters())
        if not on_cpu:
            return self.encoder
        from captioner.runtime.fast import FastEncoder  # ONNX Runtime loads only when features are extracted

        return FastEncoder(self.encoder, "fp32")

    def load(self, images: Sequence[Path]) -> FeatureRows:
        """A (len(images), N, D) fp16 view of images already extracted; rows are read when indexed.

        Raises:
            DatasetError: an image was deleted or changed (its size or modification time) since it was encoded.
        """
        keys = []
        for p in images:
            try:
                keys.append(self.key_for(p))
            except OSError as exc:
                raise DatasetError(f"{p}: disappeared after its features were extracted "
                                   f"({exc.strerror or exc})") from exc
        try:
            return self.store.rows(keys)
        except StoreError as exc:
            index = self.store.index()
            changed = [p for p, k in zip(images, keys) if k not in index]
            if not changed:
                raise
            raise DatasetError(f"{len(changed)} image(s) changed after their features were extracted, e.g. "
                               f"{changed[0]}; run again to encode them") from exc
