"""The Parquet output of `captioner caption --format parquet` and the Ray front end: the record's fields
(`captioner.outputs.record`) as columns, one row per image.

Why apart from the line formats: it needs pyarrow (an optional dependency, imported only here and only when
used), writes in row groups with a footer instead of whole lines, and so cannot be resumed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from captioner.outputs import record

if TYPE_CHECKING:
    from captioner.results import Caption


def parquet_schema(n_best: int = 1, tags: bool = False):
    """The Arrow schema of the Parquet output: the record's fields as columns, nested lists as list<struct>."""
    import pyarrow as pa

    fields = [("path", pa.string()), ("caption", pa.string()), ("score", pa.float64()), ("logprob", pa.float64())]
    if n_best > 1:
        fields.append(("alternatives", pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64()),
                                                            ("logprob", pa.float64())]))))
    if tags:
        fields.append(("tags", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))))
    fields += [("error", pa.string()), ("path_bytes", pa.string())]
    return pa.schema(fields)


class ParquetCaptionWriter:
    """Writes records as Parquet, one row per image, in row groups of `row_group_size` records.

    Columns: `parquet_schema` (path, caption, score, logprob, [alternatives], [tags], error, path_bytes); the nested
    `alternatives` (n_best > 1) and `tags` (--tags) are list<struct> columns, `path_bytes` is null unless the name is
    not valid UTF-8. Reading the file back (`pyarrow.parquet.read_table(f).to_pylist()`) gives the jsonl records,
    with `path_bytes: None` where the record has no path_bytes and (with tags) `tags: None` where it has no tags
    (a failed image). The file is valid only after `close()` (its
    footer); a killed run leaves no readable file, so parquet output cannot be resumed.

    Raises:
        ImportError: pyarrow is not installed.
    """

    def __init__(self, sink, n_best: int = 1, tags: bool = False, row_group_size: int = 1024):
        import pyarrow.parquet as pq

        self.n_best, self.tags = n_best, tags
        self.schema = parquet_schema(n_best, tags)
        self._writer = pq.ParquetWriter(sink, self.schema)
        self._rows: list[dict] = []
        self.row_group_size = row_group_size
        self.count = 0

    def write(self, caption: Caption) -> None:
        self.write_record(record(caption, self.n_best))

    def write_record(self, rec: dict) -> None:
        self._rows.append({name: rec.get(name) for name in self.schema.names})
        self.count += 1
        if len(self._rows) >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as a row group."""
        if self._rows:
            import pyarrow as pa

            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        """Write the last row group and the footer (the sink itself stays open: it is the caller's)."""
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._writer = None


def pyarrow_missing() -> str | None:
    """Why Parquet cannot be written here (one line), or None when pyarrow is installed."""
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        return "--format parquet needs pyarrow: pip install pyarrow (or the ray extra: pip install -e '.[ray]')"
    return None
