"""`captioner caption --ray [ADDRESS]`: the same records as the local run, captioned by a pool of Ray actors.

The driver (this process) finds the images exactly as the local run does (`caption._expand`, then `--shard` and
`--resume` filtering), sends their paths to Ray Data (`ray.data.from_items`: one row per image with its input index,
its name as given, and its absolute path), and `captioner.integrations.ray_data.CaptionBatch` actors, `--ray-actors`
of them, each with one model, read and caption the images. The records come back to the driver, are put back in
input order, and are written by the same `CaptionWriter` / `ParquetCaptionWriter` as the local run, so every
`--format` gives the same output as without `--ray`. Images must be readable at the same absolute path on every node.

Without ADDRESS, `ray.init()` starts a local Ray (or attaches to the one `RAY_ADDRESS` names); with one, it
connects to that cluster (`ray.init(address=ADDRESS)`). A Ray already initialised in this process is used as it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from captioner.models.shipped import SHIPPED


class RayJobError(RuntimeError):
    """The Ray job failed after it started (an actor died, a node was lost); the records so far are kept."""


class RayStartError(RuntimeError):
    """Ray could not be started here, or the cluster at the address given could not be reached (exit 2)."""


def check(args: argparse.Namespace) -> str | None:
    """Why `--ray` cannot run (one line), or None: Ray missing, or an ADDRESS that is really one of the paths."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        return "--ray needs Ray Data and pyarrow: pip install -e '.[ray]' (or pip install 'ray[data]' pyarrow)"
    if args.ray and os.path.exists(args.ray):
        return (f"--ray {args.ray}: that is a file or folder, not a cluster address; write --ray after the paths "
                f"(captioner caption DIR --ray [HOST:PORT])")
    return None


@contextmanager
def cluster(address: str | None) -> Iterator[None]:
    """Ray for the length of the run: started (or connected) here and shut down after, unless already running.

    Raises:
        RayStartError: the cluster cannot be started or reached (one line).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        _probe(address)
    kwargs = {"address": address} if address else {"include_dashboard": False}
    try:
        ray.init(logging_level=logging.WARNING, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError... depending on what is wrong
        where = f"at {address}" if address else "on this machine"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if address and "RAY_AUTH_MODE" not in os.environ:
            hint = " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token: docs/scaling.md)"
        raise RayStartError(f"--ray: cannot start or reach a Ray cluster {where}: {first}{hint}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _probe(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT that nothing listens on fails here at once: `ray.init` would retry it for minutes."""
    import re
    import socket

    match = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d+)", address)
    if match is None:  # "auto", "ray://...": left to Ray
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout).close()
    except OSError as exc:
        raise RayStartError(f"--ray: cannot reach a Ray cluster at {address}: {exc}") from exc


def records(args: argparse.Namespace, paths: list) -> Iterator[dict]:
    """The record of every path (as `outputs.record(caption, args.n_best)` gives it), in the order of `paths`.

    Raises:
        RayJobError: the job failed once started; what was yielded before stays valid.
    """
    import ray
    import ray.exceptions

    from captioner.integrations.ray_data import caption_dataset, to_record

    if not paths:  # all done already (--resume)
        return
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # rows come back in input order: the reorder buffer stays empty
    ctx.enable_progress_bars = False  # the CLI shows its own bar
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no "execution finished" lines
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    try:
        items = [{"index": i, "path": os.fsencode(p), "file": os.fsencode(os.path.abspath(p))}
                 for i, p in enumerate(paths)]
        ds = ray.data.from_items(items)
        # A shipped model's name travels as it is (every node has the package); a path becomes absolute.
        checkpoint = (args.checkpoint if args.checkpoint is None or args.checkpoint in SHIPPED
                      else os.path.abspath(args.checkpoint))
        out = caption_dataset(ds, actors=args.ray_actors or 1, batch_size=args.batch_size, threads=args.threads,
                              checkpoint=checkpoint, precision=args.precision, beam_size=args.beam_size,
                              n_best=args.n_best, return_tags=args.tags, max_length=args.max_length,
                              num_workers=args.num_workers,
                              encoder_weights=args.encoder_weights and os.path.abspath(args.encoder_weights))
        pending: dict[int, dict] = {}
        next_index = 0
        try:
            for table in out.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in table.to_pylist():
                    pending[row["index"]] = to_record(row, args.n_best)
                    while next_index in pending:
                        yield pending.pop(next_index)
                        next_index += 1
        except ray.exceptions.RayError as exc:
            raise RayJobError(_one_line(exc)) from exc
        if next_index != len(paths):
            raise RayJobError(f"Ray returned {next_index + len(pending)} of {len(paths)} records")
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _one_line(exc: BaseException) -> str:
    """The line of a Ray error that states its cause ("RuntimeError: ..."), without the remote traceback.

    Why not the last line: Ray 2.60 ends its task errors with advice on retries ("To change retry attempts,
    ..."), which was all the user was told. The cause is the last line that reads `SomethingError: ...`, or
    Ray's own `cause` where it keeps one; the last non-empty line otherwise."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, type(exc)):
        return f"{type(cause).__name__}: {_one_line(cause)}" if str(cause).strip() else type(cause).__name__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    stated = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    return (stated or lines or [type(exc).__name__])[-1]
