"""The `captioner` command: thin argument parsing over the library.

    captioner caption PATH... [--checkpoint FILE] [--beam-size K] [--format text|jsonl|csv] [--output FILE]
    captioner train --config configs/flickr8k.yaml [--set train.lr=3e-4 ...] [--resume]
    captioner evaluate --checkpoint FILE --data DIR --format flickr8k --split dev

Each command lives in its own module (`add_parser` registers it, `run` carries it out); the library is imported
inside `run`, so `--help` loads nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captioner.cli import caption, evaluate, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (caption, train, evaluate):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `captioner` console script; returns the exit code."""
    from captioner.config import ConfigError
    from captioner.data.readers import DatasetError
    from captioner.models.checkpoint import CheckpointError
    from captioner.models.encoder import EncoderError
    from captioner.runtime.int8 import CalibrationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, EncoderError, DatasetError, CalibrationError, FileNotFoundError) as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 2
