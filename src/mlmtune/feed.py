"""Blocks -> each optimizer step's masked batches, made ahead of the loop.

`StepBatches` says what step s trains on: the order of blocks in epoch e comes from a generator
seeded with (seed, e), and the masks of step s from one seeded with (seed, s), so a resumed run
sees exactly the batches of an uninterrupted one. Because a batch is a function of (seed, step)
alone, `Prefetcher` can make it in another thread, earlier: it reads, masks and pins step s+1's
batches while step s runs, and nothing in what a step sees changes. On a GPU the copies then
come from pinned memory and can overlap the compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from mlmtune.config import TrainConfig
from mlmtune.distributed import Dist
from mlmtune.masking import IGNORE_INDEX, SEED_MIX, Masker, block_rows
from mlmtune.schedule import epoch_length
from mlmtune.stream import BlockStream

_DONE = object()

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), each (B, T)


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * SEED_MIX + epoch))


class StepBatches:
    """Optimizer step -> this rank's masked micro-batches.

    Masks are drawn over the whole global micro-batch from (seed, step) and then cut into shares, so
    N ranks train on exactly the masks one process would draw, and every rank knows the global count
    of masked tokens (the loss's denominator) without asking. A rank whose share of an epoch's last
    micro-batch is empty gets one block with no labels instead: DDP needs every rank to run the same
    forward and backward passes.
    """

    def __init__(self, blocks, stream, masker: Masker, seed: int, batch_size: int, accumulation: int,
                 rank: int = 0, world: int = 1):
        self.blocks, self.stream, self.masker, self.seed = blocks, stream, masker, seed
        self.batch_size, self.accumulation, self.rank = batch_size, accumulation, rank
        self.global_batch = batch_size * world  # blocks per micro-batch over all ranks
        self.micro_per_epoch = self.steps_per_epoch = None  # a stream has no epochs
        if blocks is not None:  # the trainer's own epoch arithmetic, so both count the same steps
            self.micro_per_epoch, self.steps_per_epoch = epoch_length(len(blocks), self.global_batch, accumulation)

    @classmethod
    def for_run(cls, cfg: TrainConfig, blocks, tokenizer, masker: Masker, first_step: int, d: Dist,
                progress: bool = True) -> StepBatches:
        """A run's steps from `first_step` on: from its blocks, or (blocks None: --streaming) from a stream
        fast-forwarded to that step."""
        stream = None
        if blocks is None:
            stream = BlockStream(cfg.data, tokenizer, cfg.seed, cfg.batch_size * d.world).batches(
                start=first_step * cfg.gradient_accumulation_steps, progress=progress)
        return cls(blocks, stream, masker, cfg.seed, cfg.batch_size, cfg.gradient_accumulation_steps, d.rank, d.world)

    def blocks_of(self, step: int, words: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The step's global micro-batches before masking: (ids, word starts) each, (B, T). A stream is read on."""
        if self.stream is not None:
            return [next(self.stream) for _ in range(self.accumulation)]
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.blocks), self.seed, epoch)
        first = in_epoch * self.accumulation
        return [block_rows(self.blocks, order[i * self.global_batch : (i + 1) * self.global_batch],
                           words or self.masker.needs_words)
                for i in range(first, min(first + self.accumulation, self.micro_per_epoch))]

    def mask(self, step: int, micro: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[Batch]:
        """The step's masks over its global micro-batches, drawn from (seed, step)."""
        mask_gen = torch.Generator().manual_seed(self.seed * SEED_MIX + step + 1)
        return [self.masker(ids, mask_gen, starts) for ids, starts in micro]

    def __call__(self, step: int) -> tuple[list[Batch], int, int, int]:
        """(this rank's (inputs, labels) per micro-batch, the step's global blocks, its global masked
        tokens, this rank's blocks)."""
        micro = self.blocks_of(step)
        masked = self.mask(step, micro)
        n_masked = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in masked)  # on the CPU: no sync
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        mine = [(inputs[share], labels[share]) for inputs, labels in masked]
        my_blocks = sum(len(inputs) for inputs, _ in mine)
        mine = [(inputs, labels) if len(inputs) else (b[0][:1], torch.full_like(b[1][:1], IGNORE_INDEX))
                for (inputs, labels), b in zip(mine, masked)]
        return mine, sum(len(ids) for ids, _ in micro), n_masked, my_blocks


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
