"""Encoder grids in a few large memory-mapped arrays: written resumably, read row by row through the page cache.

Layout of one store folder: `shard-<id>.npy`, an fp16 (R, N, D) array preallocated (sparse) when an extraction
starts, and beside it `shard-<id>.index.json`, {"rows": {image key: row}, "encoder": the cache's key}, replaced
atomically every `flush_every` rows and at the end. The index lists only rows already written (the array is
flushed first), so an interrupted extraction loses at most the rows since the last flush; a rerun skips every
listed key. Each extraction (and each torchrun rank) writes its own shard, so concurrent writers never share a
file. A shard whose index is damaged, stamped with another encoder's key or of another row shape is named, removed
and recomputed. What a killed writer leaves (an array it never indexed, an index's temporary file) is removed when
the next extraction starts, once no process of that writer's id runs on this host.

Reading gathers rows with `os.preadv` into a fresh (b, N, D) buffer: the bytes come through the page cache but
are never mapped into the process, so a training run's resident memory does not grow with the dataset.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def log(message: str) -> None:
    """A line on stderr in the training log's format (data does not import training)."""
    print(f"[captioner {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class StoreError(ValueError):
    """A key asked of the store that it does not hold."""


@dataclass
class _Shard:
    path: Path
    offset: int  # bytes before row 0 (the .npy header)
    row_bytes: int
    shape: tuple[int, ...]  # (N, D) of one row
    fd: int


class FeatureRows:
    """A (I, N, D) fp16 view of store rows; indexing with ints, a list or a tensor reads them into a tensor.

    A slice is another view (nothing read). `float()` and `to(device)` read every row: use them on small sets.
    """

    def __init__(self, shards: list[_Shard], shard_of: np.ndarray, row_of: np.ndarray):
        self.shards, self.shard_of, self.row_of = shards, shard_of, row_of

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.row_of), *self.shards[0].shape)) if self.shards else torch.Size((0,))

    dtype = torch.float16
    device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.row_of)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, index) -> torch.Tensor | FeatureRows:
        if isinstance(index, slice):
            return FeatureRows(self.shards, self.shard_of[index], self.row_of[index])
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        scalar = np.ndim(index) == 0
        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        out = np.empty((len(index), *self.shards[0].shape), dtype=np.float16)  # (b, N, D)
        for i, (s, r) in enumerate(zip(self.shard_of[index].tolist(), self.row_of[index].tolist())):
            shard = self.shards[s]
            got = os.preadv(shard.fd, [memoryview(out[i]).cast("B")], shard.offset + r * shard.row_bytes)
            if got != shard.row_bytes:
                raise OSError(f"feature store file {shard.path} is shorter than its index says (row {r})")
        tensor = torch.from_numpy(out)
        return tensor[0] if scalar else tensor

    def tensor(self) -> torch.Tensor:
        """Every row, read into memory."""
        return self[np.arange(len(self))]

    def float(self) -> torch.Tensor:
        return self.tensor().float()

    def to(self, device: torch.device | str) -> torch.Tensor | FeatureRows:
        return self if torch.device(device).type == "cpu" else self.tensor().to(device)


def _host_tag() -> str:
    """A short tag of this host in shard names: a writer's process id means something only on its own host
    (ranks on several machines may share one cache folder)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _writer_gone(name: str, host: str) -> bool:
    """Whether the writer of a file named `shard-<time>-<pid>-<host>...` (or `shard-<time>-<pid>...`, before
    host tags) has stopped: its pid runs no process here. Another host's file, or a name that is not ours, is
    never judged gone."""
    parts = name.split(".", 1)[0].split("-")
    if len(parts) not in (3, 4) or parts[0] != "shard" or not (parts[2].isascii() and parts[2].isdigit()):
        return False
    if len(parts) == 4 and parts[3] != host:
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False  # running under another user, or not a pid this system can hold
    return False


class FeatureStore:
    """Rows keyed by string, in append-only shards of one folder."""

    def __init__(self, folder: str | Path, flush_every: int = 512, stamp: str = "",
                 row_shape: tuple[int, int] | None = None):
        """`stamp` (the encoder's cache key) is written into every index; a shard stamped otherwise (copied in
        from another encoder's folder: the row keys name only the image) is left out and removed. `row_shape`
        (N, D), when given, is the only shape of row kept: a shard of another (one written before stamps, by
        another encoder) is removed like a damaged one, and a writer refuses rows of another shape."""
        self.folder = Path(folder)
        self.stamp = stamp
        self.row_shape = tuple(row_shape) if row_shape is not None else None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._shards: dict[Path, _Shard] = {}

    def index(self) -> dict[str, tuple[Path, int]]:
        """key -> (shard file, row) of every complete row; damaged shards are named, removed and left out."""
        found: dict[str, tuple[Path, int]] = {}
        for index_file in sorted(self.folder.glob("shard-*.index.json")):
            array = index_file.with_name(index_file.name.removesuffix(".index.json") + ".npy")
            try:
                rows = self._read_index(index_file)
                shard = self._open(array)
                total = (array.stat().st_size - shard.offset) // shard.row_bytes
                if rows and max(rows.values()) >= total:
                    raise ValueError(f"{total} rows on disk, the index lists row {max(rows.values())}")
            except (OSError, ValueError, RecursionError) as exc:  # RecursionError: an index nested too deeply
                log(f"feature store file {array} is damaged or not this cache's ({exc}); its rows will be recomputed")
                self._drop(array, index_file)
                continue
            found.update((k, (array, r)) for k, r in rows.items())
        return found

    def _read_index(self, index_file: Path) -> dict[str, int]:
        """The {key: row} of an index file, checked: a hand-edited or foreign index is a ValueError, not a
        TypeError later (or rows read from the wrong offset, a negative row reading the .npy header)."""
        doc = json.loads(index_file.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), dict):
            raise ValueError('the index is not {"rows": {key: row}}')
        rows = doc["rows"]
        if not all(type(r) is int and r >= 0 for r in rows.values()):
            raise ValueError("the index lists a row that is not a whole number >= 0")
        if self.stamp and doc.get("encoder", self.stamp) != self.stamp:  # shards written before stamps: trusted
            raise ValueError(f"written for another encoder or preprocessing: {str(doc['encoder'])[:200]!r}")
        return rows

    def _open(self, array: Path) -> _Shard:
        if array not in self._shards:
            with open(array, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read(fh)
                offset = fh.tell()
            if dtype != np.float16 or len(shape) != 3 or fortran_order or 0 in shape[1:]:
                raise ValueError(f"expected an fp16 (R, N, D) array in C order, found {dtype} {shape}"
                                 + (" in Fortran order" if fortran_order else ""))
            if self.row_shape is not None and tuple(shape[1:]) != self.row_shape:
                raise ValueError(f"rows of shape {tuple(shape[1:])}, this cache's are {self.row_shape}")
            row_bytes = int(np.prod(shape[1:])) * 2
            if os.path.getsize(array) < offset + shape[0] * row_bytes:
                raise ValueError(f"truncated: {os.path.getsize(array)} bytes of {offset + shape[0] * row_bytes}")
            self._shards[array] = _Shard(array, offset, row_bytes, tuple(shape[1:]), os.open(array, os.O_RDONLY))
        return self._shards[array]

    def _drop(self, array: Path, index_file: Path) -> None:
        shard = self._shards.pop(array, None)
        if shard is not None:
            os.close(shard.fd)
        for path in (index_file, array):
            path.unlink(missing_ok=True)

    def rows(self, keys: Sequence[str]) -> FeatureRows:
        """A view of the rows of `keys`, in that order."""
        index = self.index()
        missing = [k for k in keys if k not in index]
        if missing:
            raise StoreError(f"{len(missing)} key(s) not in the feature store {self.folder}, e.g. {missing[0]}")
        arrays = sorted({index[k][0] for k in keys})
        number = {a: i for i, a in enumerate(arrays)}
        shards = [self._open(a) for a in arrays]
        if len({s.shape for s in shards}) > 1:
            raise StoreError(f"shards of different row shapes in {self.folder}")
        return FeatureRows(shards, np.array([number[index[k][0]] for k in keys], dtype=np.int32),
                           np.array([index[k][1] for k in keys], dtype=np.int64))

    def writer(self, capacity: int) -> ShardWriter:
        """A new shard for `capacity` rows; first removes what killed writers left behind (`sweep`)."""
        self.sweep()
        return ShardWriter(self.folder / f"shard-{time.time_ns():x}-{os.getpid()}-{_host_tag()}", capacity,
                           self.flush_every, self.stamp, self.row_shape)

    def sweep(self) -> list[Path]:
        """Remove, and name, the files of writers that stopped without finishing: an array never indexed (a kill
        before the first flush; its written rows hold real disk blocks) and index temporary files. Why only
        stopped writers: another extraction (a torchrun rank) may be writing its first rows beside this one."""
        host, removed = _host_tag(), []
        indexed = {f.name.removesuffix(".index.json") for f in self.folder.glob("shard-*.index.json")}
        for path in sorted(self.folder.glob("shard-*")):
            orphan = path.suffix == ".npy" and path.stem not in indexed
            if not (orphan or path.suffix == ".tmp") or not _writer_gone(path.name, host):
                continue
            if orphan and not _unlink_unlocked(path):
                continue  # its writer holds its lock: alive, in a PID namespace (a container) this one cannot see
            if path.suffix == ".tmp" and time.time() - _mtime(path) < TMP_AGE:
                continue  # an index being replaced right now, by a writer whose pid is not visible here
            path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            log(f"removed {len(removed)} file(s) an interrupted extraction left in {self.folder}, e.g. {removed[0]}")
        return removed

    def close(self) -> None:
        for shard in self._shards.values():
            os.close(shard.fd)
        self._shards.clear()


TMP_AGE = 60.0
"""Seconds after which an index temporary file of a stopped writer is removed (a live one exists for
microseconds, between its write and its rename)."""


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _unlink_unlocked(path: Path) -> bool:
    """Remove `path` if no process holds its writer's lock (`ShardWriter` keeps an flock on its array while it
    runs); False when one does. Why a lock besides the pid: containers sharing a host name and a cache volume
    see each other's pids as not running, and a live writer's rows were deleted under it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held; others: a file system without locks, so keep it
        os.close(fd)
        return False
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock
    return True


class ShardWriter:
    """Appends rows to one preallocated shard; the index is replaced atomically every `flush_every` rows."""

    def __init__(self, stem: Path, capacity: int, flush_every: int, stamp: str = "",
                 row_shape: tuple[int, ...] | None = None):
        self.array_path, self.index_path = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".index.json")
        self.capacity, self.flush_every, self.stamp, self.row_shape = capacity, flush_every, stamp, row_shape
        self.array: np.memmap | None = None
        self._lock: int | None = None  # a descriptor of the array holding its flock while this writer runs
        self.rows: dict[str, int] = {}
        self._unflushed = 0

    def add(self, keys: Iterable[str], grids: np.ndarray) -> None:
        """Store (b, N, D) `grids` under `keys`."""
        if self.row_shape is not None and tuple(grids.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {tuple(grids.shape[1:])} for a store of {self.row_shape} rows")
        if self.array is None:  # the row shape is known from the first batch; the file stays sparse until written
            self.array = np.lib.format.open_memmap(self.array_path, mode="w+", dtype=np.float16,
                                                   shape=(self.capacity, *grids.shape[1:]))
            self._lock = os.open(self.array_path, os.O_RDONLY)  # held until close: see `_unlink_unlocked`
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for key, grid in zip(keys, grids):
            row = len(self.rows)
            self.array[row] = grid
            self.rows[key] = row
            self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Make every added row durable, then list them in the index (never the other way round)."""
        if self.array is None:
            return
        self.array.flush()
        tmp = self.index_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"rows": self.rows, **({"encoder": self.stamp} if self.stamp else {})}))
        os.replace(tmp, self.index_path)
        self._unflushed = 0

    def close(self) -> None:
        self.flush()
        self.array = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
