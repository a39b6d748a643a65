"""Batch captioning on Ray Data: `CaptionBatch`, a callable class for `ray.data.Dataset.map_batches`.

    import ray
    from captioner.integrations.ray_data import CaptionBatch, caption_dataset

    ds = ray.data.read_binary_files("/shared/photos", include_paths=True)  # columns: bytes, path
    out = caption_dataset(ds, actors=4, n_best=2, threads=4)                # or, by hand:
    out = ds.map_batches(CaptionBatch, fn_constructor_kwargs={"n_best": 2, "threads": 4}, batch_size=64,
                         batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=4), num_cpus=4)
    out.write_parquet("/shared/captions")

Each actor of the pool loads one `Captioner` (the shipped model, or `checkpoint`) in its constructor and keeps it
for every batch it is given. A batch (a pyarrow Table, a pandas DataFrame or a dict of columns) holds

- `path`: the image's name, written into the record; also the file the actor opens when there is neither a
  `bytes` nor a `file` column (str, or the `os.fsencode` bytes of a name that is not valid UTF-8);
- `file` (optional): where the actor reads the image when that differs from `path` (the CLI sends absolute paths
  here and keeps `path` as the user gave it);
- `bytes` (optional): the image file's bytes (what `read_binary_files` gives); no file is opened then;
- `index` (optional): passed through, so the caller can put the rows back in input order.

It returns a pyarrow Table with `index` (when given) and the fields of `captioner.outputs.record`, the local CLI's
record: `path, caption, score, logprob, alternatives, [tags], error, path_bytes`, typed as
`captioner.parquet.parquet_schema` (nested fields as list<struct>). `alternatives` is always there (n_best
entries), `tags` only with `return_tags=True`, `path_bytes` is null unless the name is not valid UTF-8. `to_record`
turns a row back into exactly the record the local CLI writes. A bad image (missing, empty, truncated, not an image)
is an error row (`on_error="skip"`, as in the CLI), never a failed task.

Ray is imported only inside `caption_dataset`; this module needs pyarrow (the `ray` extra installs both).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from captioner.outputs import RECORD_FIELDS, record
from captioner.parquet import parquet_schema


class CaptionBatch:
    """Callable class for `Dataset.map_batches(CaptionBatch, fn_constructor_kwargs=..., compute=ActorPoolStrategy)`:
    one Captioner per actor, a batch of image paths or bytes in, a pyarrow Table of records out."""

    def __init__(self, checkpoint: str | os.PathLike | None = None, precision: str = "auto",
                 beam_size: int | None = None, n_best: int = 1, threads: int | None = None,
                 return_tags: bool = False, batch_size: int = 64, max_length: int | None = None,
                 num_workers: int = 1, encoder_weights: str | None = None):
        """Load the model (in the actor, once).

        Args:
            checkpoint: a shipped model's name, a `.safetensors` checkpoint readable on every node, or None for
                the default shipped model.
            precision, beam_size, n_best, max_length: as `captioner caption` (`Captioner.load` / `caption_iter`).
            threads: torch intra-op threads of this actor (None: torch's default, one per core of the node).
            return_tags: add the `tags` column (the encoder's ImageNet tags, `caption_iter(return_tags=True)`).
            batch_size: images per network batch inside the actor; num_workers: its image-decoding threads.
            encoder_weights: the encoder's weights file, readable on every node, for encoders no installed package
                ships (resnet50; `Captioner.load`).
        """
        import torch

        from captioner.api import Captioner

        if threads:
            torch.set_num_threads(threads)
        self.captioner = Captioner.load(checkpoint, encoder_weights=encoder_weights, precision=precision)
        self.n_best, self.return_tags = n_best, return_tags
        self.options: dict[str, Any] = {"beam_size": beam_size, "n_best": n_best, "batch_size": batch_size,
                                        "max_length": max_length, "num_workers": num_workers, "on_error": "skip"}
        if return_tags:  # only when asked: the option is newer than the rest of caption_iter's
            self.options["return_tags"] = True
        self._schema = None

    @property
    def schema(self):
        """The output Table's schema: `index` (int64), then `captioner.parquet.parquet_schema` with
        alternatives."""
        if self._schema is None:
            import pyarrow as pa

            body = parquet_schema(n_best=2, tags=self.return_tags)
            self._schema = pa.schema([pa.field("index", pa.int64())] + list(body))
        return self._schema

    def __call__(self, batch) -> Any:
        """Caption one batch; returns a pyarrow Table, one row per input row, in the batch's order."""
        import pyarrow as pa

        columns = _columns(batch)
        n = len(next(iter(columns.values()))) if columns else 0
        indices = [int(i) for i in columns["index"]] if "index" in columns else None
        names = [_name(p) for p in columns["path"]] if "path" in columns else None
        if "bytes" in columns:
            items: Sequence = [bytes(b) if b is not None else b"" for b in columns["bytes"]]
            if names is None:
                names = [f"<bytes #{i}>" for i in (indices if indices is not None else range(n))]
        elif "file" in columns:
            items = [_name(p) for p in columns["file"]]
        elif names is not None:
            items = names
        else:
            raise ValueError(f"a batch needs a 'path' or a 'bytes' column, got {sorted(columns)}")
        captions = self.captioner.caption_iter(items, names=names, **self.options)
        rows = []
        for i, caption in enumerate(captions):
            rec = record(caption, n_best=2)  # alternatives always present in the table; to_record drops them
            rows.append({"index": indices[i] if indices is not None else None, **rec})
        table = pa.Table.from_pylist(rows, schema=self.schema)
        return table if indices is not None else table.drop_columns(["index"])


def to_record(row: dict, n_best: int = 1) -> dict:
    """A row of `CaptionBatch`'s output (`Table.to_pylist()`) as the record the local CLI writes,
    `record(caption, n_best)`: same fields, same order; alternatives only with n_best > 1, path_bytes and tags only
    where the record has them."""
    rec = {}
    for name in RECORD_FIELDS:
        if name not in row:
            continue
        value = row[name]
        if name == "alternatives" and n_best <= 1:
            continue
        if name in ("tags", "path_bytes") and value is None:
            continue
        rec[name] = value
    return rec


def caption_dataset(ds, *, actors: int = 1, batch_size: int = 64, threads: int | None = None, **options):
    """`ds.map_batches(CaptionBatch, ...)` on a fixed pool of `actors` actors, each reserving `threads` CPUs
    (1 when None); `options` are CaptionBatch's (checkpoint, precision, beam_size, n_best, return_tags, ...)."""
    import ray

    return ds.map_batches(CaptionBatch, fn_constructor_kwargs=dict(threads=threads, batch_size=batch_size,
                                                                   **options),
                          batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads or 1)


def _columns(batch) -> dict[str, list]:
    """A batch as {column: list of Python values}, from a pyarrow Table, a pandas DataFrame or a dict."""
    if hasattr(batch, "to_pydict"):  # pyarrow.Table
        return batch.to_pydict()
    if hasattr(batch, "columns") and hasattr(batch, "iloc"):  # pandas.DataFrame
        return {str(c): batch[c].tolist() for c in batch.columns}
    return {str(k): list(v) for k, v in dict(batch).items()}


def _name(value) -> str:
    """A path column value as the str Python uses for that file name (bytes: `os.fsdecode`, lossless)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return os.fsdecode(bytes(value))
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
