"""The run folder (`train.out_dir`): which files a run owns there, the lock that keeps one run in it at a time,
and the run's text and image files, each written whole.

Why this care: `train.out_dir` may name any folder, the recipe's own (`out_dir: .`) included. A run that wrote
into it blindly replaced the user's `config.yaml` (the recipe being run), `best.safetensors` and others, and
deleted every hidden `.*.tmp` file there; two runs started on one folder wrote their checkpoints in turn; and a
kill while `metrics.jsonl` was rewritten left it empty for good.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from captioner.config import Config, config_yaml, load_config
from captioner.config.checks import config_error
from captioner.models.checkpoint import atomic_write_bytes
from captioner.training.distributed import Dist, broadcast
from captioner.training.log import log
from captioner.training.plots import plot_history
from captioner.training.run_state import json_safe

CONFIG = "config.yaml"
BEST = "best.safetensors"
STATE = "train_state.safetensors"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
RUN_FILES = (CONFIG, BEST, STATE, METRICS, CURVES)
"""Every file a run writes into its folder (besides `LOCK`); a new run refuses a folder holding any of them."""
LOCK = ".captioner-train.lock"
"""The file a running run holds its flock on; removed when the run ends, left (unlocked) by a killed one."""

_TEMPORARY = re.compile(r"\.(?:{})\.[a-z0-9_]+\.tmp".format("|".join(map(re.escape, RUN_FILES))))
"""The names `atomic_write_bytes` gives the temporary files of the run's files: `tempfile.mkstemp` with prefix
`.<name>.` and suffix `.tmp`, random [a-z0-9_] characters between (8 today; their number is tempfile's
business). No other file is ours to delete."""


def refusal(run: Path, resume: bool) -> str | None:
    """Why a run may not write into `run`, or None. Looked at under the run's lock, before anything is written.

    Without --resume, any file a run writes is refused: the folder is a previous run or someone else's files
    (`out_dir: .` beside the recipe), and both would be overwritten; but a run's own config.yaml alone is a run
    that stopped before its first epoch, and starts again. With --resume a run's files are expected, but a
    folder with no state to resume and a config.yaml no run wrote (the recipe itself) is not a run.
    """
    present = [name for name in RUN_FILES if os.path.lexists(run / name)]
    if present == [CONFIG] and written_by_a_run(run / CONFIG):
        return None  # a run that stopped before its first epoch (a data error, a kill): it starts again there
    if not resume and present:
        what = "a previous run" if STATE in present else "files a training run writes"
        return (f"train.out_dir {run} already holds {', '.join(present)} ({what}); pass --resume to continue "
                "the run there, or set train.out_dir to a new or empty folder")
    if resume and not (run / STATE).exists():
        if CONFIG in present and not written_by_a_run(run / CONFIG):
            return (f"train.out_dir {run} holds no {STATE} to resume, and its {CONFIG} was not written by a "
                    "training run (the recipe itself?), so a run would overwrite it; set train.out_dir to a folder "
                    "of its own")
        # A log means finished epochs whose state is gone (deleted to save space, say): a fresh run would replace
        # their best.safetensors. Without one, a best.safetensors is the first epoch's, of a run killed before its
        # state was written, and the run starts again.
        if METRICS in present or CURVES in present:
            others = [name for name in present if name != CONFIG]
            return (f"train.out_dir {run} holds {', '.join(others)} but no {STATE} to resume from, and a new run "
                    "would overwrite them; move them away, or set train.out_dir to a new or empty folder")
    return None


def on_rank0(dist: Dist, what: Callable[[], Any]) -> Any:
    """`what()` run by rank 0 alone, its result handed to every rank; an OSError it raises stops every rank.

    Why: a rank-0 failure before the broadcast (a lock file it cannot open, a folder it cannot make) left the
    other ranks in `broadcast` with no value coming: under torchrun with gloo they ended in a traceback from
    `broadcast_object_list` once rank 0 had died, naming nothing. Now rank 0 raises its error and the others a
    config error naming it."""
    result, failure = None, None
    if dist.is_main:
        try:
            result = what()
        except OSError as exc:
            failure = exc
    result, message = broadcast((result, None if failure is None else str(failure)), dist)
    if failure is not None:
        raise failure
    if message is not None:
        raise config_error(f"train.out_dir: rank 0 could not prepare the run folder ({message})")
    return result


def lock_run(cfg: Config, dist: Dist, held: ExitStack) -> None:
    """Rank 0 takes the run folder's lock, kept in `held` until training ends; a folder another run holds stops
    every rank at once (rank 0 alone looked, so it tells the others)."""
    run = Path(cfg.train.out_dir)

    def lock() -> str | None:
        run.mkdir(parents=True, exist_ok=True)
        return held.enter_context(RunLock(run)).acquire()

    holder = on_rank0(dist, lock)
    if holder:
        raise config_error(f"train.out_dir {run} is in use by another training run ({holder})")


def open_run(cfg: Config, resume: bool, dist: Dist) -> Path:
    """Rank 0 looks at what the (locked) run folder holds and refuses one this run may not write into, stopping
    every rank before anything is written; then it clears a killed run's temporary files and saves the config."""
    run = Path(cfg.train.out_dir)
    problem = on_rank0(dist, lambda: refusal(run, resume))
    if problem:
        raise config_error(problem)
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        remove_temporaries(run)  # under the lock: no live run's temporary file is among them
        write_config(cfg, run)
    return run


def written_by_a_run(path: Path) -> bool:
    """Whether `path` is a config.yaml as a run writes it: a regular file whose text is exactly the resolved config
    it reads back as. Why so strict: a hand-written recipe (comments, its own key order, defaults left out) is
    never in that form, and it is the user's, so it is never replaced."""
    if path.is_symlink():
        return False
    try:
        return path.read_bytes() == config_yaml(load_config(path)).encode("utf-8")
    except (OSError, ValueError):  # unreadable, or not a valid config (ConfigError is a ValueError)
        return False


def remove_temporaries(run: Path) -> list[Path]:
    """Delete the temporary files a killed run's atomic writes left in `run` (only under the run's lock: a live
    run's are in use); returns them. Other tools' hidden `.tmp` files are left alone."""
    removed = []
    for entry in run.iterdir():
        if _TEMPORARY.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_config(cfg: Config, run: Path) -> None:
    """Save the resolved config as `run/config.yaml`, atomically; one that no run wrote (edited by hand, or the
    recipe being resumed) is kept as it is, with a line saying so."""
    path = run / CONFIG
    if os.path.lexists(path) and not written_by_a_run(path):
        log(f"{path} is kept as it is (not a config a run wrote: edited, or the recipe being run); "
            "this run's resolved config is not saved there")
        return
    atomic_write_bytes(path, config_yaml(cfg).encode("utf-8"))


def write_history(run: Path, history: list[dict[str, Any]]) -> None:
    """Write `metrics.jsonl` and `curves.png` from the run's history, each whole (temporary file, then rename), so a
    kill leaves the previous version, never an empty or half-written one."""
    rows = "".join(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in history)  # strict JSON: NaN is null
    atomic_write_bytes(run / METRICS, rows.encode("utf-8"))
    if history:  # plot_history draws nothing for no epochs
        import matplotlib

        image = io.BytesIO()
        with matplotlib.rc_context({"savefig.format": "png"}):  # a buffer has no suffix to tell the format
            plot_history(history, image)  # it hands the path to savefig, which takes a binary file too
        atomic_write_bytes(run / CURVES, image.getvalue())


class RunLock:
    """An exclusive `fcntl.flock` on `<run>/.captioner-train.lock`, held while a run trains there.

    Why flock: the kernel drops it when its process dies, however it dies, so a killed run never leaves its
    folder locked; the file itself only tells who holds it (pid and host), for the refusal's message.
    """

    def __init__(self, run: Path):
        self.path = run / LOCK
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None when taken (or the file system has no locks), else who holds it ("pid N")."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except PermissionError:  # another user's stale lock file in a shared folder: flock works read-only
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                return holder
            except OSError as exc:  # a file system without locks: train, as before there was a lock
                os.close(fd)
                log(f"cannot lock {self.path} ({exc.strerror or exc}): another run started on this folder "
                    "would not be refused")
                return None
            if _names(self.path, fd):
                break
            os.close(fd)  # its holder removed it after it was opened here: lock the file there now
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:  # opened read-only: the lock holds, only its holder's name is not written
            pass
        self._fd = fd
        return None

    def release(self) -> None:
        """Remove the lock file while still holding it, then let go (a run waiting on the removed file retries
        on a new one: see `acquire`)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced since it was opened)."""
    try:
        there, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, from what its holder wrote into the file: "pid N", with the host when it is another."""
    try:
        pid, host = os.pread(fd, 300, 0).decode("utf-8", "replace").split()
    except (OSError, ValueError):  # not written yet (the holder has just locked it), or not ours
        return "pid unknown"
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on host {host}"
