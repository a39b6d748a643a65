"""The one record serialiser: text, JSON lines, CSV and Parquet, one complete record per image.

Record schema (`record(caption) -> dict`, used by the CLI, its Ray front end and the app; evaluation is meant to
use it too): `path` (where the image came from; for inputs that are not files this is the API's `Caption.source`
label, e.g. "<bytes #3>"), `caption`, `score`, `logprob`, `alternatives` (list of {text, score, logprob}; with
n_best > 1), `tags` (list of {label, probability}, most probable first; only when the caption carries tags, i.e.
`captioner caption --tags` / `return_tags=True`) and `error`.

Every format is rendered from this record (`CaptionWriter.write_record`), so whatever produced the records (the
local loop or Ray actors, `captioner.integrations.ray_data`) writes the same bytes:
- jsonl: the record as one JSON line.
- csv: a header, then `path, caption, score, error`, then `alternative_2..alternative_N` (with n_best > 1) and
  `tags` (with --tags) as `label:probability` pairs joined by `;`, e.g. `pizza:0.931;plate:0.041`. A text cell
  that starts with `=`, `+`, `-`, `@`, a tab, a carriage return or `'` gets one `'` in front (`csv_cell`), so a
  spreadsheet shows it as text instead of running it as a formula; removing a leading `'` gives the text back.
- text: `path<TAB>caption`, and with --tags a TAB and the tags in brackets, `[pizza 0.93, plate 0.04]`; a failed
  image is `path<TAB>ERROR reason`; with n_best > 1 one `path<TAB>  alt SCORE: text` line per alternative follows.
  A tab, newline or carriage return in a path, caption or reason is written as `\\t`, `\\n`, `\\r`, another
  control character as `\\x1b` (`text_field`), so every line is one record (or alternative), `--resume` finds
  it, and a terminal shows it without running it; use JSONL or CSV to be lossless.
- parquet (`captioner.parquet.ParquetCaptionWriter`, needs pyarrow): one row per image, the record's fields as
  columns; nested `alternatives` and `tags` as list-of-struct columns (not JSON strings); `path_bytes` is a column
  that is null unless the name is not valid UTF-8, and `tags` is null for a failed image.

Strict output:
- Non-finite floats (the score of a failed image is NaN) are written as JSON `null` / an empty CSV cell, so every
  JSON line passes `json.loads` and `json.dumps(..., allow_nan=False)`. JSON lines hold no raw control character
  or line separator (`to_json_line`), so one shown on a terminal runs nothing.
- Paths are written as valid UTF-8. A file name whose bytes are not valid UTF-8 (Python holds it as a
  surrogate-escaped str) is written with each undecodable byte as the four characters `\\xNN` (see
  `escape_path`); JSON records of such files also carry `path_bytes`, the exact file name bytes in base64
  (lossless). A name that is valid UTF-8 is written unchanged but for the text format's escapes and the CSV
  cell's leading `'` (above).

Each text record is rendered first and then handed to the stream in a single write, so a run stopped between
records (Ctrl-C, see `captioner.cli.caption`) leaves a valid partial file.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
from typing import IO, TYPE_CHECKING

from captioner.escapes import csv_cell, escape_path, path_line, text_field

if TYPE_CHECKING:
    from captioner.results import Caption

TEXT_FORMATS = ("text", "jsonl", "csv")
"""The line-based formats: streamed record by record, to stdout or a file, and resumable (`--resume`)."""
FORMATS = TEXT_FORMATS + ("parquet",)
"""Every `captioner caption --format`; parquet needs pyarrow and a file (`--output`)."""
RECORD_FIELDS = ("path", "caption", "score", "logprob", "alternatives", "tags", "error", "path_bytes")
"""Every field a record can have, in the order `record` writes them (alternatives, tags and path_bytes are
present only in some records)."""


def written_path(path: str | os.PathLike, fmt: str) -> str:
    """`path` as a whole written record of format `fmt` names it (what `record_key` reads back)."""
    if fmt == "text":
        return path_line(path)
    text = escape_path(path)
    return csv_cell(text) if fmt == "csv" else text


def written_clash(paths: list, fmt: str) -> tuple | None:
    """Two of `paths` that format `fmt` writes the same, or None: `--resume` could not tell which was done.
    In every line format a name holding the four characters `\\xff` and one holding the undecodable byte;
    in text also a literal `\\n` in one name and a newline in the other."""
    seen: dict[str, object] = {}
    for path in paths:
        other = seen.setdefault(written_path(path, fmt), path)
        if other != path:
            return other, path
    return None


def _has_undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def record(caption: Caption, n_best: int = 2) -> dict:
    """The JSON-ready record of one Caption (strict: no NaN, paths valid UTF-8); `alternatives` only if n_best > 1,
    `tags` only if the caption has them (`caption.tags is not None`)."""
    rec = {"path": escape_path(caption.source), "caption": caption.text, "score": _finite(caption.score),
           "logprob": _finite(caption.logprob)}
    if n_best > 1:
        rec["alternatives"] = [{"text": a.text, "score": _finite(a.score), "logprob": _finite(a.logprob)}
                               for a in caption.alternatives]
    tags = getattr(caption, "tags", None)
    if tags is not None:
        rec["tags"] = [{"label": t.label, "probability": _finite(t.probability)} for t in tags]
    rec["error"] = None if caption.error is None else escape_path(caption.error)
    if _has_undecodable(caption.source):
        rec["path_bytes"] = base64.b64encode(caption.source.encode("utf-8", "surrogateescape")).decode("ascii")
    return rec


_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x7f, 0xa0), 0x2028, 0x2029)}


def strict_json(value: object, indent: int | None = None) -> str:
    """`value` as strict JSON (raises ValueError on NaN/inf), non-ASCII text kept as it is.

    json.dumps escapes the C0 controls but writes DEL, the C1 controls (`\\x9b` is a terminal's CSI) and the
    line and paragraph separators raw; they are written as `\\u009b` here, which every JSON parser reads back as
    the same character, so JSON shown on a terminal runs nothing and a line stays one line to `str.splitlines`.
    """
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=indent).translate(_JSON_ESCAPES)


def to_json_line(rec: dict) -> str:
    """One strict JSON line (`strict_json`), newline included."""
    return strict_json(rec) + "\n"


def record_key(line: str, fmt: str) -> str | None:
    """The path of a whole written line, as `written_path` gives it; None for headers and alt lines.

    Raises:
        ValueError: a jsonl line that is not JSON, or not an object with a string `path`; a text line without
            the tab after its path (every text line has one: a JSON line or a CSV header has none).
    """
    if fmt == "jsonl":
        try:
            rec = json.loads(line)
        except RecursionError:  # json's C scanner on a line of deeply nested arrays
            raise ValueError(f"a line nested too deeply: {line[:60].strip()}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):  # JSON, but not one of our records
            raise ValueError(f"not a record with a path: {line[:60].strip()}")
        return rec["path"]
    if fmt == "csv":
        row = next(csv.reader([line]))
        return None if row[:4] == csv_header(1) else row[0]
    path, tab, rest = line.partition("\t")
    if not tab and not line.strip():  # a blank line (an editor's, a CRLF's): nothing, as before
        return None
    if not tab:  # a jsonl or csv output resumed as text: its lines would be kept and text appended to them
        raise ValueError(f"not a path<TAB>caption line: {line[:60]!r}")
    return None if rest.startswith("  alt ") else path


def csv_header(n_best: int, tags: bool = False) -> list[str]:
    """The CSV columns: path, caption, score, error, then alternative_2..N (n_best > 1), then tags (--tags)."""
    header = ["path", "caption", "score", "error"]
    if n_best > 1:
        header += [f"alternative_{i}" for i in range(2, n_best + 1)]
    return header + ["tags"] if tags else header


def _flat(label: str) -> str:
    """A tag label on one line, its controls shown (the text format is line-based; the labels are ImageNet's)."""
    return text_field(" ".join(str(label).split()))


def _tags_text(tags: list[dict]) -> str:
    """`[pizza 0.93, plate 0.04]`: the text format's tag column."""
    return "[" + ", ".join(f"{_flat(t['label'])} {_num(t['probability'], 2)}" for t in tags) + "]"


def _tags_csv(tags: list[dict] | None) -> str:
    """`pizza:0.931;plate:0.041`: the CSV tags cell (empty without tags, e.g. for a failed image)."""
    return ";".join(f"{_flat(t['label'])}:{_num(t['probability'], 3)}" for t in tags or [])


def _num(x: float | None, digits: int) -> str:
    return "nan" if x is None else f"{x:.{digits}f}"


class CaptionWriter:
    """Writes records as text (`path<TAB>caption`), JSON lines, or CSV (the formats: the module docstring).

    `tags=True` (--tags) adds the CSV `tags` column; the text and jsonl forms show tags whenever a record has them.
    """

    def __init__(self, stream: IO[str], fmt: str, n_best: int = 1, header: bool = True, tags: bool = False):
        if fmt not in TEXT_FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose text, jsonl or csv")
        self.stream, self.fmt, self.n_best, self.tags = stream, fmt, n_best, tags
        self.count = 0
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer) if fmt == "csv" else None
        if self._csv is not None and header:
            self._csv.writerow(csv_header(n_best, tags))
            self.stream.write(self._take())
            self.stream.flush()

    def _take(self) -> str:
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text

    def render(self, caption: Caption) -> str:
        """The whole record for one image, newline included."""
        return self.render_record(record(caption, self.n_best))

    def render_record(self, rec: dict) -> str:
        """The whole record (`record(caption, n_best)`) for one image, newline included."""
        if self.fmt == "jsonl":
            return to_json_line(rec)
        path, error = rec["path"], rec["error"]
        alternatives = (rec.get("alternatives") or []) if self.n_best > 1 else []
        if self._csv is not None:
            score = rec["score"]
            row = [csv_cell(path), csv_cell(rec["caption"]), "" if error or score is None else f"{score:.4f}",
                   csv_cell(error or "")]
            if self.n_best > 1:
                alts = [csv_cell(a["text"]) for a in alternatives[1:]]
                row += alts + [""] * (self.n_best - 1 - len(alts))
            if self.tags:
                row.append(csv_cell(_tags_csv(rec.get("tags"))))
            self._csv.writerow(row)
            return self._take()
        path = text_field(path)
        text = f"ERROR {text_field(error)}" if error else text_field(rec["caption"])
        if not error and rec.get("tags") is not None:
            text += "\t" + _tags_text(rec["tags"])
        lines = [f"{path}\t{text}\n"]
        for alt in alternatives[1:]:
            lines.append(f"{path}\t  alt {_num(alt['score'], 3)}: {text_field(alt['text'])}\n")
        return "".join(lines)

    def write(self, caption: Caption) -> None:
        self.write_record(record(caption, self.n_best))

    def write_record(self, rec: dict) -> None:
        """Write one record (as `record(caption, n_best)` gives it) and flush."""
        self.stream.write(self.render_record(rec))
        self.stream.flush()
        self.count += 1

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Nothing to finish for the line formats (the stream is the caller's); see
        `captioner.parquet.ParquetCaptionWriter.close`."""
        self.flush()
