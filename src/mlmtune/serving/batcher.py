"""Requests -> forward passes: concurrent requests collected for a short window and run in one pass, and the long
requests (word fills) run pass by pass between them.

A `Batcher` feeds one forward function (fill's logits at the masks, score's masked copies) from a bounded
queue: when it is full a request gets 503 at once, so memory cannot grow without bound. The model runs in a
worker thread, never on the event loop, one pass at a time: the batchers of one model share a `TurnLock`, which
is taken in the order it was asked for, around each forward pass. A request of many passes (a word fill, a long
score) takes its turn for each pass, so a small fill that arrives meanwhile waits for one pass, not the whole
request; and before each pass its `Stop` is checked: past its deadline, or with its client gone, the request
ends there and frees the model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class TurnLock:
    """The model's lock, taken first come, first served (`threading.Lock` makes no such promise: a thread that
    releases it and asks again at once usually wins, and a long request would starve the batches)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0  # the ticket the next caller gets
        self._serving = 0  # the ticket that holds the lock

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Stopped(Exception):
    """A request stopped between two forward passes: its deadline passed, or its client left."""

    def __init__(self, message: str, client_left: bool):
        super().__init__(message)
        self.client_left = client_left


@dataclass
class Stop:
    """When a request stops: at `deadline` (time.monotonic()), or once its client has left (`left`, set by the
    event loop when the connection closes). Read by the worker thread before each forward pass."""

    timeout_s: float
    deadline: float = 0.0
    left: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.deadline = self.deadline or time.monotonic() + self.timeout_s

    def check(self) -> None:
        if self.left.is_set():
            raise Stopped("the client left before its answer was ready", client_left=True)
        if time.monotonic() > self.deadline:
            raise Stopped(f"the request ran longer than the server's limit of {self.timeout_s:g} s "
                          f"(--request-timeout): send fewer texts, targets or masks, or a smaller beam_size",
                          client_left=False)


class Turn:
    """`with turn:` around each forward pass of a request: its stop checked, then the model's lock taken in turn."""

    def __init__(self, lock: TurnLock, stop: Stop | None = None):
        self.lock, self.stop = lock, stop

    def __enter__(self):
        if self.stop is not None:
            self.stop.check()
        self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


@dataclass
class _Job:
    items: list  # what the forward pass takes, one per text
    finish: Callable[[list], Any]  # the job's outputs -> its answer (run in the worker thread)
    future: asyncio.Future
    stop: Stop | None


class Batcher:
    """Collects jobs for up to `window_s` (or `max_batch` texts) and runs them in one forward pass.

    Args:
        forward: items of every job of a batch, and a `Turn` to hold around each forward pass -> one output per
            item, in order.
        lock: taken around every forward pass; share it between the batchers of one model.
        on_batch: told the number of items of every forward pass.
    """

    def __init__(self, forward: Callable[[list, Turn], list], max_batch: int = 32, window_s: float = 0.005,
                 max_queue: int = 256, on_batch: Callable[[int], None] | None = None, lock: TurnLock | None = None):
        self.forward = forward
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.lock = lock or TurnLock()  # one forward pass at a time, whatever calls it
        self.task: asyncio.Task | None = None
        self.alone = 0  # requests of several passes admitted and not yet answered (waiting or running)
        self._alone_pool: ThreadPoolExecutor | None = None  # one at a time; their passes take turns with batches

    def depth(self) -> int:
        """Requests waiting for the model, or being run by it alone: what `max_queue` bounds."""
        return self.queue.qsize() + self.alone

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        if self._alone_pool:
            self._alone_pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, items: list, finish: Callable[[list], Any], stop: Stop | None = None) -> asyncio.Future:
        """Queue a job; raises asyncio.QueueFull when the bound is reached, counting the requests run alone."""
        if self.depth() >= self.queue.maxsize:
            raise asyncio.QueueFull
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(items, finish, future, stop))
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
                        if isinstance(result, Stopped):
                            job.future.set_exception(result)
                        else:
                            job.future.set_result(result)
            except Exception as e:  # a failure answers every job of the batch, never hangs them
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _run_batch(self, jobs: list[_Job]) -> list:
        answers: list = [None] * len(jobs)
        live = []
        for n, job in enumerate(jobs):  # a job whose client left, or whose time is up, never reaches the model
            try:
                if job.stop is not None:
                    job.stop.check()
                live.append(n)
            except Stopped as e:
                answers[n] = e
        items = [item for n in live for item in jobs[n].items]
        if not items:
            return answers
        if self.on_batch:
            self.on_batch(len(items))
        outputs = self.forward(items, Turn(self.lock))
        i = 0
        for n in live:
            answers[n] = jobs[n].finish(outputs[i : i + len(jobs[n].items)])
            i += len(jobs[n].items)
        return answers

    async def run_alone(self, fn: Callable[[Turn], Any], stop: Stop) -> Any:
        """Run `fn` (a request of several forward passes: a joint fill, a beam search over pieces, words scored
        whole) in a worker thread of its own, one such request at a time. `fn` holds the `Turn` it is given around
        each of its forward passes: batches go between them, and `stop` ends it before any pass. Counts against
        `max_queue` like a queued job (asyncio.QueueFull beyond it); raises `Stopped`."""
        if self.depth() >= self.queue.maxsize:
            raise asyncio.QueueFull
        if self._alone_pool is None:
            self._alone_pool = ThreadPoolExecutor(1, thread_name_prefix="mlmtune-words")
        turn = Turn(self.lock, stop)

        def run():
            stop.check()  # it may have waited behind another: do nothing for a client that is gone
            return fn(turn)

        self.alone += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._alone_pool, run)
        finally:
            self.alone -= 1
