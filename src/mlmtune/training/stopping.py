"""How a run stops early without losing work: the signals it hears, and how the ranks agree on the step.

Ctrl-C (SIGINT), SIGTERM (what `scancel`, a spot reclaim, a pod eviction and torchrun's launcher send) and
SIGUSR1 (SLURM's `--signal`) are handled alike, from the moment `mlmtune train` starts:

- before the first step (loading the model, tokenizing, the evaluation before training) there is nothing to
  save: the run leaves at once (`LeftEarly`), in one line, releasing its folder's lock;
- during the steps the first asks the run to stop after the step in progress, save one checkpoint (with no
  evaluation first) and exit with a line that says how to resume. A second one stops at once: in one process,
  after the step in progress (a checkpoint always holds whole steps), which is then saved; on several ranks,
  without a checkpoint (the ranks could no longer agree on one), leaving the last one;
- after the last step (its checkpoint saved) the run leaves at once; --resume writes the output.

The same signal again within `REPEAT_SECONDS` of the first counts as that one: SLURM signals every process of
the step and torchrun forwards its own SIGTERM, so each worker hears two, milliseconds apart, for one request.

On several ranks each rank's wish to stop is summed over the ranks every step, on the CPU (gloo) group and
without waiting: the sum started after step s is read after step s+1. All ranks read the same sums at the
same steps, so they stop after the same step, at most one step after the signal, and the GPUs never wait.
Before an evaluation or a checkpoint the sum is read at once (a wait on the CPU group of a few microseconds,
at those steps only), so a stop asked for skips them instead of running them first.

This module imports no torch, so that the CLI can listen before torch loads.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import TYPE_CHECKING

from mlmtune.errors import say

if TYPE_CHECKING:
    from mlmtune import distributed

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
REPEAT_SECONDS = 3.0  # the same signal again this soon after the first is the same request, sent twice


class StopNow(BaseException):
    """A second signal on several ranks: leave at once, without a checkpoint."""


class LeftEarly(BaseException):
    """A signal before the first step or after the last one: leave at once (nothing is lost)."""

    def __init__(self, name: str, steps_done: bool):
        super().__init__(name)
        self.name, self.steps_done = name, steps_done

    def message(self, step: int | None = None) -> str:
        if self.steps_done:
            return (f"{self.name} after the last step ({step}), whose checkpoint is saved: left before writing the "
                    f"output; the same command with --resume writes it")
        return f"{self.name} during start-up, before the first step: left at once, nothing to save"


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Stop:
    """The signals as the run hears them (see the module's docstring). Listens from `listening()` on; the steps
    begin with `begin_steps` and end with `end_steps`. `step_now` says which step the run is at."""

    def __init__(self, ranks: bool = False, step_now=lambda: None):
        self.requested = threading.Event()
        self.ranks, self.step_now = ranks, step_now
        self.name = "Ctrl-C"
        self.phase = "start"  # "start", "steps", "end"
        self._first: tuple[int, float] | None = None  # the first signal heard, and when
        self._in_step = self._pending = False

    def begin_steps(self, ranks: bool, step_now) -> None:
        self.ranks, self.step_now, self.phase = ranks, step_now, "steps"

    def end_steps(self, step_now) -> None:
        self.step_now, self.phase = step_now, "end"

    def done(self) -> None:
        """The output is written: what is left (a summary printed) ends in a moment, and a signal is let be."""
        self.phase = "done"

    def install(self) -> dict:
        """Listen from now until the process ends (the CLI: a repeat that comes after the run has left, as the
        process exits, must not kill it half-way through its last line); returns the handlers it replaced."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return {}
        return {s: signal.signal(s, self._handler) for s in SIGNALS}

    @contextlib.contextmanager
    def listening(self):
        """Listen inside the block; the handlers before it are back after it (the Python API)."""
        previous = self.install()
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first is not None and self._first[0] == signum and now - self._first[1] < REPEAT_SECONDS:
            return  # the same request again (SLURM's and torchrun's SIGTERM): already heard
        if self.phase == "done":
            return
        if self._first is not None:  # a second request
            if self.phase != "steps" or not self.requested.is_set():
                raise KeyboardInterrupt  # already leaving
            if self.ranks:
                raise StopNow(signal_name(signum))
            if self._in_step:
                self._pending = True
                return
            raise KeyboardInterrupt
        self._first = (signum, now)
        self.name = signal_name(signum)
        if self.phase != "steps":
            raise LeftEarly(self.name, steps_done=self.phase == "end")
        self.requested.set()
        step = self.step_now()
        at = f" at step {step}" if step is not None else ""
        say(f"\n{self.name}{at}: finishing this step and saving a checkpoint ({self.name} again to stop sooner)")

    @contextlib.contextmanager
    def taking_step(self):
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False
        if self._pending:  # a second signal came during the step: stop now that it is counted
            raise KeyboardInterrupt


class Vote:
    """Whether every rank should stop now: one process decides alone; several sum their wishes each step on the
    gloo group, without waiting, and read the sum one step later (`distributed.Dist.wait_group`), or at once
    (`settle`) before an evaluation or a checkpoint. Every rank must pass the same `settle` at each step."""

    def __init__(self, d: distributed.Dist):
        self.d = d
        self.work = self.sum = None

    def stop_now(self, mine: bool, settle: bool = False) -> bool:
        if not self.d.enabled:
            return mine
        import torch
        import torch.distributed as dist

        agreed = False
        if self.work is not None:
            self.work.wait()  # started a step ago: done by now, or nearly
            agreed = bool(self.sum.item() > 0)
            self.work = None
        if agreed:
            return True
        self.sum = torch.tensor([float(mine)])
        if settle:
            dist.all_reduce(self.sum, group=self.d.wait_group)
            return bool(self.sum.item() > 0)
        self.work = dist.all_reduce(self.sum, group=self.d.wait_group, async_op=True)
        return False

    def close(self) -> None:
        """Let the last sum finish: every rank started the same ones, and a group must not be left mid-sum."""
        if self.work is not None:
            self.work.wait()
            self.work = None
