"""`captioner train`: train a model from a YAML recipe (with dotted overrides), or resume one."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train a captioning model from a YAML recipe. The recipe has four sections that mirror the
dataclasses in captioner/config/:
  model   encoder and decoder architecture
  data    dataset format and paths, vocabulary, feature cache
  train   optimiser, schedule, validation, run folder
  decode  beam search used for validation and as the model's default
Every key, its meaning and its default: docs/training.md.
Example recipes, one per dataset reader: configs/*.yaml."""

EPILOG = """\
examples:
  captioner train --config configs/flickr8k.yaml --dry-run
  captioner train --config configs/csv.yaml --set data.annotations=my.csv --set train.out_dir=runs/mine
  captioner train --config configs/flickr8k.yaml --resume"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `train` and its options."""
    p = sub.add_parser("train", help="train a model from a YAML config (sections model, data, train, decode)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE",
                   help="YAML recipe, e.g. configs/flickr8k.yaml (keys: docs/training.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the recipe, section.key=value (repeatable), e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.out_dir from its last complete epoch")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the data (images, captions, missing files, vocabulary size per "
                        "split) and train.out_dir (with --resume too), print the resolved config as YAML, and "
                        "stop: no features, no training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from captioner.config import load_config

    cfg = load_config(args.config, args.set)
    if args.dry_run:
        from captioner.training.dry_run import dry_run, format_report

        print(format_report(cfg, dry_run(cfg, resume=args.resume)), end="")
        return 0
    from captioner.training.loop import fit

    fit(cfg, resume=args.resume)
    return 0
