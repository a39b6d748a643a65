"""The input streams of `Captioner.caption` and `caption_iter`: what counts as many images, names paired with
images, batches prepared ahead in threads, and an input that fails part-way.

Why a module of their own: these are rules about the caller's iterables (a generator, names that run out, an
iterator that raises), read and changed together, apart from the captioning they feed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def as_items(images: object) -> list:
    """The images of `caption(images)` as a list: any iterable but one image's own types (a path, bytes, a PIL
    image, a buffer, a file object, which iterates over its lines) holds images. Why: a generator, a deque or a
    dict's keys was taken as one image of an unsupported type.

    Raises:
        ValueError: a set: the captions come back in input order, and
            `names` are paired in it, so a set's arbitrary order would label images wrongly.
    """
    from PIL import Image

    single = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)
    array = hasattr(images, "__array__")  # a numpy array or tensor is one (refused) input, not rows of pixels
    if isinstance(images, single) or hasattr(images, "read") or array or not isinstance(images, Iterable):
        return [images]
    if isinstance(images, (set, frozenset)):
        raise ValueError(f"images is an unordered {type(images).__name__}: pass a list or another sequence, so that "
                         "the captions (and names) follow a known order")
    return list(images)


def until_error(items: Iterable, failure: list[Exception]) -> Iterator:
    """`items` until one raises; the error goes into `failure`, for the caller to raise once everything received
    before it is done. Why: the batch being filled, and with workers the batch decoded ahead, were dropped."""
    try:
        yield from items
    except Exception as exc:  # noqa: BLE001 - raised again by the caller, after the images before it
        failure.append(exc)


_NO_NAME = object()
"""What `next` returns from a names iterator that has run out (a name may be any string, even empty)."""


def named(images: Iterable, names: Iterable[str]) -> Iterator[tuple]:
    """(image, name) pairs, and a ValueError where one of the two runs out before the other. Why: `zip` stopped at
    the shorter, so five images with two names gave two captions and no error."""
    names = iter(names)
    count = 0
    for count, image in enumerate(images, 1):
        name = next(names, _NO_NAME)
        if name is _NO_NAME:
            raise ValueError(f"names ran out at image {count}: give one name per image")
        yield image, name
    if next(names, _NO_NAME) is not _NO_NAME:
        raise ValueError(f"more names than the {count} images: give one name per image")


def batches(items: Iterable, size: int) -> Iterator[list]:
    """`items` in lists of `size`, the last one shorter; consumed lazily, so a stream is never read ahead."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepared_batches(items: Iterable[T], prepare: Callable[[T], R], size: int, workers: int) -> Iterator[list[R]]:
    """`prepare` of each item, in lists of `size`. With `workers` threads the next batch is prepared while the
    caller works on the one just given (PIL releases the GIL while decoding); with 0, in the calling thread.

    `prepare` must not raise: one image's failure is a value, so that the others in its batch still come out.
    Closing the generator (the consumer stopped early) drops the batch queued ahead instead of finishing it.
    """
    if workers == 0:
        for batch in batches(items, size):
            yield [prepare(item) for item in batch]
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captioner-decode")
    try:
        pending = None
        for batch in batches(items, size):
            futures = [pool.submit(prepare, item) for item in batch]  # submitted before the current one is given
            if pending is not None:
                yield [f.result() for f in pending]
            pending = futures
        if pending is not None:
            yield [f.result() for f in pending]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
