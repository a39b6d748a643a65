"""Streaming output writers for `captioner caption`: one complete record per image, flushed per record.

Each record is rendered first and then handed to the stream in a single write, so a run stopped between records
(Ctrl-C, see `captioner.cli.caption`) leaves a valid partial file.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from captioner.api import Caption


class CaptionWriter:
    """Writes Captions as text (`path<TAB>caption`), JSON lines, or CSV."""

    def __init__(self, stream: IO[str], fmt: str, n_best: int = 1):
        if fmt not in ("text", "jsonl", "csv"):
            raise ValueError(f"unknown format {fmt!r}; choose text, jsonl or csv")
        self.stream, self.fmt, self.n_best = stream, fmt, n_best
        self.count = 0
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer) if fmt == "csv" else None
        if self._csv is not None:
            header = ["path", "caption", "score", "error"]
            if n_best > 1:
                header += [f"alternative_{i}" for i in range(2, n_best + 1)]
            self._csv.writerow(header)
            self.stream.write(self._take())
            self.stream.flush()

    def _take(self) -> str:
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text

    def render(self, caption: Caption) -> str:
        """The whole record for one image, newline included."""
        if self.fmt == "jsonl":
            record = caption.to_dict()
            record["path"] = record.pop("source")
            if self.n_best <= 1:
                record.pop("alternatives")
            return json.dumps(record, ensure_ascii=False) + "\n"
        if self._csv is not None:
            row = [caption.source, caption.text, "" if caption.error else f"{caption.score:.4f}", caption.error or ""]
            if self.n_best > 1:
                alts = [a.text for a in caption.alternatives[1:]]
                row += alts + [""] * (self.n_best - 1 - len(alts))
            self._csv.writerow(row)
            return self._take()
        text = f"ERROR {caption.error}" if caption.error else caption.text
        lines = [f"{caption.source}\t{text}\n"]
        for alt in caption.alternatives[1:] if self.n_best > 1 else []:
            lines.append(f"{caption.source}\t  alt {alt.score:.3f}: {alt.text}\n")
        return "".join(lines)

    def write(self, caption: Caption) -> None:
        self.stream.write(self.render(caption))
        self.stream.flush()
        self.count += 1

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def open_writer(path: str | None, fmt: str, n_best: int = 1) -> Iterator[CaptionWriter]:
    """A CaptionWriter on `path`, or on stdout when path is None."""
    if path is None:
        yield CaptionWriter(sys.stdout, fmt, n_best)
        return
    with open(path, "w", encoding="utf-8", newline="") as fh:
        yield CaptionWriter(fh, fmt, n_best)
