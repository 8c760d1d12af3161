"""Requests -> forward passes: concurrent requests collected for a short window and run in one pass.

A `Batcher` feeds one forward function (fill's logits at the masks, score's masked copies) from a bounded
queue: when it is full a request gets 503 at once, so memory cannot grow without bound. The model runs in a
worker thread, never on the event loop, one pass at a time (the batchers of one model share a lock).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Job:
    items: list  # what the forward pass takes, one per text
    finish: Callable[[list], Any]  # the job's outputs -> its answer (run in the worker thread)
    future: asyncio.Future


class Batcher:
    """Collects jobs for up to `window_s` (or `max_batch` texts) and runs them in one forward pass.

    Args:
        forward: items of every job of a batch -> one output per item, in order.
        lock: held around every forward pass; share it between the batchers of one model.
        on_batch: told the number of items of every forward pass.
    """

    def __init__(self, forward: Callable[[list], list], max_batch: int = 32, window_s: float = 0.005,
                 max_queue: int = 256, on_batch: Callable[[int], None] | None = None,
                 lock: threading.Lock | None = None):
        self.forward = forward
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.lock = lock or threading.Lock()  # one forward pass at a time, whatever calls it
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def submit(self, items: list, finish: Callable[[list], Any]) -> asyncio.Future:
        """Queue a job; raises asyncio.QueueFull when the bound is reached."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(items, finish, future))
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].items)
            deadline = loop.time() + self.window_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    break
                jobs.append(job)
                size += len(job.items)
            try:
                results = await loop.run_in_executor(None, self._run_batch, jobs)
                for job, result in zip(jobs, results):
                    if not job.future.done():
                        job.future.set_result(result)
            except Exception as e:  # a failure answers every job of the batch, never hangs them
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _run_batch(self, jobs: list[_Job]) -> list:
        items = [item for job in jobs for item in job.items]
        if self.on_batch:
            self.on_batch(len(items))
        with self.lock:
            outputs = self.forward(items)
        answers, i = [], 0
        for job in jobs:
            answers.append(job.finish(outputs[i : i + len(job.items)]))
            i += len(job.items)
        return answers

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (a request of several forward passes: a joint fill, a beam search over pieces) in the worker
        thread, between batches."""
        def locked():
            with self.lock:
                return fn()

        return await asyncio.get_running_loop().run_in_executor(None, locked)
