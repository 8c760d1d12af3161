"""How many optimizer steps a run takes, and how long one takes on this machine.

`steps_for` is the trainer's own schedule arithmetic (`mlmtune check` reads it too). A time budget
(`--time-budget 3m`) turns into a step count once, at the start of a run: a short probe times a
few steps on a copy of the model, and the count is saved with the run's config, so `--resume`
continues the same schedule on any machine.
"""

from __future__ import annotations

import copy
import math
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlmtune.config import TrainConfig
from mlmtune.errors import MlmtuneError

# Share of a time budget given to the head-only phase when the head is new and no count is given.
# A head-only step costs about 40% of a full one; on the quickstart the head alone stops improving
# after some 30 steps (eval loss 10.4 -> 5.5), and the rest needs the encoder to train.
HEAD_SHARE = 0.15


def epoch_length(n_blocks: int, global_batch: int, accumulation: int) -> tuple[int, int]:
    """(micro-batches, optimizer steps) in one epoch of `n_blocks`; the last of each may be short."""
    micro = math.ceil(n_blocks / global_batch)
    return micro, math.ceil(micro / accumulation)


def steps_for(cfg: TrainConfig, n_train_blocks: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run on `world` processes."""
    _, per_epoch = epoch_length(n_train_blocks, cfg.batch_size * world, cfg.gradient_accumulation_steps)
    return per_epoch, cfg.max_steps or math.ceil(cfg.epochs * per_epoch)


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


def parse_duration(text: str) -> float:
    """'90s', '3m', '1h30m', '2.5m' or plain seconds -> seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", s).strip():
        raise MlmtuneError(f"--time-budget {text!r} is not a duration; write e.g. 90s, 3m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)


def timed_probe(cfg: TrainConfig, model, tokenizer, train_blocks, steps: int = 3, head_only: bool = False,
                device: torch.device | None = None) -> dict:
    """Seconds per optimizer step and peak memory, from a few real steps on a copy of the model.

    The first step pays for one-time allocations and is left out of the median.
    """
    from mlmtune.forward import MaskedLMLoss, backward_masked, freeze_encoder
    from mlmtune.masking import IGNORE_INDEX, Masker
    from mlmtune.model import resolve_device, resolve_precision

    device = device or resolve_device(cfg.device)
    probe = copy.deepcopy(model).to(device).train()
    freeze_encoder(probe, head_only)
    dtype = resolve_precision(cfg.precision, device)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  fused=True)
    masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability)
    generator = torch.Generator().manual_seed(cfg.seed)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batches = [masker(train_blocks[torch.randint(len(train_blocks), (min(cfg.batch_size, len(train_blocks)),),
                                                     generator=generator)], generator)
                   for _ in range(cfg.gradient_accumulation_steps)]
        n_masked = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
        backward_masked(MaskedLMLoss(probe), batches, n_masked, device, dtype, head_only=head_only)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_gb = (torch.cuda.max_memory_allocated() if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    del probe, optimizer
    warm = sorted(times[1:] or times)
    return {"step_seconds": warm[len(warm) // 2], "peak_memory_gb": round(peak_gb, 2)}


@dataclass(frozen=True)
class BudgetPlan:
    """The step counts a time budget allows, and the timings they came from."""

    max_steps: int
    head_warmup_steps: int
    full_step_seconds: float
    head_step_seconds: float | None
    probe_seconds: float

    def describe(self, budget: str) -> str:
        head = (f"{self.head_warmup_steps} head-only steps ({self.head_step_seconds:.2f}s each), then "
                if self.head_warmup_steps else "")
        return (f"--time-budget {budget}: {head}{self.max_steps - self.head_warmup_steps} full steps "
                f"({self.full_step_seconds:.2f}s each), measured in a {self.probe_seconds:.0f}s probe")


def plan_budget(cfg: TrainConfig, model, tokenizer, train_blocks, new_head: bool,
                device: torch.device | None = None, probe: Callable[[bool], float] | None = None) -> BudgetPlan:
    """Pick the step counts that fit `cfg.time_budget` (the probe's own time included).

    With a new head and no --head-warmup-steps, HEAD_SHARE of the time trains the head alone. An
    explicit --max-steps caps the total.

    Args:
        probe: seconds per optimizer step, full (False) or head-only (True), measured by the engine that
            will train (default: `timed_probe`, PyTorch's).
    """
    if probe is None:
        def probe(head_only: bool) -> float:
            return timed_probe(cfg, model, tokenizer, train_blocks, steps=3, head_only=head_only,
                               device=device)["step_seconds"]
    budget = parse_duration(cfg.time_budget)
    t0 = time.perf_counter()
    full = probe(False)
    asked = cfg.head_warmup_steps
    wants_head = new_head if asked is None else asked > 0
    head = None
    if wants_head:
        head = probe(True)
    probe_seconds = time.perf_counter() - t0
    left = max(budget - probe_seconds, 0.0)
    head_warmup = 0
    if wants_head:
        head_warmup = min(int(HEAD_SHARE * left / head) if asked is None else asked, int(left / head))
    full_steps = int((left - head_warmup * (head or 0)) / full)
    total = head_warmup + full_steps
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
        head_warmup = min(head_warmup, total)
    if total < 1:
        raise MlmtuneError(f"--time-budget {cfg.time_budget} does not fit one training step on this machine "
                           f"(a step takes {full:.1f}s after a {probe_seconds:.0f}s probe); give more time")
    return BudgetPlan(total, head_warmup, full, head, probe_seconds)
