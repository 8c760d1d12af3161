"""Requests -> forward passes: concurrent fill requests collected for a short window and filled in one pass.

The `Batcher` feeds the model from a bounded queue (when it is full a request gets 503 at once, so
memory cannot grow without bound), and runs the model in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlmtune.fill import FillMask


@dataclass
class _Job:
    encoded: list  # token ids per text
    top_k: int
    target_ids: Any
    future: asyncio.Future


class Batcher:
    """Collects jobs for up to `window_s` (or `max_batch` texts) and fills them in one forward pass."""

    def __init__(self, filler: FillMask, max_batch: int = 32, window_s: float = 0.005, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        self.filler = filler
        self.on_batch = on_batch  # told the number of texts of every forward pass
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.lock = threading.Lock()  # one forward pass at a time, whatever calls it
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def submit(self, encoded: list, top_k: int, target_ids) -> asyncio.Future:
        """Queue a job; raises asyncio.QueueFull when the bound is reached."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(encoded, top_k, target_ids, future))
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].encoded)
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
                size += len(job.encoded)
            try:
                results = await loop.run_in_executor(None, self._fill, jobs)
                for job, result in zip(jobs, results):
                    if not job.future.done():
                        job.future.set_result(result)
            except Exception as e:  # a failure answers every job of the batch, never hangs them
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _fill(self, jobs: list[_Job]) -> list[list]:
        encoded = [ids for job in jobs for ids in job.encoded]
        if self.on_batch:
            self.on_batch(len(encoded))
        with self.lock:
            logits = self.filler.mask_logits(encoded)
        out, i = [], 0
        for job in jobs:
            part = []
            for ids in job.encoded:
                part.append(self.filler.predictions(ids, logits[i], job.top_k, job.target_ids))
                i += 1
            out.append(part)
        return out
