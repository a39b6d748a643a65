"""What a path names, for the loaders' error messages: a regular file, a folder, nothing, something else.

Why one place: a FIFO opened to read waits for a writer for good and /dev/zero never ends, so every loader refuses
what is not a regular file before opening it; and `Path.exists()` raises (rather than answering) for a name too
long for the file system, which reached users as "cannot write" or a traceback.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

Kind = Literal["file", "folder", "missing", "special", "unreachable"]

_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"))


def path_kind(path: str | os.PathLike) -> tuple[Kind, str]:
    """(kind, detail) of `path`, links followed. `detail` says which special file ("a FIFO"), or why the path
    could not be looked up ("File name too long"); it is "" otherwise."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing", ""
    except OSError as exc:  # a name too long, a loop of links, a file where a folder should be
        if exc.errno == 20:  # ENOTDIR: a file in the middle of the path, so nothing is there
            return "missing", ""
        return "unreachable", exc.strerror or str(exc)
    except ValueError as exc:  # an embedded NUL byte
        return "unreachable", str(exc)
    if stat.S_ISREG(mode):
        return "file", ""
    if stat.S_ISDIR(mode):
        return "folder", ""
    return "special", next((name for test, name in _SPECIAL if test(mode)), "of an unknown kind")


CHECKPOINT_WORDS = {"missing": "checkpoint file not found", "folder": "is a folder, not a checkpoint file"}
"""`file_problem`'s words for a checkpoint path, shared by the loader and `captioner app` (which checks the path
before its server starts, without importing the loader's torch)."""


def file_problem(path: str | os.PathLike, *, missing: str, folder: str, special: str = "not a regular file ({})",
                 unreachable: str = "cannot read ({})") -> str | None:
    """None when `path` is a regular file, else the reason in the caller's words (`{}`: `path_kind`'s detail)."""
    kind, detail = path_kind(path)
    if kind == "file":
        return None
    return {"missing": missing, "folder": folder, "special": special, "unreachable": unreachable}[kind].format(detail)


def replaced_file(path: Path) -> Path:
    """The file that writing `path` whole (a temporary file renamed onto it) should replace: a symbolic link to a
    file stays a link and its file is replaced; any other path is itself."""
    return Path(os.path.realpath(path)) if path.is_symlink() and path.exists() else path
