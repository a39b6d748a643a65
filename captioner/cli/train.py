"""`captioner train`: train a model from a YAML recipe (with dotted overrides), or resume one."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `train` and its options."""
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.training.loop import fit

    cfg = load_config(args.config, args.set)
    fit(cfg, resume=args.resume)
    return 0
