"""`captioner.api_inputs.prepared_batches`: the decoding threads of `caption_iter`, apart from any model."""

from __future__ import annotations

import threading
import time

import pytest

from captioner.api_inputs import prepared_batches


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_come_out_whole_and_in_order_with_or_without_threads(workers):
    out = list(prepared_batches(iter(range(10)), lambda x: x * x, 4, workers))
    assert out == [[0, 1, 4, 9], [16, 25, 36, 49], [64, 81]]


def test_the_next_batch_is_prepared_while_the_caller_holds_the_current_one():
    prepared: list[int] = []
    done = threading.Event()

    def prepare(x: int) -> int:
        prepared.append(x)
        if x == 3:
            done.set()
        return x

    stream = prepared_batches(iter(range(6)), prepare, 2, 2)
    assert next(stream) == [0, 1]
    assert done.wait(5)  # batch [2, 3] was submitted before [0, 1] was handed over
    assert 4 not in prepared  # but nothing beyond it: at most two batches in memory
    stream.close()


def test_closing_early_ends_the_threads_and_drops_the_queued_work():
    started: list[int] = []

    def slow(x: int) -> int:
        started.append(x)
        time.sleep(0.05)
        return x

    before = {t.name for t in threading.enumerate()}
    stream = prepared_batches(iter(range(100)), slow, 10, 1)
    assert next(stream) == list(range(10))
    stream.close()
    assert len(started) < 20  # the batch queued ahead was cancelled (at most the one in hand), not decoded
    left = [t for t in threading.enumerate() if t.name.startswith("captioner-decode") and t.name not in before]
    assert not left
