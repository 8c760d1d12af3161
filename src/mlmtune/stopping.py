"""How a run stops early without losing work: the signals it hears, and how the ranks agree on the step.

Ctrl-C (SIGINT), SIGTERM (what `scancel`, a spot reclaim, a pod eviction and torchrun's launcher send) and
SIGUSR1 (SLURM's `--signal`) are handled alike: the first asks the run to stop after the step in progress,
save a checkpoint and exit with a line that says how to resume. A second one stops at once: in one
process, after the step in progress (a checkpoint always holds whole steps), which is then saved; on
several ranks, without a checkpoint (the ranks could no longer agree on one), leaving the last one.

On several ranks each rank's wish to stop is summed over the ranks every step, on the CPU (gloo) group and
without waiting: the sum started after step s is read after step s+1. All ranks read the same sums at the
same steps, so they stop after the same step, at most one step after the signal, and the GPUs never wait.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

from mlmtune import distributed
from mlmtune.errors import say

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopNow(BaseException):
    """A second signal on several ranks: leave at once, without a checkpoint."""


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Stop:
    """The signals as the loop hears them (see the module's docstring). `step_now` says which step the run is at,
    for the line the first signal prints."""

    def __init__(self, ranks: bool = False, step_now=lambda: None):
        self.requested = threading.Event()
        self.ranks, self.step_now = ranks, step_now
        self.name = "Ctrl-C"
        self._in_step = self._pending = False

    @contextlib.contextmanager
    def listening(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handler(self, signum, frame) -> None:
        if not self.requested.is_set():
            self.requested.set()
            self.name = signal_name(signum)
            step = self.step_now()
            at = f" at step {step}" if step is not None else ""
            say(f"\n{self.name}{at}: finishing this step and saving a checkpoint ({self.name} again to stop sooner)")
        elif self.ranks:
            raise StopNow(signal_name(signum))
        elif self._in_step:
            self._pending = True
        else:
            raise KeyboardInterrupt

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
    gloo group, without waiting, and read the sum one step later (`distributed.Dist.wait_group`)."""

    def __init__(self, d: distributed.Dist):
        self.d = d
        self.work = self.sum = None

    def stop_now(self, mine: bool) -> bool:
        if not self.d.enabled:
            return mine
        agreed = False
        if self.work is not None:
            self.work.wait()  # started a step ago: done by now, or nearly
            agreed = bool(self.sum.item() > 0)
        if agreed:
            self.work = None
            return True
        self.sum = torch.tensor([float(mine)])
        self.work = dist.all_reduce(self.sum, group=self.d.wait_group, async_op=True)
        return False

    def close(self) -> None:
        """Let the last sum finish: every rank started the same ones, and a group must not be left mid-sum."""
        if self.work is not None:
            self.work.wait()
            self.work = None
