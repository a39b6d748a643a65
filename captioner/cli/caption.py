"""`captioner caption`: caption files and folders as a stream of records (text, JSON lines or CSV)."""

from __future__ import annotations

import argparse
import sys

from captioner.outputs import open_writer


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `caption` and its options."""
    p = sub.add_parser("caption", help="caption image files and folders")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", help="model .safetensors (default: the shipped model)")
    p.add_argument("--beam-size", type=int, default=None, help="beams per image (default: the model's)")
    p.add_argument("--n-best", type=int, default=1, help="alternatives per image")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per network batch: larger batches step more beams per matrix product")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=1,
                   help="image-decoding threads working ahead of the network (0: decode in the main thread)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "int8", "reference"], default="auto",
                   help="auto/fp32: fast CPU path, same captions as reference (the training-time modules); "
                        "bf16: bf16 encoder and decoder products, faster on CPUs with bf16 instructions, "
                        "changes some captions; int8: int8 encoder (and bf16 decoder products where the CPU has "
                        "bf16 instructions), the fastest, changes more captions, needs the checkpoint's "
                        ".int8.json calibration (the shipped model has one)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for the network (default: one per core); 1 is faster when other processes "
                        "keep the cores busy")
    p.add_argument("--format", choices=["text", "jsonl", "csv"], default="text")
    p.add_argument("--output", help="write here instead of stdout")
    p.add_argument("--shard", help="I/N: caption only the I-th of N deterministic shards (0-based)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Caption files as a stream: each batch's records are written (and flushed) as soon as it is finished.

    Memory does not grow with the number of images (only the path list does). The first Ctrl-C stops at the
    next record boundary, so the output holds only whole records; a second one stops at once.
    """
    import signal
    import threading

    from tqdm import tqdm

    from captioner.api import Captioner
    from captioner.images import find_images
    from captioner.sharding import parse_shard, take_shard

    try:
        paths = list(find_images(args.paths))
    except FileNotFoundError as exc:
        print(f"captioner: {exc}", file=sys.stderr)
        return 2
    if args.shard:
        try:
            index, count = parse_shard(args.shard)
        except ValueError as exc:
            print(f"captioner: {exc}", file=sys.stderr)
            return 2
        paths = take_shard(paths, index, count)
    if not paths:
        print("captioner: no images found", file=sys.stderr)
        return 2
    if args.num_workers < 0:
        print("captioner: --num-workers must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    captioner = Captioner.load(args.checkpoint, precision=args.precision)
    failures = 0
    show_bar = len(paths) > args.batch_size and not args.quiet
    stop: list[int] = []

    def on_sigint(signum, frame) -> None:
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        with open_writer(args.output, args.format, args.n_best) as writer, \
                tqdm(total=len(paths), unit="img", disable=not show_bar, file=sys.stderr, dynamic_ncols=True,
                     smoothing=0.1) as bar:
            stream = captioner.caption_iter(paths, beam_size=args.beam_size, n_best=args.n_best,
                                            batch_size=args.batch_size, max_length=args.max_length,
                                            on_error="skip", num_workers=args.num_workers)
            try:
                for caption in stream:
                    writer.write(caption)
                    if caption.error:
                        failures += 1
                        bar.write(f"captioner: failed: {caption.error}", file=sys.stderr)
                    bar.update(1)
                    if stop:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                stream.close()
                writer.flush()
                bar.close()
                print(f"\ncaptioner: interrupted; {writer.count} of {len(paths)} records written",
                      file=sys.stderr)
                return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if failures:
        print(f"captioner: {failures} of {len(paths)} images failed", file=sys.stderr)
        return 1
    return 0
