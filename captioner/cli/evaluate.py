"""`captioner evaluate`: score a checkpoint on a dataset split with BLEU, METEOR, ROUGE-L and CIDEr-D.

Images are decoded straight from the files through the public API (each is read once), and scored by the same
`score_captions` that validation during training uses, so the numbers reported are the numbers selected on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from captioner.outputs import escape_path
from captioner.runtime.precisions import PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `evaluate` and its options."""
    p = sub.add_parser("evaluate", help="score a checkpoint with BLEU, METEOR, ROUGE-L and CIDEr-D",
                       description="Caption a dataset split with a checkpoint and score it against the "
                                   "references (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; the scorer validation "
                                   "uses). Prints the scores as JSON.",
                       epilog="example: captioner evaluate --data ../shared/data/flickr8k --format flickr8k "
                              "--split dev --output eval/")
    p.add_argument("--checkpoint", metavar="MODEL",
                   help="a shipped model's name or a .safetensors file (default: the general model)")
    p.add_argument("--data", metavar="PATH",
                   help="dataset folder (flickr8k) or annotation file (karpathy, coco, csv, jsonl)")
    p.add_argument("--format", default="flickr8k", choices=["flickr8k", "karpathy", "coco", "csv", "jsonl"],
                   help="dataset reader, as data.format in a training config (default: flickr8k)")
    p.add_argument("--annotations", metavar="FILE", help="annotation file (coco, karpathy, csv, jsonl; "
                                                          "overrides --data)")
    p.add_argument("--images", metavar="DIR",
                   help="image folder (coco, karpathy, csv, jsonl; default: the annotation file's folder)")
    p.add_argument("--split", default="test",
                   help="split to score: train, dev/val or test (default: test). flickr8k and karpathy read "
                        "their split lists; coco, csv and jsonl score every image for test and the held-out "
                        "share (data.val_fraction of the file) for dev")
    p.add_argument("--split-list", metavar="FILE",
                   help="coco, csv, jsonl: score the images this file lists (one file name per line, as the "
                        "annotations name them; e.g. coco_small's dev.txt) instead of a held-out share")
    p.add_argument("--beam-size", type=int, default=None, help="beams per image (default: the checkpoint's)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="exponent a in log p / length**a (default: the checkpoint's)")
    p.add_argument("--no-repeat-ngram", type=int, default=None,
                   help="forbid repeating an n-gram within a caption (default: the checkpoint's setting; "
                        "0 = off)")
    p.add_argument("--batch-size", type=int, default=64, help="images per network batch")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic path, as for captioner caption (default: auto, this CPU's choice; fp32 "
                        "gives the reference captions)")
    p.add_argument("--max-images", type=int, default=0,
                   help="score only the first N images of the split (0 = all)")
    p.add_argument("--output", metavar="DIR",
                   help="folder for scores.json and captions.jsonl (default: print only)")
    p.set_defaults(func=run, pipeline=True)  # main() shortens OpenMP's spinning first


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the options, as one line naming the argument; None when all are valid.

    Checked before the model is loaded: the API would refuse most of them only at the call, with a traceback,
    and a negative --max-images would silently drop images from the end of the split.
    """
    from captioner.config import MAX_BEAM_SIZE

    checks = [("--batch-size", args.batch_size, 1), ("--beam-size", args.beam_size, 1),
              ("--max-images", args.max_images, 0), ("--no-repeat-ngram", args.no_repeat_ngram, 0)]
    for name, value, low in checks:
        if value is not None and value < low:
            return f"{name} must be >= {low}, got {value}"
    if args.beam_size is not None and args.beam_size > MAX_BEAM_SIZE:
        return f"--beam-size must be <= {MAX_BEAM_SIZE}, got {args.beam_size}"
    if args.length_penalty is not None and not math.isfinite(args.length_penalty):
        return f"--length-penalty must be a finite number, got {args.length_penalty}"
    if args.split_list and args.format in ("flickr8k", "karpathy"):
        return f"--split-list is for coco, csv and jsonl; {args.format} reads its own split lists"
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        return f"--output {escape_path(args.output)} is a file; it names the folder for scores.json and captions.jsonl"
    return None


def run(args: argparse.Namespace) -> int:
    """`captioner evaluate`: score a checkpoint on a dataset split, print JSON, write per-image captions."""
    from captioner.api import Captioner
    from captioner.config import DataConfig
    from captioner.data.readers import check_images, read_dataset
    from captioner.evaluation.diversity import diversity
    from captioner.evaluation.metrics import score_captions
    from captioner.outputs import record, to_json_line

    problem = _check_args(args)
    if problem:
        print(f"captioner: error: {problem}", file=sys.stderr)
        return 2
    cap = Captioner.load(args.checkpoint, precision=args.precision)
    if args.format == "flickr8k":
        data_cfg = DataConfig(format="flickr8k", root=args.data or "")
    else:
        annotations = args.annotations or args.data or ""
        lists = {"train_list": args.split_list} if args.split == "train" else {"val_list": args.split_list}
        data_cfg = DataConfig(format=args.format, annotations=annotations, images=args.images or "",
                              **(lists if args.split_list else {}))
    # A split list names the split's images whatever it is called: read it as the list of its kind.
    listed_as = "train" if args.split == "train" else "dev"
    samples = read_dataset(data_cfg, listed_as if args.split_list and args.format != "flickr8k" else args.split)
    samples, missing = check_images(samples, "skip", f"{args.split} split")
    if missing:
        print(f"captioner: skipping {len(missing)} missing images, e.g. {missing[0]}", file=sys.stderr)
    if args.max_images:
        samples = samples[: args.max_images]
    if not samples:  # the scorers cannot score nothing (METEOR's Java process then hangs for good)
        print(f"captioner: error: no images to score in the {args.split} split", file=sys.stderr)
        return 2
    # Evaluation reads each image once: decode straight from the files through the public API.
    results = cap.caption([s.image for s in samples], beam_size=args.beam_size, batch_size=args.batch_size,
                          length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                          on_error="skip")
    ids = [str(s.image) for s in samples]
    good = [i for i, r in enumerate(results) if r.ok]
    if not good:
        print(f"captioner: error: none of the {len(samples)} images could be captioned, e.g. {results[0].error}",
              file=sys.stderr)
        return 1
    scores = score_captions({ids[i]: results[i].text for i in good},
                            {ids[i]: samples[i].captions for i in good})
    beam_size = args.beam_size or cap.model.decode_cfg.beam_size
    report = {"checkpoint": str(args.checkpoint or "shipped"), "split": args.split, "images": len(good),
              "precision": cap.precision,
              "failed": len(samples) - len(good), "beam_size": beam_size, "scores": scores,
              "diversity": diversity({ids[i]: results[i].text for i in good})}
    print(json.dumps(report, indent=2, allow_nan=False))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        with (out / "captions.jsonl").open("w", encoding="utf-8") as fh:
            for s, r in zip(samples, results):
                # The record `captioner caption --format jsonl` writes (strict JSON), with the references added.
                fh.write(to_json_line({**record(r), "path": escape_path(s.image), "references": s.captions}))
    return 0 if len(good) == len(samples) else 1
