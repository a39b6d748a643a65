"""The `captioner` command: thin argument parsing over the library.

    captioner caption PATH... [--checkpoint FILE] [--beam-size K] [--format text|jsonl|csv] [--output FILE]
    captioner train --config configs/flickr8k.yaml [--set train.lr=3e-4 ...] [--resume]
    captioner evaluate --checkpoint FILE --data DIR --format flickr8k --split dev
    captioner models

Each command lives in its own module (`add_parser` registers it, `run` carries it out); the library is imported
inside `run`, so `--help` loads nothing heavy.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import os
import sys
import threading
from collections.abc import Sequence

from captioner.cli import app, caption, evaluate, models, train
from captioner.cli.output_file import OutputFolderError
from captioner.escapes import shown
from captioner.runtime import openmp

PATH_ERRORS = (errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP)
"""Paths that cannot name a file (under a file, too long, a loop of links): exit 4 for the output's, exit 2 for an
input's (which the loaders mostly report themselves, `captioner.path_kind`)."""
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EISDIR, errno.EFBIG, *PATH_ERRORS)
"""The errnos that mean "a file could not be written" (exit code 4); the last three are paths that cannot name a
file (under a file, too long, a loop of links), which reached the user as tracebacks."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (caption, train, evaluate, models, app):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `captioner` console script; returns the exit code.

    Exit codes: 0 done; 1 some images failed or a given path was missing; 2 usage, config, checkpoint or data
    errors (one line on stderr); 3 training stopped on a non-finite loss; 4 a file could not be written (disk
    full, permissions); 5 a `caption --ray` job failed after it started (an actor or node lost; the records
    written so far are kept for --resume); 130 interrupted. A closed stdout (`captioner caption DIR | head -1`)
    ends quietly.
    """
    args = build_parser().parse_args(argv)  # first: --help and usage errors load nothing heavy
    try:
        return _run(args)
    except BrokenPipeError:
        try:  # the reader went away: drop what is buffered, so the interpreter's final flush does not complain
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except OSError as exc:
        if exc.errno in PATH_ERRORS and not _names_output(exc, args):  # an input's name: a data error
            print(f"captioner: error: cannot read: {shown(exc)}", file=sys.stderr)
            return 2
        if exc.errno in WRITE_ERRORS or isinstance(exc, OutputFolderError):
            print(f"captioner: error: {shown(_cannot_write(exc, args))}", file=sys.stderr)
            return 4
        raise


def _names_output(exc: OSError, args: argparse.Namespace) -> bool:
    """Whether the file `exc` names is `--output`, beside it (its temporary file) or inside it (evaluate's
    folder); an error without a file name counts as the output's."""
    output = getattr(args, "output", None)
    if exc.filename is None:
        return True
    if not output:
        return False
    name, target = os.fsdecode(exc.filename), os.fsdecode(output)
    return os.path.dirname(name) == os.path.dirname(target) or name.startswith(target.rstrip("/") + "/")


def _cannot_write(exc: OSError, args: argparse.Namespace) -> str:
    """The message of a write failure. Why `--output` is named: a failed flush (a full disk, `/dev/full`)
    carries no file name, and the file being written is then `--output`'s."""
    output = getattr(args, "output", None) if exc.filename is None else None
    if not output:
        return f"cannot write: {exc}"
    from captioner.escapes import escape_path

    return f"cannot write --output {escape_path(output)}: {exc}"


def _run(args: argparse.Namespace) -> int:
    """Carry out the parsed command; the library's errors become exit codes 2 and 3."""
    if getattr(args, "light", False):  # commands that need no library errors (`models`): no torch imported
        return args.func(args)
    if getattr(args, "pipeline", False):  # `caption`, `evaluate`: before torch is imported (runtime.openmp)
        openmp.limit_spinning()
    from captioner.cli.output_file import OutputResumeError
    from captioner.config import ConfigError
    from captioner.data.readers import DatasetError
    from captioner.models.checkpoint import CheckpointError
    from captioner.models.encoder import EncoderError
    from captioner.models.shipped import UnknownModelError
    from captioner.runtime.int8 import CalibrationError
    from captioner.training.loop import TrainingError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, EncoderError, DatasetError, CalibrationError, FileNotFoundError,
            OutputResumeError, UnknownModelError) as exc:
        print(f"captioner: error: {shown(exc)}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"captioner: error: {shown(exc)}", file=sys.stderr)
        return 3


def console() -> None:
    """The `captioner` console script and `python -m captioner`: `main`, then an exit that skips the
    interpreter's teardown of the modules it imported, once everything a normal exit finishes is finished.

    Why: tearing down torch's modules took 0.4-0.5 s of every command on a 2-core AVX2 EPYC (`python -c
    "import torch"` 2.83-2.98 s wall against 2.40-2.45 s with `os._exit`), a sixth of a one-image caption.
    First the atexit handlers run (temporary folders, logging, worker processes, Ray) and stdout and stderr
    are flushed; a flush that fails is an error (exit code 4, or 141 for a closed pipe), where a normal exit
    would only print a warning. The exit is the normal one where a thread that it would wait for (not a
    daemon) still runs, or under a profiler or tracer (cProfile, trace, a debugger), which write their
    results after it.
    """
    code = main()
    if (sys.getprofile() or sys.gettrace()
            or any(not t.daemon and t is not threading.main_thread() for t in threading.enumerate())):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    os._exit(_flush(int(code or 0)))


def _flush(code: int) -> int:
    """Flush stdout and stderr (either may be None: closed at the start); the exit code after it."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except BrokenPipeError:
            code = code or 141
        except ValueError:  # closed by the command itself: nothing to write
            pass
        except OSError as exc:
            if code != 4:  # 4: the command has said it cannot write
                with contextlib.suppress(OSError):
                    os.write(2, f"captioner: error: cannot write: {exc}\n".encode())
                code = code or 4
    return code
