"""How many optimizer steps a run takes, and the learning rate of each.

`steps_for` is the trainer's own schedule arithmetic (`mlmtune check` reads it too); `learning_rate_at`
is the one learning-rate schedule every engine follows: a constant rate for a new head's warm-up, then
transformers' linear warm-up and decay for the whole model.
"""

from __future__ import annotations

import math

from mlmtune.config import TrainConfig


def epoch_length(n_blocks: int, global_batch: int, accumulation: int) -> tuple[int, int]:
    """(micro-batches, optimizer steps) in one epoch of `n_blocks`; the last of each may be short."""
    micro = math.ceil(n_blocks / global_batch)
    return micro, math.ceil(micro / accumulation)


def steps_for(cfg: TrainConfig, n_train_blocks: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run on `world` processes."""
    s = cfg.schedule
    _, per_epoch = epoch_length(n_train_blocks, s.batch_size * world, s.gradient_accumulation_steps)
    return per_epoch, s.max_steps or math.ceil(s.epochs * per_epoch)


def step_plan(cfg: TrainConfig, n_train_blocks: int | None, world: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, steps between checkpoints). A stream (`n_train_blocks` None) has no
    epochs: its "epochs" are the evaluation and checkpoint intervals."""
    if n_train_blocks is None:
        total_steps = cfg.schedule.max_steps
        steps_per_epoch = cfg.output.save_steps or max(1, total_steps // 10)
    else:
        steps_per_epoch, total_steps = steps_for(cfg, n_train_blocks, world)
    return steps_per_epoch, total_steps, cfg.output.save_steps or steps_per_epoch


def lr_factor(step: int, total: int, warmup: int, head_steps: int = 0, head_factor: float = 1.0) -> float:
    """The learning rate of optimizer step `step` as a multiple of --learning-rate.

    Without a head warm-up this is transformers' `get_linear_schedule_with_warmup`: linear warmup over
    `warmup` steps, then linear decay to 0 at `total`. With one, the first `head_steps` run at
    `head_factor` times the rate (a new head alone learns fast), and the whole model then gets the
    warmup-and-decay schedule over the steps that are left.
    """
    if step < head_steps:
        return head_factor
    step, total = step - head_steps, total - head_steps
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def learning_rate_at(cfg: TrainConfig, total_steps: int, step: int) -> float:
    """The learning rate of optimizer step `step` (counted from 0) of a run of `total_steps`."""
    o = cfg.optim
    head_factor = (o.head_learning_rate or o.learning_rate) / o.learning_rate
    return o.learning_rate * lr_factor(step, total_steps, o.warmup_steps, o.head_warmup_steps or 0, head_factor)
