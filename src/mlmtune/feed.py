"""Masked batches, made ahead: a thread reads, masks and pins step s+1's batches while step s runs.

Every batch is a function of (seed, step) alone (see `train.py`), so making it in another thread,
earlier, changes nothing in what a step sees: the masks are the same on every device and a resumed
run still sees exactly the batches of an uninterrupted one. On a GPU the copies come from pinned
memory, so they can overlap the compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

_DONE = object()


def pin(batch: Any) -> Any:
    """Page-locked copies of the tensors in a (nested) tuple/list, for asynchronous host-to-GPU copies."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, (list, tuple)):
        return type(batch)(pin(b) for b in batch)
    return batch


class Prefetcher:
    """Calls `make(step)` for steps first, first+1, ..., last-1 in order, `depth` steps ahead.

    Example:
        >>> feed = Prefetcher(lambda s: s * s, first=2, last=5)
        >>> [feed.get(s) for s in range(2, 5)]
        [4, 9, 16]
        >>> feed.close()
    """

    def __init__(self, make: Callable[[int], Any], first: int, last: int, depth: int = 2, pin_memory: bool = False):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(make, first, last, pin_memory), daemon=True,
                                       name="mlmtune-prefetch")
        self.thread.start()

    def _run(self, make, first: int, last: int, pin_memory: bool) -> None:
        for step in range(first, last):
            try:
                item = make(step)
                if pin_memory:
                    item = pin(item)
                result = (step, item, None)
            except Exception as e:  # raised in the training thread, at the step it belongs to
                result = (step, None, e)
            if not self._put(result) or result[2] is not None:
                return
        self._put((last, _DONE, None))

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> Any:
        """The batches of `step` (steps must be asked for in order)."""
        got, item, error = self.queue.get()
        if error is not None:
            raise error
        if got != step or item is _DONE:
            raise RuntimeError(f"prefetcher out of order: asked for step {step}, had step {got}")
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
