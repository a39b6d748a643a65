"""`captioner caption --output F [--resume]`: write through a temporary file beside F, never destroying F early.

Records go to `.F.partial` in F's folder; at the end of the run (and on Ctrl-C, which stops at a record
boundary) it is renamed onto F atomically, so F is either its old self or a file of whole records. A run killed
outright (SIGKILL, power loss) leaves `.F.partial`; `--resume` continues from it (or from F when there is none):
the whole records are kept, a trailing partial line is dropped, and the images already captioned are skipped.
A CSV is resumed only when its header is the one this run writes (same --n-best, same --tags). Parquet output
goes through the same temporary file (binary) but cannot be resumed: its footer is written only at the end.
A target that is a device, FIFO or socket (`/dev/null`, `/dev/stdout` on a pipe, a named pipe), or the file the
command's own stdout or stderr writes to (`--output /dev/stdout >> log.txt`), is written directly: renaming a
file onto it would replace the device node itself, or the shell's file and what it holds. A symbolic link to a
file stays a link: its target is the file replaced.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
from pathlib import Path

from captioner.escapes import escape_path
from captioner.outputs import record_key
from captioner.path_kind import path_kind, replaced_file


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name the same existing file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def model_files(checkpoint: str | None, encoder_weights: str | None) -> list[Path]:
    """The files a captioning command reads its model from: the checkpoint (a shipped model's name resolved),
    its int8 calibration beside it, the encoder's weights file. Why: `caption --output` equal to
    `--checkpoint` replaced the model with its own captions, and said nothing."""
    from captioner.models.shipped import UnknownModelError
    from captioner.models.shipped import resolve as resolve_model
    from captioner.runtime.int8 import calibration_path

    files = [Path(encoder_weights)] if encoder_weights else []
    try:
        model = resolve_model(checkpoint)
    except UnknownModelError:  # reported by the load, with the valid names
        return files
    return [model, calibration_path(model), *files]


def clobbered_input(output: str | os.PathLike, images: list, checkpoint: str | None,
                    encoder_weights: str | None) -> str | None:
    """Why `--output` may not be written, as one line, when it is a file the command reads: one of the images,
    or one of the model's files (`model_files`); else None."""
    if any(same_file(p, output) for p in images):
        return f"--output {escape_path(output)} is one of the input images"
    model = next((f for f in model_files(checkpoint, encoder_weights) if same_file(f, output)), None)
    if model is not None:
        return f"--output {escape_path(output)} is the model's file {escape_path(model)}"
    return None


_QUOTE, _NEWLINE = ord('"'), ord("\n")
_FIELD_END = re.compile(rb"[,\r\n]")  # the end of an unquoted field (or of what follows a closing quote)


def _whole_csv_records(raw: bytes) -> bytes:
    """`raw` (whole lines) up to the end of its last whole CSV record.

    Why: a name holding a newline is written quoted, over two lines; a record cut after that newline left an
    open quote that swallowed the records `--resume` appended after it. A record ends at a newline outside a
    quoted field, read as the csv module reads it (default dialect, not strict): counting quotes per line
    instead took a stray quote in an unquoted field of a hand-edited row (a literal character to csv) for an
    open quote, and dropped that record and every one after it, so they were captioned again, the edits lost.
    Bytes are scanned: no byte of a multi-byte UTF-8 character is a quote, comma or line end.
    """
    end = pos = 0
    while pos < len(raw):
        if raw[pos] == _QUOTE:  # a quote opens a quoted field only at the start of a field
            pos = _quoted_field_end(raw, pos + 1)
            if pos < 0:
                break  # cut inside a quoted field: the last record is not whole
        stop = _FIELD_END.search(raw, pos)  # after a closing quote, csv reads up to the delimiter literally
        if stop is None:
            break
        pos = stop.end()
        if raw[stop.start()] == _NEWLINE:
            end = pos
    return raw[:end]


def _quoted_field_end(raw: bytes, pos: int) -> int:
    """The offset just after the quote closing the quoted field whose text starts at `pos`; -1 when `raw`
    ends inside it. Why: in a quoted field `""` is an escaped quote, a lone `"` closes it, newlines are text.
    """
    while (quote := raw.find(b'"', pos)) >= 0:
        if raw[quote + 1:quote + 2] != b'"':
            return quote + 1
        pos = quote + 2
    return -1


NAME_MAX = 255
"""Bytes in one file name on Linux's file systems."""


def _partial_name(name: str) -> str:
    """The temporary file's name for a target named `name`: `.NAME.partial`, or, where that would be longer than
    a file name may be (a valid 250-byte target), `.<hash of NAME>.partial`, the same at every run for --resume."""
    partial = f".{name}.partial"
    if len(os.fsencode(partial)) <= NAME_MAX:
        return partial
    return f".{hashlib.sha1(os.fsencode(name)).hexdigest()[:20]}.partial"


def _is_special(path: Path) -> bool:
    """Whether `path` (through links) is an existing device, FIFO or socket rather than a file or a folder."""
    return path_kind(path)[0] == "special"


def _own_stream(path: Path) -> int | None:
    """1 or 2 when `path` (through links) is the file this process's stdout or stderr writes to, else None.

    Why: `--output /dev/stdout >> log.txt` renamed a new file onto log.txt, losing what the shell had written
    there and what it wrote after; such a target is written through that very descriptor, sharing its offset."""
    try:
        st = path.stat()
    except OSError:
        return None
    for fd in (1, 2):
        try:
            other = os.fstat(fd)
        except OSError:  # the descriptor is closed
            continue
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            return fd
    return None


class OutputResumeError(ValueError):
    """The file to resume from is not a whole-records output of this format."""


class OutputFolderError(OSError):
    """`--output`'s folder does not exist: a file that cannot be written (exit 4, as for a full disk).

    Why a class of its own: a plain ENOENT is a FileNotFoundError, which the CLI reads as a missing input (exit
    2), and its message named the hidden temporary file (`.x.txt.partial`), not `--output`."""


class PartialOutput:
    """The temporary file behind `--output`; `open()` returns the keys of the records already done."""

    def __init__(self, target: str | os.PathLike, fmt: str, resume: bool = False):
        self.target = Path(target)
        self.own_fd = _own_stream(self.target)
        # written as it is: no temporary file, no rename, no resume
        self.direct = self.own_fd is not None or _is_special(self.target)
        if not self.direct:  # a link to a file stays a link: its file is replaced
            self.target = replaced_file(self.target)
        self.partial = self.target if self.direct else self.target.with_name(_partial_name(self.target.name))
        self.fmt, self.resume = fmt, resume
        self.has_header = False
        self.stream = None

    def open(self, csv_header: list[str] | None = None) -> set[str]:
        """Open the temporary file for writing; returns the escaped paths of the records kept (resume only).

        `csv_header`: the header this run writes; a CSV to resume must start with it.
        """
        if self.target.is_dir():  # with its errno, so that the CLI reports it as an unwritable file (exit 4)
            raise IsADirectoryError(errno.EISDIR, f"--output {escape_path(self.target)} is a folder")
        folder = self.target.parent
        try:
            os.stat(folder)
        except FileNotFoundError:  # absent, or a dangling link
            raise OutputFolderError(errno.ENOENT, f"its folder {escape_path(folder)} does not exist") from None
        except OSError:  # under a file (ENOTDIR), a loop of links (ELOOP): the open below says which
            pass
        if self.direct:
            if self.resume:
                raise OutputResumeError(f"--resume needs a regular file; --output {escape_path(self.target)} "
                                        "is a device, FIFO, socket or this command's own stdout/stderr")
            binary = self.fmt == "parquet"
            if self.own_fd is not None:  # never reopened: that would truncate it, or write at another offset
                self.stream = os.fdopen(os.dup(self.own_fd), "wb" if binary else "w",
                                        **({} if binary else {"encoding": "utf-8", "newline": ""}))
            else:
                self.stream = open(self.target, "wb") if binary else open(self.target, "w", encoding="utf-8",
                                                                             newline="")
            return set()
        if self.fmt == "parquet":
            if self.resume:
                raise OutputResumeError("--resume does not work with --format parquet")
            self.stream = open(self.partial, "wb")
            return set()
        kept, done, in_place = "", set(), False
        if self.resume:
            source = self.partial if self.partial.exists() else self.target
            if source.exists():
                raw = source.read_bytes()
                raw = raw[:raw.rfind(b"\n") + 1]  # drop a trailing partial line
                if self.fmt == "csv":
                    raw = _whole_csv_records(raw)
                try:
                    kept = raw.decode("utf-8")
                    done = self._keys(kept)
                    self._check_header(kept, csv_header)
                except (UnicodeDecodeError, ValueError, csv.Error) as exc:  # csv.Error: a cell over its limit
                    raise OutputResumeError(f"--resume: {source} is not a whole {self.fmt} output: {exc}") from exc
                in_place = source == self.partial
        if in_place:
            # Cut the partial record off where it lies and append: rewriting the file ("w", then the kept text)
            # emptied it first, so a kill or a full disk in between lost every record the killed run had saved.
            os.truncate(self.partial, len(raw))
            self.stream = open(self.partial, "a", encoding="utf-8", newline="")
        else:  # a finished output is copied, and stays as it is until this run's rename
            self.stream = open(self.partial, "w", encoding="utf-8", newline="")
            self.stream.write(kept)
        self.stream.flush()
        self.has_header = self.fmt == "csv" and bool(kept)
        return done

    def _check_header(self, kept: str, header: list[str] | None) -> None:
        if self.fmt != "csv" or header is None or not kept:
            return
        found = next(csv.reader(io.StringIO(kept)), [])
        if found != header:
            raise ValueError(f"its columns are {','.join(found)}, this run writes {','.join(header)} "
                             "(use the --n-best and --tags of the first run)")

    def _keys(self, text: str) -> set[str]:
        if self.fmt == "csv":
            rows = list(csv.reader(io.StringIO(text)))
            return {row[0] for row in rows[1:] if row}
        # split("\n"), not splitlines(): a name may hold U+2028 (the text format writes it raw), and outputs of earlier
        # versions hold U+2028, U+0085 or \f raw in jsonl and text
        keys = (record_key(line, self.fmt) for line in text.split("\n") if line)
        return {k for k in keys if k is not None}

    def close(self, keep: bool = True) -> None:
        """Close; with `keep`, move the records onto the target (atomic rename), else leave the partial file."""
        if self.stream is None:
            return
        stream, self.stream = self.stream, None
        try:
            stream.flush()
            if not self.direct:  # a pipe or a device cannot be synced (EINVAL); there is nothing to rename
                os.fsync(stream.fileno())
        finally:
            try:
                stream.close()
            except OSError:
                if keep:
                    raise
        if keep and not self.direct:
            os.replace(self.partial, self.target)
