"""Step counts that are measured, not given: `--time-budget` and the automatic head warm-up.

A time budget (`--time-budget 3m`) turns into a step count at the start of a run: a short
probe times a few steps on a copy of the model (each engine brings its own probe), and the count
is saved with the run's config, so `--resume` continues the same schedule on any machine.

The probe times one device without communication. On several processes the count is made again
once, after the first REPLAN_WARM + REPLAN_STEPS steps of the run: from the measured seconds per
step of the slowest rank (all-reduce MAX), gradient all-reduce and stragglers included (`replan`).
The new count goes into the config that checkpoints carry, so a run resumed from a checkpoint made
after the re-plan keeps its total steps and learning-rate schedule exactly; one resumed from before
it measures again at the same point.
"""

from __future__ import annotations

import copy
import dataclasses
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mlmtune import distributed
from mlmtune.config import TrainConfig
from mlmtune.config_groups import parse_duration
from mlmtune.data.masking import IGNORE_INDEX, Masker
from mlmtune.device import resolve_device, resolve_precision, tf32_matmuls
from mlmtune.errors import MlmtuneError, say
from mlmtune.model.forward import MaskedLMLoss, backward_masked, freeze_encoder
from mlmtune.model.load import has_new_head
from mlmtune.training import resume
from mlmtune.training.schedule import steps_for

# Share of a time budget given to the head-only phase when the head is new and no count is given.
# A head-only step costs about 40% of a full one; on the quickstart the head alone stops improving
# after some 30 steps (eval loss 10.4 -> 5.5), and the rest needs the encoder to train.
HEAD_SHARE = 0.15
AUTO_HEAD_SHARE = 0.1  # of a run's steps that train a new head alone, when no count or budget is given
DEFAULT_HEAD_LR = 1e-3  # Adam's usual rate for fitting a linear probe, whatever --learning-rate the encoder gets

Probe = Callable[[bool], float]  # seconds per optimizer step, full (False) or head-only (True)

# On several processes: after this many steps of a run (which pay one-time costs), the next REPLAN_STEPS are timed
REPLAN_WARM = 2
REPLAN_STEPS = 3


def timed_probe(cfg: TrainConfig, model, tokenizer, train_blocks, steps: int = 3, head_only: bool = False,
                device: torch.device | None = None) -> dict:
    """Seconds per optimizer step and peak memory, from a few real PyTorch steps on a copy of the model.

    The first steps pay one-time costs and are left out (`warm_median`).
    """
    device = device or resolve_device(cfg.compute.device)
    probe = copy.deepcopy(model).to(device).train()
    freeze_encoder(probe, head_only, cfg.optim.freeze_layers)
    dtype = resolve_precision(cfg.compute.precision, device)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=cfg.optim.learning_rate,
                                  fused=True)
    masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability)
    generator = torch.Generator().manual_seed(cfg.seed)
    times, s = [], cfg.schedule
    for _ in range(steps):
        t0 = time.perf_counter()
        batches = [masker(train_blocks[torch.randint(len(train_blocks), (min(s.batch_size, len(train_blocks)),),
                                                     generator=generator)], generator)
                   for _ in range(s.gradient_accumulation_steps)]
        n_masked = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
        with tf32_matmuls(device):  # as the training steps run
            backward_masked(MaskedLMLoss(probe), batches, n_masked, device, dtype, head_only=head_only)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_gb = (torch.cuda.max_memory_allocated() if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    del probe, optimizer
    return {"step_seconds": warm_median(times), "peak_memory_gb": round(peak_gb, 2)}


def warm_median(times: list[float]) -> float:
    """Seconds per step from timed steps, in every engine's probe: the median of those after the first two (the
    first alone when fewer than four were timed), which pay one-time costs (kernel choice, allocator growth, a
    graph's tracing) and would plan too few steps."""
    warm = sorted(times[2:] if len(times) > 3 else times[1:] or times)
    return warm[len(warm) // 2]


def torch_probe(cfg: TrainConfig, model, tokenizer, train_blocks, device: torch.device | None = None) -> Probe:
    """PyTorch's probe: the median seconds of three timed steps, after two that pay one-time costs (kernel choice,
    allocator growth) and would plan too few steps."""
    def probe(head_only: bool) -> float:
        return timed_probe(cfg, model, tokenizer, train_blocks, steps=5, head_only=head_only,
                           device=device)["step_seconds"]

    return probe


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


def plan_budget(cfg: TrainConfig, new_head: bool, probe: Probe) -> BudgetPlan:
    """Pick the step counts that fit `cfg.schedule.time_budget` (the probe's own time included).

    With a new head and no --head-warmup-steps, HEAD_SHARE of the time trains the head alone. An
    explicit --max-steps caps the total.

    Args:
        probe: seconds per optimizer step, full or head-only, measured by the engine that will train.
    """
    budget = parse_duration(cfg.schedule.time_budget)
    t0 = time.perf_counter()
    full = probe(False)
    asked = cfg.optim.head_warmup_steps
    wants_head = new_head if asked is None else asked > 0
    head = probe(True) if wants_head else None
    probe_seconds = time.perf_counter() - t0
    left = max(budget - probe_seconds, 0.0)
    head_warmup = 0
    if wants_head:
        head_warmup = min(int(HEAD_SHARE * left / head) if asked is None else asked, int(left / head))
    full_steps = int((left - head_warmup * (head or 0)) / full)
    total = head_warmup + full_steps
    if cfg.schedule.max_steps:
        total = min(total, cfg.schedule.max_steps)
        head_warmup = min(head_warmup, total)
    if total < 1:
        raise MlmtuneError(f"--time-budget {cfg.schedule.time_budget} does not fit one training step on this machine "
                           f"(a step takes {full:.1f}s after a {probe_seconds:.0f}s probe); give more time")
    return BudgetPlan(total, head_warmup, full, head, probe_seconds)


def resolve_steps(cfg: TrainConfig, d: distributed.Dist, model, n_train_blocks: int | None, device: torch.device,
                  probe: Callable[[], Probe]) -> tuple[TrainConfig, dict | None]:
    """Turn --time-budget, an automatic --head-warmup-steps and its learning rate into numbers, once per run.

    A resumed run takes the counts its checkpoints were made with; a new one measures (rank 0 probes,
    every rank gets its numbers). The returned config is the one saved with the run.

    Args:
        n_train_blocks: the training split's blocks (None for a stream).
        probe: makes the engine's probe (only called when there is a budget to plan).

    Returns:
        The config, and for a budget planned now what `replan` needs (the budget, the probe's seconds, the cap
        --max-steps set), which the run's state keeps; None otherwise.
    """
    new_head = has_new_head(model)
    head = cfg.optim.head_warmup_steps
    max_steps = cfg.schedule.max_steps
    record = None
    resuming = cfg.output.resume and cfg.schedule.time_budget is not None
    saved = resume.newest_config(Path(cfg.output.output_dir)) if resuming else None
    if saved is not None and saved.get("time_budget") == cfg.schedule.time_budget:
        max_steps, head = saved["max_steps"], saved["head_warmup_steps"]
    elif cfg.schedule.time_budget is not None:
        counts = [0, 0, 0.0, 0.0]
        if d.main:
            plan = plan_budget(cfg, new_head, probe())
            say(plan.describe(cfg.schedule.time_budget))
            counts = [plan.max_steps, plan.head_warmup_steps, plan.probe_seconds, plan.full_step_seconds]
        planned, head, probe_seconds, step_seconds = distributed.all_reduce_sum(d, counts, device)
        max_steps, head = int(planned), int(head)
        record = {"seconds": parse_duration(cfg.schedule.time_budget), "probe_seconds": probe_seconds,
                  "cap": cfg.schedule.max_steps, "planned_steps": max_steps, "step_seconds": step_seconds,
                  "replanned_at": None}
    elif head is None:
        total = cfg.schedule.max_steps if n_train_blocks is None else steps_for(cfg, n_train_blocks, d.world)[1]
        head = round(AUTO_HEAD_SHARE * total) if new_head else 0
        if head:
            say(f"The model has no masked-LM head: the first {head} of {total} steps train the new head alone "
                f"(--head-warmup-steps sets this)")
    head_lr = (cfg.optim.head_learning_rate or DEFAULT_HEAD_LR) if head else None  # unused without a warm-up
    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, max_steps=max_steps),
                               optim=dataclasses.replace(cfg.optim, head_warmup_steps=head,
                                                         head_learning_rate=head_lr)), record


class Replanner:
    """--time-budget on several ranks: times this process's full steps REPLAN_WARM + 1 to REPLAN_WARM +
    REPLAN_STEPS (after a sync at each end) and, once, turns the slowest rank's time into a new total (`replan`).
    Nothing to do on one process, without a budget, or when the run's plan was made again already."""

    def __init__(self, record: dict | None, d: distributed.Dist, sync: Callable[[], None], device: torch.device):
        self.record = record if d.enabled and record and record.get("replanned_at") is None else None
        self.d, self.sync, self.device = d, sync, device
        self.full_steps, self.clock = 0, 0.0

    def after_full_step(self, step: int, spent: Callable[[], float], head_warmup_steps: int) -> int | None:
        """The new total steps, at the step that re-plans (every rank calls it after each full step); else None.

        Args:
            spent: the run's training seconds so far (counted up to now when called).
        """
        if self.record is None:
            return None
        self.full_steps += 1
        if self.full_steps == REPLAN_WARM:
            self.sync()
            self.clock = time.perf_counter()
        if self.full_steps < REPLAN_WARM + REPLAN_STEPS:
            return None
        self.sync()
        mine = (time.perf_counter() - self.clock) / REPLAN_STEPS
        slowest = distributed.all_reduce_max(self.d, mine, self.device)
        total = replan(self.record, step, slowest, spent(), head_warmup_steps)
        self.record["replanned_at"], self.record["measured_step_seconds"] = step, slowest
        self.record = None  # once
        return total


def replan(record: dict, step: int, step_seconds: float, train_seconds: float, head_warmup_steps: int) -> int:
    """The total steps that fit what is left of the budget, at `step_seconds` a step from `step` on.

    Args:
        record: `resolve_steps`' record (budget seconds, the probe's seconds, --max-steps' cap).
        step: steps taken so far.
        step_seconds: measured seconds per step, the slowest rank's.
        train_seconds: training time spent so far (the run's, summed over resumes).
        head_warmup_steps: the head-only steps, which stay as planned (at least one full step follows them).

    Example:
        >>> replan({"seconds": 60.0, "probe_seconds": 4.0, "cap": None}, 5, 0.5, 6.0, 0)
        105
    """
    left = record["seconds"] - record["probe_seconds"] - train_seconds
    total = step + max(int(left / step_seconds), 1)
    total = max(total, head_warmup_steps + 1)
    return min(total, record["cap"]) if record["cap"] else total
