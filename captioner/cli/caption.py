"""`captioner caption`: caption files and folders as a stream of records (text, JSON lines, CSV or Parquet).

`--ray [ADDRESS]` captions on a Ray cluster instead (`captioner.cli.caption_ray`): the same files, the same
records in the same order, in every format.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from captioner.escapes import escape_path, path_line, shown
from captioner.outputs import FORMATS
from captioner.runtime.precisions import PRECISIONS

MAX_THREADS = 1024
"""Most `--threads`: torch starts that many OpenMP threads, and `--threads 100000` crashed the process with a
segmentation fault (thread creation failing inside libgomp), `--threads 99999999999` with a traceback."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `caption` and its options."""
    p = sub.add_parser("caption", help="caption image files and folders")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", metavar="MODEL",
                   help="a shipped model's name (`captioner models`: general, flickr8k) or a .safetensors file "
                        "(default: the general model)")
    p.add_argument("--encoder-weights", metavar="FILE",
                   help="the encoder's weights file, for a model whose encoder no installed package ships "
                        "(resnet50): the file it was trained with")
    p.add_argument("--beam-size", type=int, default=None, help="beams per image (default: the model's)")
    p.add_argument("--n-best", type=int, default=1, help="alternatives per image (default: 1)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per network batch (default: 64): larger "
                        "batches step more beams per matrix product; the progress bar shows when there is more "
                        "than one batch")
    p.add_argument("--max-length", type=int, default=None,
                   help="most words per caption, the end token included (default: the model's)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="image-decoding threads working ahead of the network (default: 1; 0: decode in the main "
                        "thread)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 on CPUs with AMX and OpenVINO installed (OpenVINO bf16 encoder), "
                        "bf16-encoder on CPUs with AVX512-BF16 but no AMX (OpenVINO installed), bf16-decoder on CPUs "
                        "with native bf16 but no OpenVINO, fp32 elsewhere; "
                        "fp32: fast CPU path, same captions as reference (the training-time modules); "
                        "bf16-decoder: fp32 encoder, bf16 decoder products; "
                        "bf16-encoder: bf16 encoder, fp32 decoder step products (projection in bf16); "
                        "bf16: bf16 encoder and decoder products, faster on CPUs with bf16 instructions, "
                        "changes some captions (dev CIDEr-D within 0.01 of fp32 with AMX); int8: int8 encoder "
                        "(and bf16 decoder products where the CPU has bf16 instructions), changes more captions, "
                        "needs the checkpoint's .int8.json calibration (each shipped model has one)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for the network (default: one per core); 1 is faster when other processes "
                        "keep the cores busy")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text: path<TAB>caption lines; jsonl: one JSON record per image; csv: a header, then a row "
                        "each; parquet: one row per image, alternatives and tags as list-of-struct columns "
                        "(needs pyarrow and --output)")
    p.add_argument("--tags", action="store_true",
                   help="add the encoder's top ImageNet tags to every record: jsonl/parquet a tags list of "
                        "{label, probability}; csv a tags column (pizza:0.931;plate:0.041); text a TAB and "
                        "[pizza 0.93, plate 0.04] after the caption")
    p.add_argument("--output", help="write here instead of stdout (through a temporary file beside it, renamed "
                                    "into place at the end or on Ctrl-C)")
    p.add_argument("--resume", action="store_true",
                   help="with --output: keep the whole records already written (also those of a killed run), "
                        "skip their images and append the rest")
    p.add_argument("--shard", help="I/N: caption only the I-th of N deterministic shards (0-based)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="caption on Ray Data actors (needs the ray extra): without ADDRESS a local Ray "
                        "(ray.init()), with one the cluster there (HOST:PORT); same records and order as without. "
                        "Write it after the paths, or as --ray=ADDRESS")
    p.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="with --ray: actors in the pool, one model each (default 1); each reserves --threads CPUs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, pipeline=True)  # main() shortens OpenMP's spinning first


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the numeric options, as one line naming the argument; None when all are valid."""
    from captioner.config import MAX_BEAM_SIZE, MAX_DECODE_LENGTH

    checks = [("--batch-size", args.batch_size, 1), ("--n-best", args.n_best, 1),
              ("--num-workers", args.num_workers, 0), ("--beam-size", args.beam_size, 1),
              ("--max-length", args.max_length, 1), ("--threads", args.threads, 1)]
    for name, value, low in checks:
        if value is not None and value < low:
            return f"{name} must be >= {low}, got {value}"
    highs = [("--beam-size", args.beam_size, MAX_BEAM_SIZE), ("--max-length", args.max_length, MAX_DECODE_LENGTH),
             ("--threads", args.threads, MAX_THREADS)]
    for name, value, high in highs:
        if value is not None and value > high:
            return f"{name} must be <= {high}, got {value}"
    if args.beam_size is not None and args.n_best > args.beam_size:
        return f"--n-best {args.n_best} is above --beam-size {args.beam_size}"
    if args.resume and not args.output:
        return "--resume needs --output"
    if args.format == "parquet" and not args.output:
        return "--format parquet needs --output (a Parquet file is not a stream)"
    if args.format == "parquet" and args.resume:
        return "--resume does not work with --format parquet (the file is complete only at the end of a run)"
    if args.ray_actors is not None and args.ray is None:
        return "--ray-actors needs --ray"
    if args.ray_actors is not None and args.ray_actors < 1:
        return f"--ray-actors must be >= 1, got {args.ray_actors}"
    return None


def _expand(raw_paths: list[str]) -> tuple[list, list[str]]:
    """Image paths under `raw_paths`, each once in the order first met, and the given paths that do not exist.
    Why once: `captioner caption photos photos/a.jpg` wrote two records of a.jpg."""
    from captioner.images import find_images

    paths, missing = {}, []
    for raw in raw_paths:
        try:
            for path in find_images([raw]):  # keyed by the absolute path, "in/../in" and "./in" alike
                paths.setdefault(os.path.normpath(os.path.abspath(path)), path)
        except FileNotFoundError:
            missing.append(raw)
    return list(paths.values()), missing


def run(args: argparse.Namespace) -> int:
    """Caption files as a stream: each batch's records are written (and flushed) as soon as it is finished.

    Memory does not grow with the number of images (only the path list does). The first Ctrl-C stops at the
    next record boundary, so the output holds only whole records; a second one stops at once. Every argument is
    checked before the output is touched; `--output` is written through `output_file.PartialOutput`. With `--ray`
    the records come from Ray actors (`caption_ray.records`), everything else is the same; the model is still
    loaded here once, so a bad checkpoint or option is refused before the cluster is touched.
    """
    import signal
    import threading

    from captioner.cli.output_file import PartialOutput, clobbered_input
    from captioner.outputs import TEXT_FORMATS, written_clash
    from captioner.parquet import pyarrow_missing
    from captioner.sharding import parse_shard, take_shard

    problem = _check_args(args)
    if not problem and args.format == "parquet":
        problem = pyarrow_missing()
    if not problem and args.ray is not None:
        from captioner.cli import caption_ray

        problem = caption_ray.check(args)
    if problem:
        print(f"captioner: error: {shown(problem)}", file=sys.stderr)
        return 2
    paths, missing = _expand(args.paths)
    for raw in missing:
        print(f"captioner: {path_line(raw)}: no such file or directory", file=sys.stderr)
    if args.shard:
        try:
            index, count = parse_shard(args.shard)
        except ValueError as exc:
            print(f"captioner: error: --shard: {shown(exc)}", file=sys.stderr)
            return 2
        paths = take_shard(paths, index, count)
    if not paths:
        print("captioner: no images found", file=sys.stderr)
        return 2
    clobbered = args.output and clobbered_input(args.output, paths, args.checkpoint, args.encoder_weights)
    if clobbered:
        print(f"captioner: error: {shown(clobbered)}", file=sys.stderr)
        return 2
    clash = written_clash(paths, args.format) if args.resume and args.format in TEXT_FORMATS else None
    if clash:
        names = " and ".join(repr(os.fspath(p)) for p in clash)  # repr: a byte 0xff is \udcff, the text \\xff
        advice = "use --format jsonl or csv" if args.format == "text" else "rename one of them"
        print(f"captioner: error: --resume: {names} are written the same in the {args.format} format, so a resume "
              f"cannot tell which one is done; {advice}", file=sys.stderr)
        return 2
    from captioner.api import Captioner

    if args.threads:  # before the load: the int8 encoder is built there, with the thread count of that moment
        import torch

        torch.set_num_threads(args.threads)
    captioner = Captioner.load(args.checkpoint, encoder_weights=args.encoder_weights, precision=args.precision)
    beam_size = args.beam_size or captioner.decode_defaults.beam_size
    if args.n_best > beam_size:
        print(f"captioner: error: --n-best {args.n_best} is above the beam size {beam_size} (--beam-size)",
              file=sys.stderr)
        return 2
    if args.tags:
        try:
            captioner.caption_iter([], return_tags=True)  # raises at the call when this model cannot tag
        except ValueError as exc:
            print(f"captioner: error: --tags: {shown(exc)}", file=sys.stderr)
            return 2
    if args.ray is not None:
        del captioner  # the actors load their own
        try:
            with caption_ray.cluster(args.ray or None):
                return _write(None, paths, missing, args, signal, threading, PartialOutput)
        except caption_ray.RayStartError as exc:
            print(f"captioner: error: {shown(exc)}", file=sys.stderr)
            return 2
    return _write(captioner, paths, missing, args, signal, threading, PartialOutput)


def _write(captioner, paths: list, missing: list[str], args: argparse.Namespace, signal, threading,
           PartialOutput) -> int:
    """Open the output, caption `paths` (locally with `captioner`, or on Ray when it is None), close the output."""
    from captioner.outputs import CaptionWriter, csv_header, written_path
    from captioner.parquet import ParquetCaptionWriter

    output = PartialOutput(args.output, args.format, resume=args.resume) if args.output else None
    if output is not None:
        done = output.open(csv_header(args.n_best, args.tags) if args.format == "csv" else None)
        paths = [p for p in paths if written_path(p, args.format) not in done]
        stream_out = output.stream
        header = not done and not output.has_header
    else:
        stream_out, header = sys.stdout, True
    total = len(paths)
    try:
        if args.format == "parquet":
            writer = ParquetCaptionWriter(stream_out, args.n_best, args.tags)
        else:
            writer = CaptionWriter(stream_out, args.format, args.n_best, header=header, tags=args.tags)
        if captioner is None:
            from captioner.cli.caption_ray import RayJobError

            try:
                failures, interrupted = _caption_all(None, paths, writer, args, signal, threading)
            except RayJobError as exc:
                writer.close()
                if output is not None:
                    output.close(keep=False)  # the whole records so far stay in the partial file, for --resume
                print(f"captioner: error: the Ray job failed: {shown(exc)}", file=sys.stderr)
                where = "" if output is None or output.direct else f" to {escape_path(output.partial)}" + (
                    "; --resume continues" if args.format != "parquet" else "")
                print(f"captioner: {writer.count} of {total} records written{where}", file=sys.stderr)
                return 5
        else:
            failures, interrupted = _caption_all(captioner, paths, writer, args, signal, threading)
        writer.close()
    except BaseException as exc:  # a second Ctrl-C keeps the whole records; an error leaves the target as it was
        if output is not None and output.stream is not None:
            if isinstance(exc, KeyboardInterrupt) and args.format == "parquet":
                with contextlib.suppress(Exception):  # best effort: the footer makes the records a readable file
                    writer.close()
            output.close(keep=isinstance(exc, KeyboardInterrupt))
        raise
    if output is not None:
        output.close(keep=True)
    if interrupted:
        print(f"\ncaptioner: interrupted; {writer.count} of {total} records written", file=sys.stderr)
        return 130
    if failures:
        print(f"captioner: {failures} of {total} images failed", file=sys.stderr)
    if missing:
        print(f"captioner: {len(missing)} given path(s) not found", file=sys.stderr)
    return 1 if failures or missing else 0


def _caption_all(captioner, paths: list, writer, args: argparse.Namespace, signal, threading
                 ) -> tuple[int, bool]:
    """Write every record; returns the number of failed images and whether Ctrl-C stopped it (one number for
    both made 130 failed images an interruption).

    `captioner` None: the records come from Ray (`caption_ray.records`), already in input order.
    """
    from tqdm import tqdm

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
        with tqdm(total=len(paths), unit="img", disable=not show_bar, file=sys.stderr, dynamic_ncols=True,
                  smoothing=0.1) as bar:
            if captioner is None:
                from captioner.cli.caption_ray import records

                stream = records(args, paths)
            else:
                extra = {"return_tags": True} if args.tags else {}
                stream = captioner.caption_iter(paths, beam_size=args.beam_size, n_best=args.n_best,
                                                batch_size=args.batch_size, max_length=args.max_length,
                                                on_error="skip", num_workers=args.num_workers, **extra)
            try:
                for item in stream:
                    if captioner is None:
                        writer.write_record(item)
                        error = item["error"]
                    else:
                        writer.write(item)
                        error = item.error
                    if error:
                        failures += 1
                        bar.write(f"captioner: failed: {path_line(error)}", file=sys.stderr)
                    bar.update(1)
                    if stop:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                stream.close()
                writer.flush()
                return failures, True
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return failures, False
