"""Deterministic sharding of an input list, so N machines caption disjoint parts of one collection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; raises ValueError otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def take_shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """The index-th of `count` contiguous, near-equal slices of `items` (which the caller sorts).

    Contiguous slices keep each shard's output in input order, so concatenating shard 0..N-1 gives the full run.
    """
    start = len(items) * index // count
    stop = len(items) * (index + 1) // count
    return list(items[start:stop])
