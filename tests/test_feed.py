"""The prefetcher: batches arrive in step order, errors at the step that raised them, and no thread
outlives the loop. The steps' masks: the same on 1, 2 and 4 ranks, and the guide's 15% and 80/10/10."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mlmtune.data.masking import IGNORE_INDEX, Masker
from mlmtune.training.feed import Prefetcher, StepBatches


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


@pytest.mark.parametrize("scheme", ["token", "whole-word", "span"])
def test_1_2_and_4_ranks_see_the_same_masks_for_the_same_step(scheme):
    """The global batch of 16 blocks a step, split 16 x 1, 8 x 2 or 4 x 4 (blocks per rank x ranks), and 8 x 1
    with twice the accumulation: every block gets the same masks, whichever rank reads it."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (100, 24), generator=g)
    ids[:, 0] = 0
    starts = (torch.rand(ids.shape, generator=g) < 0.6).long()
    blocks = _Blocks(ids, starts)
    masker = Masker(mask_token_id=4, vocab_size=500, special_ids=torch.tensor([0, 1, 2, 3, 4]), scheme=scheme)

    for step in (0, 5, 6):  # 7 steps an epoch: step 6 is the epoch's short last one (4 blocks), step 5 a full one
        (whole, *_), = [StepBatches(blocks, None, masker, 7, 16, 1)(step)]
        inputs, labels = whole[0][0], whole[0][1]  # one process, one micro-batch: the step's blocks in order
        for batch, world, accumulation in ((8, 2, 1), (4, 4, 1), (8, 1, 2), (2, 4, 2)):
            parts = [StepBatches(blocks, None, masker, 7, batch, accumulation, r, world)(step) for r in range(world)]
            assert sum(p[2] for p in parts) == int((labels != IGNORE_INDEX).sum())  # the counts add up
            for m in range(len(parts[0][0])):
                for r, part in enumerate(parts):
                    start = (m * world + r) * batch
                    got_inputs, got_labels = part[0][m][0], part[0][m][1]
                    if start >= len(inputs):  # an empty share: one stand-in block with nothing to predict
                        assert len(got_inputs) == 1 and (got_labels == IGNORE_INDEX).all()
                        continue
                    assert torch.equal(got_inputs, inputs[start : start + batch]), (batch, world, accumulation)
                    assert torch.equal(got_labels, labels[start : start + batch])


def test_the_steps_masks_keep_the_guides_rates():
    """Over many steps: 15% of the non-special tokens chosen; of those, 80% masked, 10% random, 10% kept."""
    ids = torch.randint(5, 30_000, (4000, 64), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    masker = Masker(mask_token_id=4, vocab_size=30_000, special_ids=torch.tensor([0, 1, 2, 3, 4]))
    steps = StepBatches(_Blocks(ids, None), None, masker, 3, 50, 2, rank=1, world=4)
    chosen = masked = kept = total = 0
    for step in range(10):
        for inputs, labels, positions, targets in steps(step)[0]:
            pick = labels != IGNORE_INDEX
            assert torch.equal(positions, torch.nonzero(pick.reshape(-1)).squeeze(1))
            assert torch.equal(targets, labels.reshape(-1)[positions])
            total += int((inputs[:, 1:] != -1).sum())
            chosen += int(pick.sum())
            masked += int((inputs[pick] == 4).sum())
            kept += int((inputs[pick] == labels[pick]).sum())
    assert chosen / total == pytest.approx(0.15, abs=0.003)
    assert masked / chosen == pytest.approx(0.8, abs=0.01)
    assert kept / chosen == pytest.approx(0.1, abs=0.01)


class _Blocks:
    """What StepBatches reads: (N, T) ids and word starts by rows."""

    def __init__(self, ids: torch.Tensor, starts: torch.Tensor | None):
        self.ids, self.starts = ids, starts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.ids[rows]

    def word_starts(self, rows) -> torch.Tensor:
        return self.starts[rows]
