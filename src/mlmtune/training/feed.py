"""Blocks -> each optimizer step's masked batches, made ahead of the loop.

`StepBatches` says what step s trains on: the order of blocks in epoch e comes from a generator
seeded with (seed, e), and each block's masks from one seeded with (seed, e, the block's row) (in a
stream, (seed, the block's place in it)). So a resumed run sees exactly the batches of an uninterrupted
one, and the masks do not depend on how the step's blocks are split into micro-batches or over
processes: 1, 2 or 16 ranks with the same global batch train on the same masked blocks, and a run may
resume on another number of processes. Each rank reads and masks only its own share. Because a batch
is a function of (seed, step) alone, `Prefetcher` can make it in another thread, earlier: it reads,
masks, finds the positions to predict and pins step s+1's batches while step s runs, and nothing in what
a step sees changes. On a GPU the copies then come from pinned memory and overlap the compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from mlmtune.config import TrainConfig
from mlmtune.data.masking import IGNORE_INDEX, SEED_MIX, Masker, block_rows
from mlmtune.data.stream import BlockStream
from mlmtune.distributed import Dist
from mlmtune.model.forward import positions_and_targets
from mlmtune.training.schedule import epoch_length

_DONE = object()

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), each (B, T)


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * SEED_MIX + epoch))


def mask_key(seed: int, epoch: int, row: int) -> int:
    """The seed of one block's masks: (seed, epoch, row), spread apart and kept below 2**63."""
    return ((seed * SEED_MIX + epoch) * _ROW_MIX + row) % (1 << 63)


_ROW_MIX = 2_654_435_761


class StepBatches:
    """Optimizer step -> this rank's masked micro-batches.

    Each global micro-batch of `batch_size * world` blocks is cut into the ranks' shares; a rank reads and
    masks its own blocks, each with its own generator (`mask_key`), so the masks are those one process with
    the same global batch would draw. A rank whose share of an epoch's last micro-batch is empty gets one
    block with no labels instead: DDP needs every rank to run the same forward and backward passes. The
    masked tokens are counted per rank; the engine sums them over the ranks on the device.
    """

    def __init__(self, blocks, stream, masker: Masker, seed: int, batch_size: int, accumulation: int,
                 rank: int = 0, world: int = 1):
        self.blocks, self.stream, self.masker, self.seed = blocks, stream, masker, seed
        self.batch_size, self.accumulation, self.rank = batch_size, accumulation, rank
        self.global_batch = batch_size * world  # blocks per micro-batch over all ranks
        self.micro_per_epoch = self.steps_per_epoch = None  # a stream has no epochs
        self.stream_micro = 0  # global micro-batches read from the stream so far (its blocks' places)
        self.order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its order of blocks)
        if blocks is not None:  # the trainer's own epoch arithmetic, so both count the same steps
            self.micro_per_epoch, self.steps_per_epoch = epoch_length(len(blocks), self.global_batch, accumulation)

    @classmethod
    def for_run(cls, cfg: TrainConfig, blocks, tokenizer, masker: Masker, first_step: int, d: Dist,
                progress: bool = True) -> StepBatches:
        """A run's steps from `first_step` on: from its blocks, or (blocks None: --streaming) from a stream
        fast-forwarded to that step."""
        stream, s = None, cfg.schedule
        if blocks is None:
            stream = BlockStream(cfg.data, tokenizer, cfg.seed, s.batch_size, rank=d.rank, world=d.world).batches(
                start=first_step * s.gradient_accumulation_steps, progress=progress)
        made = cls(blocks, stream, masker, cfg.seed, s.batch_size, s.gradient_accumulation_steps, d.rank, d.world)
        made.stream_micro = first_step * s.gradient_accumulation_steps
        return made

    def blocks_of(self, step: int, words: bool = False, share: bool = True) -> list[tuple[torch.Tensor, Any, list]]:
        """The step's micro-batches before masking, this rank's share of each (all of it with share=False, for blocks
        in memory): (ids, word starts or None, each block's mask key). A stream is read on (its share only)."""
        words = words or self.masker.needs_words
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size) if share else slice(None)
        out = []
        if self.stream is not None:  # this rank's share already: each rank reads and tokenizes its own records
            for _ in range(self.accumulation):
                ids, starts = next(self.stream)
                first = self.stream_micro * self.global_batch + self.rank * self.batch_size  # this share's place
                keys = [mask_key(self.seed, 0, first + j) for j in range(len(ids))]
                out.append((ids, starts, keys))
                self.stream_micro += 1
            return out
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if self.order[0] != epoch:  # drawn once per epoch, not at every step
            self.order = (epoch, epoch_order(len(self.blocks), self.seed, epoch))
        order = self.order[1]
        first = in_epoch * self.accumulation
        for i in range(first, min(first + self.accumulation, self.micro_per_epoch)):
            rows = order[i * self.global_batch : (i + 1) * self.global_batch][mine]
            if len(rows) == 0:  # an empty share: one block of the micro-batch, to be given no labels
                rows = order[i * self.global_batch : i * self.global_batch + 1]
                ids, starts = block_rows(self.blocks, rows, words)
                out.append((ids, starts, None))
                continue
            ids, starts = block_rows(self.blocks, rows, words)
            out.append((ids, starts, [mask_key(self.seed, epoch, int(r)) for r in rows]))
        return out

    def mask(self, micro: list[tuple[torch.Tensor, Any, list]]) -> list[Batch]:
        """Each block masked with its own generator; an empty share's stand-in gets no labels."""
        out = []
        for ids, starts, keys in micro:
            if keys is None:
                out.append((ids.long(), torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)))
            else:
                out.append(self.masker.mask_rows(ids, keys, starts))
        return out

    def __call__(self, step: int) -> tuple[list[tuple[torch.Tensor, ...]], int, int, int]:
        """(this rank's (inputs, labels, positions, targets) per micro-batch, the step's global blocks, this
        rank's masked tokens, this rank's blocks)."""
        micro = self.blocks_of(step)
        masked = self.mask(micro)
        n_masked = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in masked)  # on the CPU: no sync
        my_blocks = sum(len(ids) for ids, _, keys in micro if keys is not None)
        if self.stream is not None:
            global_blocks = self.global_batch * self.accumulation
        else:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            first = in_epoch * self.accumulation * self.global_batch
            global_blocks = min(self.accumulation * self.global_batch, len(self.blocks) - first)
        return [(inputs, labels, *positions_and_targets(labels)) for inputs, labels in masked], global_blocks, \
            n_masked, my_blocks


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
