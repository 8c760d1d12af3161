"""train(cfg): one training run, whatever the engine. Reads top to bottom: the output folder, the data,
the step counts, the evaluation before training (or the checkpoint it resumes), the steps, the
evaluation after, the output folder.

An engine (`torch_engine.TorchEngine`, `keras.engine.KerasEngine`; `run.Engine` says what one does)
owns only how the model is held, how one optimizer step runs, and how its weights and optimizer
state go in and out of a checkpoint. The rest lives here once.

Reproducibility is by construction (`feed.StepBatches`), not by saved RNG state: the order of blocks in
epoch e comes from a generator seeded with (seed, e), each block's masks from one seeded with (seed, e,
its row), and the dropout of optimizer step s from one seeded with (seed, s); the learning rate is a
function of s. So a resumed run sees
exactly the batches, masks, dropout and learning rates an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mlmtune import checkpoint as ckpt
from mlmtune import dashboard, distributed
from mlmtune.budget import resolve_steps
from mlmtune.config import TrainConfig
from mlmtune.downstream import downstream_line, downstream_metrics
from mlmtune.embedding import embedding_line, embedding_metrics
from mlmtune.errors import MlmtuneError, say
from mlmtune.evaluate import EvalResult
from mlmtune.feed import Prefetcher, StepBatches
from mlmtune.lock import FolderLock
from mlmtune.measure import (
    cloze_check,
    cloze_metrics,
    eval_entry,
    evaluator,
    general_check,
    general_metrics,
    vocabulary_metrics,
)
from mlmtune.options import to_dict
from mlmtune.run import (
    Engine,
    Run,
    TrainResult,
    check_output_dir,
    engine_class,
    load_run,
    run_metrics,
    write_output,
)
from mlmtune.schedule import learning_rate_at, step_plan
from mlmtune.stopping import Stop, StopNow, Vote

__all__ = ["TrainResult", "train"]


def train(cfg: TrainConfig, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fine-tune a masked-LM with dynamic masking and measure it before and after on fixed masks.

    Args:
        cfg: the resolved training config.
        progress: show progress bars.
        on_step: called after every optimizer step with (step, seconds it took), e.g. for timing.

    Returns:
        TrainResult with the output folder (a Hugging Face model folder plus metrics.json,
        training_curves.png, README.md and the resolved config) and the metrics.

    Raises:
        MlmtuneError: bad data, model or output folder; or training was interrupted (a checkpoint
            is saved first, so `--resume` continues).
    """
    dashboard.require(cfg.report_to)  # a dashboard's missing package, before any folder is made
    engine, cfg = engine_class(cfg.backend).open(cfg)  # refuses what it cannot do before any data is read
    with engine.session():
        return _train(cfg, engine, progress and engine.dist.main, on_step)


def _train(cfg: TrainConfig, engine: Engine, progress: bool, on_step) -> TrainResult:
    out = Path(cfg.output_dir)
    lock = FolderLock.inside(out, f"--output-dir {out}")  # rank 0 holds it: one run per folder
    try:
        return _train_locked(cfg, engine, progress, on_step, lock)
    finally:
        lock.release()


def _train_locked(cfg: TrainConfig, engine: Engine, progress: bool, on_step, lock: FolderLock) -> TrainResult:
    d, out = engine.dist, Path(cfg.output_dir)
    distributed.main_first(d, lambda: check_output_dir(out, cfg.resume, lock) if d.main else None)
    distributed.check_shared_dir(d, out)  # several machines: checkpoints must reach every rank
    run = load_run(cfg, d, check_model=engine.check_model, device=engine.device)
    engine.attach(run.model)
    cfg = resolve_steps(cfg, d, run.model, run.n_train, engine.device,
                        lambda: engine.probe(cfg, run.model, run.tokenizer, run.train_blocks, engine.device))
    engine.start(cfg, run.tokenizer)
    say(engine.describe())
    evaluate, general = evaluator(cfg, run, engine, progress), general_check(cfg, run, engine, progress)
    cloze = cloze_check(run, engine)
    state, resumed = start_or_resume(cfg, out, engine, evaluate, general, cloze)
    if not resumed:  # scored as loaded, before the vocabulary grew
        state.downstream_before, state.embedding_before = run.downstream_before, run.embedding_before
    dash = dashboard.Dashboard(cfg.report_to, out, start_step=state.step, enabled=d.main, config=to_dict(cfg),
                               runs=state.trackers if resumed else None)
    state.trackers = {**state.trackers, **dash.runs}  # the checkpoints keep them: --resume continues each run
    if not resumed and state.eval_before:
        dash.eval(0, state.eval_before["eval_loss"], state.eval_before["perplexity"])
    if not resumed and state.general_before:
        dash.general(0, state.general_before["general_loss"], state.general_before["general_perplexity"])
    if not resumed and state.cloze_before:
        dash.cloze(0, state.cloze_before)
    if not resumed and state.downstream_before:
        dash.downstream(0, state.downstream_before)
    if not resumed and state.embedding_before:
        dash.embedding(0, state.embedding_before)
    loop = Loop(cfg, run, engine, state, evaluate, dash, progress, on_step)
    try:
        loop.train()
        general_after = general("General check (after)")
        if general_after:
            dash.general(state.step, general_after["general_loss"], general_after["general_perplexity"])
        cloze_after = cloze("Cloze (after)")
        if cloze_after:
            dash.cloze(state.step, cloze_after)
            say(_cloze_line("After training", cloze_after))
        checks = {**general_metrics(state.general_before, general_after),
                  **cloze_metrics(state.cloze_before, cloze_after)}
        return finish(cfg, run, engine, state, evaluate, loop.my_tokens, checks, dash)
    finally:
        dash.close()


def start_or_resume(cfg: TrainConfig, out: Path, engine: Engine, evaluate: Callable[[str], EvalResult | None],
                    general: Callable[[str], dict | None],
                    cloze: Callable[[str], dict | None]) -> tuple[ckpt.TrainState, bool]:
    """The run's state and whether it was resumed: with --resume the newest checkpoint's (restored into the
    engine), else a new state holding the evaluations before training (the eval split's, the general check's)."""
    config = to_dict(cfg)
    resumed = ckpt.resume_latest(out, config, engine.restore, engine.dist) if cfg.resume else None
    if resumed is not None:
        return resumed, True
    if cfg.resume:
        say(f"--resume: no checkpoint in {out}, starting from the beginning")
    state = ckpt.TrainState(config=config, world_size=engine.dist.world)
    before = evaluate("Eval (before)")
    if before:
        state.eval_before = eval_entry(before)
        say(f"Before training: eval loss {before.loss:.4f}, perplexity {before.perplexity:,.2f}{_token(before)}")
    state.general_before = general("General check (before)")
    if state.general_before:
        g = state.general_before
        say(f"Before training, {g['general_eval']}: loss {g['general_loss']:.4f}, perplexity "
            f"{g['general_perplexity']:,.2f} ({g['general_masked_tokens']:,} masked tokens)")
    state.cloze_before = cloze("Cloze (before)")
    if state.cloze_before:
        say(_cloze_line("Before training", state.cloze_before))
    return state, False


def _cloze_line(when: str, c: dict) -> str:
    return (f"{when}, cloze ({c['cloze']}): top-1 {c['cloze_top1']:.1%}, top-3 {c['cloze_top3']:.1%} of "
            f"{c['cloze_cases']} cases")


def _token(result: EvalResult) -> str:
    return "" if result.token is None else f" (on token masks: eval loss {result.token.loss:.4f})"


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
                 on_step: Callable[[int, float], None] | None):
        self.cfg, self.run, self.engine, self.state = cfg, run, engine, state
        self.evaluate, self.dash, self.progress, self.on_step = evaluate, dash, progress, on_step
        self.steps_per_epoch, self.total, self.save_every = step_plan(cfg, run.n_train, engine.dist.world)
        self.window = LogWindow(state, engine.sync)
        self.bar = tqdm(total=self.total, initial=state.step, desc="Training", disable=not progress,
                        dynamic_ncols=True)
        self.my_tokens = 0  # what this rank trained on in this process (shows every rank took part)

    def train(self) -> None:
        cfg, state, engine = self.cfg, self.state, self.engine
        if state.step >= self.total:  # a finished run, resumed
            self.bar.close()
            return
        batches = StepBatches.for_run(cfg, self.run.train_blocks, self.run.tokenizer, self.run.masker, state.step,
                                      engine.dist, self.progress)
        feed = Prefetcher(batches, state.step, self.total, pin_memory=engine.pin_memory)  # made in a thread, ahead
        stop, vote = Stop(ranks=engine.dist.enabled, step_now=lambda: state.step), Vote(engine.dist)
        head_only = state.step < cfg.head_warmup_steps  # the first steps fit a new head, the encoder frozen
        engine.set_phase(head_only)
        try:
            with stop.listening():
                while state.step < self.total:
                    if head_only and state.step >= cfg.head_warmup_steps:
                        head_only = False
                        engine.set_phase(False)
                        say(f"step {state.step}: head warm-up done, training the whole model")
                    self.step(feed, stop, head_only)
                    if vote.stop_now(stop.requested.is_set()):  # every rank, after the same step
                        raise KeyboardInterrupt
                vote.close()
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

    def step(self, feed: Prefetcher, stop: Stop, head_only: bool) -> None:
        """One optimizer step and what follows it (log line, evaluation, checkpoint)."""
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
        log_step = state.step % cfg.logging_steps == 0 or last
        if log_step:  # the one host sync (and, on several ranks, the one collective) of the window
            mean, tokens_per_second = self.window.flush(engine.dist, engine.device)
            state.train_loss.append({"step": state.step, "loss": mean})
            self.bar.set_postfix(loss=f"{mean:.4f}")
            self.dash.train(state.step, mean, learning_rate_at(cfg, self.total, state.step), tokens_per_second)
        epoch_end = state.step % self.steps_per_epoch == 0
        save = state.step % self.save_every == 0 or last
        with self.window.paused(epoch_end or last or save):  # evaluation and checkpoints are not training time
            if epoch_end or last:
                self.record_eval(self.evaluate(f"Eval (step {state.step})"))
            if save:
                self.save()
        if self.on_step is not None:
            self.on_step(state.step, seconds)

    def next_batches(self, feed: Prefetcher):
        """The step's batches; a stream that stops parsing mid-run saves what was trained before it raises."""
        try:
            return feed.get(self.state.step)
        except MlmtuneError as e:
            self.window.count_time()
            saved = f"; checkpoint saved in {self.save()}, continue with --resume" if self.state.step else ""
            raise MlmtuneError(f"{e}{saved}") from None

    def save(self) -> Path:
        """Rank 0 writes the checkpoint; every rank takes part in gathering what it holds (under FSDP)."""
        model, optimizer_state = self.engine.checkpoint(self.state)
        if self.engine.dist.main:
            return ckpt.save_checkpoint(Path(self.cfg.output_dir), model, optimizer_state, self.state,
                                        self.cfg.save_total_limit)
        return ckpt.checkpoints_dir(Path(self.cfg.output_dir)) / f"step-{self.state.step:07d}"

    def record_eval(self, result: EvalResult | None) -> None:
        if result is None:
            return
        state, streaming = self.state, self.run.train_blocks is None
        entry = {"epoch": None if streaming else round(state.step / self.steps_per_epoch, 4), "step": state.step,
                 **eval_entry(result)}
        state.epochs.append(entry)
        where = f"step {state.step}" if streaming else f"epoch {entry['epoch']:g} step {state.step}"
        say(f"{where}: eval loss {result.loss:.4f}, perplexity {result.perplexity:,.2f}{_token(result)}")
        self.dash.eval(state.step, result.loss, result.perplexity)


def finish(cfg: TrainConfig, run: Run, engine: Engine, state: ckpt.TrainState,
           evaluate: Callable[[str], EvalResult | None], my_tokens: int, checks: dict,
           dash: dashboard.Dashboard) -> TrainResult:
    """Metrics (with each rank's tokens and weight digest); rank 0 probes the downstream task and checks a sentence
    encoder's embeddings with the full model and writes the output folder, while the others wait; all leave
    together."""
    d = engine.dist
    after = state.epochs[-1] if state.epochs and state.epochs[-1]["step"] == state.step else None
    if after is None and run.eval_blocks is not None:  # resumed a finished run with no eval on record
        after = {"step": state.step, **eval_entry(evaluate("Eval (after)"))}
    full_model = engine.output_model()  # under FSDP every rank takes part in gathering it
    metrics = {
        **run_metrics(cfg, run, state, after),
        **checks,  # the general check's and the cloze's metrics
        "world_size": d.world,
        "rank_train_tokens": [int(t) for t in distributed.all_reduce_sum(
            d, [my_tokens if r == d.rank else 0 for r in range(d.world)], engine.device)],
        "rank_weights_sha256": distributed.weights_digests(d, run.model),
        "precision": engine.precision,
        **engine.metrics(),
    }
    if len(set(metrics["rank_weights_sha256"])) > 1:
        say(f"warning: the ranks ended with different weights ({', '.join(metrics['rank_weights_sha256'])}); "
            f"the model saved is rank 0's")
    if d.main:  # the tokenizer-free figures, the downstream probe and the embedding check, with the full model
        metrics.update(vocabulary_metrics(run, full_model, engine.device))
        if run.downstream is not None:
            downstream_after = run.downstream(full_model, run.tokenizer)
            say(downstream_line("After training", downstream_after))
            dash.downstream(state.step, downstream_after)
            metrics.update(downstream_metrics(state.downstream_before, downstream_after))
        if run.sentence is not None:
            metrics["sentence_modules"] = list(run.sentence.modules)
        if run.embedding is not None:
            embedding_after = run.embedding(full_model, run.tokenizer)
            say(embedding_line("After training", embedding_after))
            dash.embedding(state.step, embedding_after)
            metrics.update(embedding_metrics(state.embedding_before, embedding_after))
    engine.close()
    try:
        if d.main:  # rank 0 writes the model, metrics, plots and card, once; the others wait for it in close()
            write_output(cfg, Path(cfg.output_dir), full_model, run.tokenizer, metrics,
                         run.vocabulary.words if run.vocabulary else None, run.sentence)
            dash.final(state.step, metrics, Path(cfg.output_dir) / "README.md")  # the model card, as written
    finally:
        distributed.close(d)
    return TrainResult(output_dir=Path(cfg.output_dir), metrics=metrics, rank=d.rank)
