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
import sys
from collections.abc import Sequence

from captioner.cli import app, caption, evaluate, models, train


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
    written so far are kept for --resume); 130 interrupted. A closed stdout (`captioner caption DIR | head -1`) ends quietly.
    """
    args = build_parser().parse_args(argv)  # first: --help and usage errors load nothing heavy
    if getattr(args, "light", False):  # commands that need no library errors (`models`): no torch imported
        return args.func(args)
    import errno
    import os

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
    except BrokenPipeError:
        try:  # the reader went away: drop what is buffered, so the interpreter's final flush does not complain
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except (CheckpointError, ConfigError, EncoderError, DatasetError, CalibrationError, FileNotFoundError,
            OutputResumeError, UnknownModelError) as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EISDIR, errno.EFBIG):
            print(f"captioner: error: cannot write: {exc}", file=sys.stderr)
            return 4
        raise
