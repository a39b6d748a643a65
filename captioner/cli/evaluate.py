"""`captioner evaluate`: score a checkpoint on a dataset split with BLEU, METEOR, ROUGE-L and CIDEr-D.

Images are decoded straight from the files through the public API (each is read once), and scored by the same
`score_captions` that validation during training uses, so the numbers reported are the numbers selected on.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

from captioner.escapes import escape_path, path_line, shown
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
    p.add_argument("--encoder-weights", metavar="FILE",
                   help="the encoder's weights file, for a model whose encoder no installed package ships "
                        "(resnet50): the file it was trained with")
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
    from captioner.config import MAX_BEAM_SIZE, MAX_LENGTH_PENALTY

    checks = [("--batch-size", args.batch_size, 1), ("--beam-size", args.beam_size, 1),
              ("--max-images", args.max_images, 0), ("--no-repeat-ngram", args.no_repeat_ngram, 0)]
    for name, value, low in checks:
        if value is not None and value < low:
            return f"{name} must be >= {low}, got {value}"
    if args.beam_size is not None and args.beam_size > MAX_BEAM_SIZE:
        return f"--beam-size must be <= {MAX_BEAM_SIZE}, got {args.beam_size}"
    if args.length_penalty is not None and not 0 <= args.length_penalty <= MAX_LENGTH_PENALTY:  # NaN too
        return f"--length-penalty must be in [0, {MAX_LENGTH_PENALTY:g}], got {args.length_penalty}"
    if args.split_list and args.format in ("flickr8k", "karpathy"):
        return f"--split-list is for coco, csv and jsonl; {args.format} reads its own split lists"
    if not (args.data or args.annotations):  # was reported as a missing Flickr_8k.testImages.txt
        return "--data (or --annotations) is required: the dataset folder or annotation file to score"
    if args.format == "flickr8k" and not args.data:  # it reads a folder; --annotations alone was a traceback
        return "--format flickr8k reads a dataset folder: give it as --data (--annotations is for the other formats)"
    return None


def _missing_split_list(args: argparse.Namespace) -> str | None:
    """One line when a flickr8k folder lacks the split list asked for, naming the splits it has; None otherwise.

    Why: the default split is test, and a copy of Flickr8k without its test list (as ../shared/data holds) said
    only that Flickr_8k.testImages.txt does not exist."""
    from captioner.data.readers import FLICKR8K_SPLITS

    if args.format != "flickr8k" or args.split not in FLICKR8K_SPLITS:
        return None
    folder = Path(args.data)
    if (folder / FLICKR8K_SPLITS[args.split]).is_file() or not folder.is_dir():
        return None  # the reader names a missing folder itself
    present = [name for name in ("train", "dev", "test") if (folder / FLICKR8K_SPLITS[name]).is_file()]
    has = f"it has {', '.join(present)}: pass --split {present[-1]}" if present else "it has none"
    return (f"{escape_path(folder)} has no {args.split} split list ({FLICKR8K_SPLITS[args.split]}); {has} "
            "(--split defaults to test)")


OUTPUT_FILES = ("scores.json", "captions.jsonl")
"""What `--output DIR` receives."""


def _output_problem(output: str) -> tuple[int, str] | None:
    """(exit code, one line) when `--output` cannot be the folder for OUTPUT_FILES; None when it can.

    Why before the model loads: a file or a dangling link in its place, or a file above it, ended the run in a
    traceback after all the decoding and scoring, and a FIFO in the place of an output file blocked for good.
    Exit 2 for what stands where the folder or a file of it should be (a file, a dangling link, a FIFO: as for
    `--output` naming a file), 4 for a folder that cannot be made or written (below a file, no permission).
    """
    out = Path(output)
    what = "it names the folder for scores.json and captions.jsonl"
    if out.is_symlink() and not out.exists():
        return 2, f"--output {escape_path(out)} is a symbolic link to nothing; {what}"
    if out.exists() and not out.is_dir():
        return 2, f"--output {escape_path(out)} is a file; {what}"
    folder = _existing_ancestor(out)
    if not folder.is_dir():  # exit 4, as `caption --output afile/x.txt` (ENOTDIR): no folder can be made there
        return 4, f"cannot write --output {escape_path(out)}: {escape_path(folder)} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return 4, f"cannot write --output {escape_path(out)}: {escape_path(folder)} is not writable"
    for name in OUTPUT_FILES:
        kind = _not_regular(out / name)
        if kind:
            return 2, f"--output {escape_path(out / name)} is not a regular file ({kind}); remove it or choose another"
    return None


def _existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest parent that exists (a link, even a dangling one, counts as existing): the folder
    `mkdir(parents=True)` would create `path` in. Why `lexists`: `exists` is False below a regular file."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _not_regular(path: Path) -> str | None:
    """What `path` (through links) is when it exists and is not a regular file ("a FIFO", ...); else None.

    Why: writing to a FIFO waits for a reader for good, and a folder cannot be replaced by a file."""
    from captioner.path_kind import path_kind

    kind, detail = path_kind(path)  # absent (or a dangling link, which the write replaces): None
    return {"folder": "a folder", "special": detail}.get(kind)


def _file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of the regular file `path` names through links; None when there is none.

    The identity `output_file.same_file` compares, taken once per file: the images of a split are many."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _input_files(args: argparse.Namespace) -> list[str]:
    """The files evaluate reads that the command line names, or that a flickr8k folder holds."""
    from captioner.cli.output_file import model_files
    from captioner.data.readers import FLICKR8K_SPLITS

    given = [args.data, args.annotations, args.split_list, *model_files(args.checkpoint, args.encoder_weights)]
    if args.format == "flickr8k" and args.data:
        names = ["Flickr8k.token.txt", *FLICKR8K_SPLITS.values()]
        given += [str(Path(args.data) / name) for name in names]
    return [str(f) for f in given if f]


def _clobbered_input(args: argparse.Namespace, samples: list) -> str | None:
    """One line when an output file of `--output` is an input (the annotations, a split list, the checkpoint,
    an image); None otherwise. Why: `--data DIR/captions.jsonl --output DIR` overwrote the annotations."""
    outputs = {}
    for name in OUTPUT_FILES:
        key = _file_id(Path(args.output) / name)
        if key is not None:
            outputs[key] = Path(args.output) / name
    if not outputs:  # a new or empty folder: nothing to compare
        return None
    for source in [*_input_files(args), *(s.image for s in samples)]:
        key = _file_id(source)
        if key in outputs:
            return (f"--output would overwrite {escape_path(outputs[key])}, which is the input file "
                    f"{escape_path(source)}; choose another --output folder")
    return None


def _read_split(args: argparse.Namespace) -> list:
    """Every sample of the split asked for (a DatasetError for an unknown split name or a bad file)."""
    from captioner.config import DataConfig
    from captioner.data.splits import check_split, read_dataset

    check_split(args.format, args.split)  # a --split-list reads as "train" or "dev": check the name given
    if args.format == "flickr8k":
        data_cfg = DataConfig(format="flickr8k", root=args.data or "")
    else:
        annotations = args.annotations or args.data or ""
        lists = {"train_list": args.split_list} if args.split == "train" else {"val_list": args.split_list}
        data_cfg = DataConfig(format=args.format, annotations=annotations, images=args.images or "",
                              **(lists if args.split_list else {}))
    # A split list names the split's images whatever it is called: read it as the list of its kind.
    listed_as = "train" if args.split == "train" else "dev"
    return read_dataset(data_cfg, listed_as if args.split_list and args.format != "flickr8k" else args.split)


def _usable(args: argparse.Namespace, samples: list) -> list:
    """The samples to score: missing images skipped (and said so), the first --max-images kept."""
    from captioner.data.splits import check_images

    samples, missing = check_images(samples, "skip", f"{args.split} split")
    if missing:
        print(f"captioner: skipping {len(missing)} missing images, e.g. {path_line(missing[0])}",
              file=sys.stderr)
    return samples[: args.max_images] if args.max_images else samples


def _refuse(message: str, code: int = 2) -> int:
    print(f"captioner: error: {shown(message)}", file=sys.stderr)
    return code


def _write_outputs(out: Path, report: dict, lines: list[str]) -> None:
    """captions.jsonl, then scores.json, each written whole through a temporary file beside it and renamed onto
    it: a failure (a full disk, a kill) leaves the old file or none, never half of one; scores.json last, so
    its presence means both are whole."""
    from captioner.models.checkpoint import atomic_write_bytes
    from captioner.path_kind import replaced_file

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(replaced_file(out / "captions.jsonl"), "".join(lines).encode("utf-8"))
    atomic_write_bytes(replaced_file(out / "scores.json"), json.dumps(report, indent=2, allow_nan=False).encode())


def run(args: argparse.Namespace) -> int:
    """`captioner evaluate`: score a checkpoint on a dataset split, print JSON, write per-image captions."""
    from captioner.api import Captioner
    from captioner.evaluation.diversity import diversity
    from captioner.evaluation.metrics import score_captions
    from captioner.models.shipped import DEFAULT
    from captioner.outputs import record, to_json_line

    problem = _check_args(args)
    if problem:
        return _refuse(problem)
    out_problem = _output_problem(args.output) if args.output else None
    if out_problem:
        return _refuse(out_problem[1], out_problem[0])
    missing = _missing_split_list(args)
    if missing:
        return _refuse(missing)
    samples = _read_split(args)  # before the model loads: data errors cost no decoding
    clash = _clobbered_input(args, samples) if args.output else None
    if clash:
        return _refuse(clash)
    samples = _usable(args, samples)
    if not samples:  # the scorers cannot score nothing (METEOR's Java process then hangs for good)
        return _refuse(f"no images to score in the {args.split} split")
    cap = Captioner.load(args.checkpoint, encoder_weights=args.encoder_weights, precision=args.precision)
    # Evaluation reads each image once: decode straight from the files through the public API.
    results = cap.caption([s.image for s in samples], beam_size=args.beam_size, batch_size=args.batch_size,
                          length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                          on_error="skip")
    ids = [str(s.image) for s in samples]
    good = [i for i, r in enumerate(results) if r.ok]
    if not good:
        return _refuse(f"none of the {len(samples)} images could be captioned, e.g. {results[0].error}", 1)
    scores = score_captions({ids[i]: results[i].text for i in good},
                            {ids[i]: samples[i].captions for i in good})
    beam_size = args.beam_size or cap.model.decode_cfg.beam_size
    report = {"checkpoint": str(args.checkpoint or DEFAULT), "split": args.split, "images": len(good),
              "precision": cap.precision,
              "failed": len(samples) - len(good), "beam_size": beam_size, "scores": scores,
              "diversity": diversity({ids[i]: results[i].text for i in good})}
    print(json.dumps(report, indent=2, allow_nan=False))
    if args.output:
        # The record `captioner caption --format jsonl` writes (strict JSON), with the references added.
        lines = [to_json_line({**record(r), "path": escape_path(s.image), "references": s.captions})
                 for s, r in zip(samples, results)]
        _write_outputs(Path(args.output), report, lines)
    return 0 if len(good) == len(samples) else 1
