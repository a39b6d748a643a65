"""The one record serialiser: text, JSON lines and CSV, one complete record per image, flushed per record.

Record schema (`record(caption) -> dict`, used by the CLI; the app and evaluation are meant to use it too):
`path` (where the image came from; for inputs that are not files this is the API's `Caption.source` label,
e.g. "<bytes #3>"), `caption`, `score`, `logprob`, `alternatives` (list of {text, score, logprob}) and `error`.

Strict output:
- Non-finite floats (the score of a failed image is NaN) are written as JSON `null` / an empty CSV cell, so every
  JSON line passes `json.loads` and `json.dumps(..., allow_nan=False)`.
- Paths are written as valid UTF-8. A file name whose bytes are not valid UTF-8 (Python holds it as a
  surrogate-escaped str) is written with each undecodable byte as the four characters `\\xNN` (see
  `escape_path`); JSON records of such files also carry `path_bytes`, the exact file name bytes in base64
  (lossless). A name that is valid UTF-8 is written unchanged.

Each record is rendered first and then handed to the stream in a single write, so a run stopped between records
(Ctrl-C, see `captioner.cli.caption`) leaves a valid partial file.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from captioner.api import Caption

FORMATS = ("text", "jsonl", "csv")


def escape_path(path: str | os.PathLike) -> str:
    """`path` as valid UTF-8 text: undecodable bytes (surrogate escapes) become `\\xNN`; other names unchanged."""
    text = os.fspath(path)
    raw = text.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def _has_undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def record(caption: Caption, n_best: int = 2) -> dict:
    """The JSON-ready record of one Caption (strict: no NaN, paths valid UTF-8); `alternatives` only if n_best > 1."""
    rec = {"path": escape_path(caption.source), "caption": caption.text, "score": _finite(caption.score),
           "logprob": _finite(caption.logprob)}
    if n_best > 1:
        rec["alternatives"] = [{"text": a.text, "score": _finite(a.score), "logprob": _finite(a.logprob)}
                               for a in caption.alternatives]
    rec["error"] = None if caption.error is None else escape_path(caption.error)
    if _has_undecodable(caption.source):
        rec["path_bytes"] = base64.b64encode(caption.source.encode("utf-8", "surrogateescape")).decode("ascii")
    return rec


def to_json_line(rec: dict) -> str:
    """One strict JSON line (raises ValueError on NaN/inf), newline included."""
    return json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n"


def record_key(line: str, fmt: str) -> str | None:
    """The (escaped) path of a whole written line, as `escape_path` gives it; None for headers and alt lines."""
    if fmt == "jsonl":
        return json.loads(line)["path"]
    if fmt == "csv":
        row = next(csv.reader([line]))
        return None if row[:4] == csv_header(1) else row[0]
    path, _, rest = line.partition("\t")
    return None if rest.startswith("  alt ") else path


def csv_header(n_best: int) -> list[str]:
    header = ["path", "caption", "score", "error"]
    return header + [f"alternative_{i}" for i in range(2, n_best + 1)] if n_best > 1 else header


class CaptionWriter:
    """Writes Captions as text (`path<TAB>caption`), JSON lines, or CSV."""

    def __init__(self, stream: IO[str], fmt: str, n_best: int = 1, header: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose text, jsonl or csv")
        self.stream, self.fmt, self.n_best = stream, fmt, n_best
        self.count = 0
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer) if fmt == "csv" else None
        if self._csv is not None and header:
            self._csv.writerow(csv_header(n_best))
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
            return to_json_line(record(caption, self.n_best))
        path = escape_path(caption.source)
        error = None if caption.error is None else escape_path(caption.error)
        if self._csv is not None:
            score = _finite(caption.score)
            row = [path, caption.text, "" if error or score is None else f"{score:.4f}", error or ""]
            if self.n_best > 1:
                alts = [a.text for a in caption.alternatives[1:]]
                row += alts + [""] * (self.n_best - 1 - len(alts))
            self._csv.writerow(row)
            return self._take()
        text = f"ERROR {error}" if error else caption.text
        lines = [f"{path}\t{text}\n"]
        for alt in caption.alternatives[1:] if self.n_best > 1 else []:
            lines.append(f"{path}\t  alt {alt.score:.3f}: {alt.text}\n")
        return "".join(lines)

    def write(self, caption: Caption) -> None:
        self.stream.write(self.render(caption))
        self.stream.flush()
        self.count += 1

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def open_writer(path: str | None, fmt: str, n_best: int = 1) -> Iterator[CaptionWriter]:
    """A CaptionWriter on `path` (overwritten), or on stdout when path is None."""
    if path is None:
        yield CaptionWriter(sys.stdout, fmt, n_best)
        return
    with open(path, "w", encoding="utf-8", newline="") as fh:
        yield CaptionWriter(fh, fmt, n_best)
