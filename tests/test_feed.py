"""The prefetcher: batches arrive in step order, errors at the step that raised them, and no thread
outlives the loop."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mlmtune.feed import Prefetcher


def test_steps_arrive_in_order_and_ahead():
    made = []

    def make(step):
        made.append(step)
        return torch.full((2,), step)

    feed = Prefetcher(make, first=3, last=9, depth=2)
    try:
        deadline = time.monotonic() + 10
        while len(made) < 3 and time.monotonic() < deadline:  # depth 2 queued, a third in hand
            time.sleep(0.01)
        assert made[:3] == [3, 4, 5]
        assert [int(feed.get(s)[0]) for s in range(3, 9)] == list(range(3, 9))
    finally:
        feed.close()
    assert not feed.thread.is_alive()


def test_an_error_is_raised_at_its_own_step():
    def make(step):
        if step == 2:
            raise ValueError("record 17 is not JSON")
        return step

    feed = Prefetcher(make, first=0, last=5)
    try:
        assert feed.get(0) == 0 and feed.get(1) == 1
        with pytest.raises(ValueError, match="record 17"):
            feed.get(2)
    finally:
        feed.close()


def test_close_stops_a_thread_blocked_on_a_full_queue():
    feed = Prefetcher(lambda s: s, first=0, last=10_000, depth=1)
    feed.get(0)
    feed.close()
    assert not feed.thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "mlmtune-prefetch"]
