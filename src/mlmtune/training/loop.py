"""The steps of a run (`Loop`): feed, one optimizer step, log line, evaluation, checkpoint; a --time-budget
re-planned from the slowest rank; and the way out, with a checkpoint, on Ctrl-C or a signal. `train.py` sets the run
up around it and finishes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mlmtune import distributed
from mlmtune.config import TrainConfig
from mlmtune.errors import MlmtuneError, say
from mlmtune.evaluation.measurements import eval_entry, token_note
from mlmtune.evaluation.perplexity import EvalResult
from mlmtune.options import to_dict
from mlmtune.training import checkpoint as ckpt
from mlmtune.training import dashboard
from mlmtune.training.budget import Replanner
from mlmtune.training.engine import Engine
from mlmtune.training.feed import Prefetcher, StepBatches
from mlmtune.training.run import Run
from mlmtune.training.schedule import learning_rate_at, step_plan
from mlmtune.training.stopping import Stop, StopNow, Vote
from mlmtune.training.throughput import flops_per_token, log_figures


class LogWindow:
    """The steps since the last log line: their losses (device tensors), tokens and training time.

    Time is counted at log lines and around evaluations and saves, after waiting for the device: steps
    are queued without a sync, so only then is the time the device's and not the launches'.
    """

    def __init__(self, state: ckpt.TrainState, sync: Callable[[], None]):
        self.state, self.sync = state, sync
        self.losses: list[torch.Tensor] = []
        self.tokens, self.seconds = 0, 0.0
        self.clock = time.perf_counter()  # where the training time not yet counted began

    def add(self, loss: torch.Tensor | float, tokens: int) -> None:
        self.losses.append(torch.as_tensor(loss))
        self.tokens += tokens

    def count_time(self) -> float:
        """Add the training time since the last count to the run's total; return it."""
        self.sync()
        now = time.perf_counter()
        elapsed, self.clock = now - self.clock, now
        self.state.train_seconds += elapsed
        self.seconds += elapsed
        return elapsed

    @contextlib.contextmanager
    def paused(self, pause: bool):
        """Time spent inside (evaluating, saving) is not training time."""
        if pause:
            self.count_time()
        yield
        if pause:
            self.clock = time.perf_counter()

    def flush(self, d: distributed.Dist, device: torch.device) -> tuple[float, float | None]:
        """The window's mean loss over all ranks and its tokens per second; starts a new window."""
        shares = distributed.all_reduce_sum(d, torch.stack(self.losses).tolist(), device)
        self.count_time()
        speed = self.tokens / self.seconds if self.seconds else None
        self.losses, self.tokens, self.seconds = [], 0, 0.0
        return sum(shares) / len(shares), speed


class Loop:
    """The steps of a run: feed, step, log, evaluate, save; and the way out, with a checkpoint, on Ctrl-C."""

    def __init__(self, cfg: TrainConfig, run: Run, engine: Engine, state: ckpt.TrainState,
                 evaluate: Callable[[str], EvalResult | None], dash: dashboard.Dashboard, progress: bool,
                 on_step: Callable[[int, float], None] | None, stop: Stop):
        self.cfg, self.run, self.engine, self.state = cfg, run, engine, state
        self.evaluate, self.dash, self.progress, self.on_step = evaluate, dash, progress, on_step
        self.stop, self.vote = stop, Vote(engine.dist)  # stop: listening since the run began
        self.saved_at: int | None = None  # the step of the checkpoint this process wrote last: never twice
        self.steps_per_epoch, self.total, self.save_every = step_plan(cfg, run.n_train, engine.dist.world)
        self.window = LogWindow(state, engine.sync)
        self.bar = tqdm(total=self.total, initial=state.step, desc="Training", disable=not progress,
                        dynamic_ncols=True)
        self.my_tokens = 0  # what this rank trained on in this process (shows every rank took part)
        self.replanner = Replanner(state.budget, engine.dist, engine.sync, engine.device)
        self.pending: ckpt.PendingSave | None = None  # a sharded checkpoint written in the background
        self.flops = flops_per_token(run.model, cfg.data.block_size, cfg.mlm_probability)  # for the MFU

    def train(self) -> None:
        cfg, state, engine = self.cfg, self.state, self.engine
        due = state.step and (state.step % self.steps_per_epoch == 0 or state.step == self.total)
        if due and all(e["step"] != state.step for e in state.epochs):
            with self.window.paused(True):  # the evaluation due at this step, skipped by the stop that saved it
                self.record_eval(self.evaluate(f"Eval (step {state.step})"))
        if state.step >= self.total:  # a finished run, resumed
            self.bar.close()
            return
        feed = self.feed()
        stop = self.stop
        head_only = state.step < cfg.optim.head_warmup_steps  # the first steps fit a new head, the encoder frozen
        engine.set_phase(head_only)
        try:
            stop.begin_steps(engine.dist.enabled, lambda: state.step)  # a signal now stops after the step
            while state.step < self.total:
                if head_only and state.step >= cfg.optim.head_warmup_steps:
                    head_only = False
                    engine.set_phase(False)
                    say(f"step {state.step}: head warm-up done, training the whole model")
                if self.step(feed, stop, head_only):  # every rank, after the same step
                    raise KeyboardInterrupt
                if not head_only and self.replan_budget():  # the total changed: the feed makes the new steps
                    feed.close()
                    feed = self.feed()
            self.vote.close()
            self.finish_save()  # the last checkpoint is on disk before the run goes on to write its output
        except KeyboardInterrupt:
            self.bar.close()
            self.window.count_time()
            saved_to = self.save()  # a consistent state: the loop stops between steps
            engine.close()
            distributed.close(engine.dist)  # no rank leaves while rank 0 still writes
            raise MlmtuneError(f"interrupted at step {state.step}; checkpoint saved in {saved_to}, "
                               f"continue with the same command and --resume") from None
        except StopNow as e:
            raise MlmtuneError(f"stopped at once by a second {e}, at step {state.step} and without a checkpoint; "
                               f"continue from the last one with the same command and --resume") from None
        finally:
            feed.close()
            self.bar.close()

    def feed(self) -> Prefetcher:
        """The masked batches of the steps from this one to the planned total, made in a thread, ahead."""
        run, step = self.run, self.state.step
        batches = StepBatches.for_run(self.cfg, run.train_blocks, run.tokenizer, run.masker, step, self.engine.dist,
                                      self.progress)
        return Prefetcher(batches, step, self.total, pin_memory=self.engine.pin_memory)

    def replan_budget(self) -> bool:
        """--time-budget on several ranks: the total steps made again once, from the slowest rank's measured step
        time (`budget.Replanner`); True when it changed. The new count goes into the config the checkpoints carry,
        so --resume keeps it."""
        state, engine = self.state, self.engine

        def spent() -> float:  # the training time so far, this window's included
            self.window.count_time()
            return state.train_seconds

        total = self.replanner.after_full_step(state.step, spent, self.cfg.optim.head_warmup_steps)
        if total is None:
            return False
        plan = state.budget
        say(f"--time-budget {self.cfg.schedule.time_budget}: the slowest of {engine.dist.world} processes takes "
            f"{plan['measured_step_seconds']:.2f}s a step (the probe, on one device without communication: "
            f"{plan['step_seconds']:.2f}s): {total} steps in all instead of {self.total}")
        if total == self.total:
            return False
        self.cfg = dataclasses.replace(self.cfg, schedule=dataclasses.replace(self.cfg.schedule, max_steps=total))
        state.config = to_dict(self.cfg)  # what checkpoints carry and --resume compares
        self.steps_per_epoch, self.total, self.save_every = step_plan(self.cfg, self.run.n_train, engine.dist.world)
        self.bar.total = self.total
        self.bar.refresh()
        return True

    def step(self, feed: Prefetcher, stop: Stop, head_only: bool) -> bool:
        """One optimizer step and what follows it (log line, evaluation, checkpoint); True when the ranks agreed
        to stop after it. Agreed before an evaluation or a checkpoint, they are skipped (the way out saves it);
        a checkpoint written here is not written again on the way out."""
        cfg, state, engine = self.cfg, self.state, self.engine
        t0 = time.perf_counter()
        # this rank's share of the step's micro-batches, each block masked from (seed, epoch, its row)
        batches, global_blocks, n_masked, my_blocks = self.next_batches(feed)
        self.my_tokens += my_blocks * cfg.data.block_size
        with stop.taking_step():
            loss = engine.step(state.step, batches, n_masked, learning_rate_at(cfg, self.total, state.step),
                               head_only)
            state.step += 1
        if self.on_step is not None:
            engine.sync()  # only for a caller that times steps: the loop itself never waits
        seconds = time.perf_counter() - t0
        tokens = global_blocks * cfg.data.block_size
        state.train_tokens += tokens
        self.window.add(loss, tokens)
        self.bar.update(1)
        last = state.step == self.total
        log_step = state.step % cfg.output.logging_steps == 0 or last
        if log_step:  # the one host sync (and, on several ranks, the one collective) of the window
            mean, tokens_per_second = self.window.flush(engine.dist, engine.device)
            state.train_loss.append({"step": state.step, "loss": mean})
            self.bar.set_postfix(loss=f"{mean:.4f}", **log_figures(engine.device, engine.precision, self.flops,
                                                                    tokens_per_second, engine.dist.world))
            self.dash.train(state.step, mean, learning_rate_at(cfg, self.total, state.step), tokens_per_second)
        epoch_end = state.step % self.steps_per_epoch == 0
        save = state.step % self.save_every == 0 or last
        if (epoch_end or save) and self.vote.stop_now(stop.requested.is_set(), settle=True):
            return True  # a stop was asked for: no evaluation, and one checkpoint, on the way out
        with self.window.paused(epoch_end or last or save):  # evaluation and checkpoints are not training time
            if epoch_end or last:
                self.record_eval(self.evaluate(f"Eval (step {state.step})"))
            if save:
                self.save(wait=False)  # under FSDP written while the next steps train
        if self.on_step is not None:
            self.on_step(state.step, seconds)
        return self.vote.stop_now(stop.requested.is_set())

    def next_batches(self, feed: Prefetcher):
        """The step's batches; a stream that stops parsing mid-run saves what was trained before it raises."""
        try:
            return feed.get(self.state.step)
        except MlmtuneError as e:
            self.window.count_time()
            saved = f"; checkpoint saved in {self.save()}, continue with --resume" if self.state.step else ""
            raise MlmtuneError(f"{e}{saved}") from None

    def save(self, wait: bool = True) -> Path:
        """Rank 0 writes the checkpoint; under FSDP every rank writes its own shards (nothing is gathered), in the
        background unless `wait`: the previous one is published first (`finish_save`). A step saved already (a stop
        asked for right after a save) is not written again: every rank knows it alike."""
        out = Path(self.cfg.output.output_dir)
        where = ckpt.checkpoints_dir(out) / f"step-{self.state.step:07d}"
        if self.saved_at == self.state.step:
            if wait:
                self.finish_save()
            return where
        self.saved_at = self.state.step
        write_shards = self.engine.shard_writer(self.state)
        if write_shards is not None:
            self.finish_save()
            self.pending = ckpt.save_sharded_checkpoint(out, self.engine.dist, write_shards, self.state,
                                                        self.cfg.output.save_total_limit)
            return self.finish_save() if wait else self.pending.final
        model, optimizer_state = self.engine.checkpoint(self.state)
        if self.engine.dist.main:
            return ckpt.save_checkpoint(out, model, optimizer_state, self.state, self.cfg.output.save_total_limit)
        return where

    def finish_save(self) -> Path | None:
        """Publish the sharded checkpoint still being written, if any (every rank)."""
        pending, self.pending = self.pending, None
        return pending.finish() if pending is not None else None

    def record_eval(self, result: EvalResult | None) -> None:
        if result is None:
            return
        state, streaming = self.state, self.run.train_blocks is None
        entry = {"epoch": None if streaming else round(state.step / self.steps_per_epoch, 4), "step": state.step,
                 **eval_entry(result)}
        state.epochs.append(entry)
        where = f"step {state.step}" if streaming else f"epoch {entry['epoch']:g} step {state.step}"
        say(f"{where}: eval loss {result.loss:.4f}, perplexity {result.perplexity:,.2f}{token_note(result)}")
        self.dash.eval(state.step, result.loss, result.perplexity)
