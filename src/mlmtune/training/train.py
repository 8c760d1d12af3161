"""train(cfg): one training run, whatever the engine. Reads top to bottom: the output folder, the data,
the step counts, the evaluation before training (or the checkpoint it resumes), the steps, the
evaluation after, the output folder. The steps themselves are `loop.Loop`'s.

An engine (`torch_engine.TorchEngine`, `keras.engine.KerasEngine`; `engine.Engine` says what one does)
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
from collections.abc import Callable
from pathlib import Path

from mlmtune import distributed
from mlmtune.config import TrainConfig
from mlmtune.device import PRECISION_NAMES
from mlmtune.errors import MlmtuneError, say
from mlmtune.evaluation.measurements import Measurement, Scoring, eval_entry, measurements, token_note
from mlmtune.evaluation.perplexity import EvalResult
from mlmtune.lock import FolderLock
from mlmtune.options import to_dict
from mlmtune.training import checkpoint as ckpt
from mlmtune.training import dashboard, resume, sharding
from mlmtune.training.budget import resolve_steps
from mlmtune.training.engine import Engine, engine_class
from mlmtune.training.loop import Loop
from mlmtune.training.output import TrainResult, check_output_dir, run_metrics, write_output
from mlmtune.training.run import Run, evaluator, load_run, vocabulary_metrics
from mlmtune.training.stopping import LeftEarly, Stop
from mlmtune.training.throughput import device_figures

__all__ = ["TrainResult", "train"]


def train(cfg: TrainConfig, progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          stop: Stop | None = None) -> TrainResult:
    """Fine-tune a masked-LM with dynamic masking and measure it before and after on fixed masks.

    Args:
        cfg: the resolved training config.
        progress: show progress bars.
        on_step: called after every optimizer step with (step, seconds it took), e.g. for timing.
        stop: the signals' listener, already installed for the whole process (the CLI installs one before torch
            loads); by default one listens for the duration of the call.

    Returns:
        TrainResult with the output folder (a Hugging Face model folder plus metrics.json,
        training_curves.png, README.md and the resolved config) and the metrics.

    Raises:
        MlmtuneError: bad data, model or output folder; or training was interrupted (a checkpoint
            is saved first, so `--resume` continues).
    """
    dashboard.require(cfg.output.report_to)  # a dashboard's missing package, before any folder is made
    listening = contextlib.nullcontext() if stop is not None else (stop := Stop()).listening()
    with listening:  # from the start: a signal while the model loads leaves at once, in one line
        try:
            engine, cfg = engine_class(cfg.backend).open(cfg)  # refuses what it cannot do before any data is read
            with engine.session():
                result = _train(cfg, engine, progress and engine.dist.main, on_step, stop)
        except LeftEarly as e:
            raise MlmtuneError(e.message(stop.step_now())) from None
        stop.done()
        return result


def _train(cfg: TrainConfig, engine: Engine, progress: bool, on_step, stop: Stop) -> TrainResult:
    out = Path(cfg.output.output_dir)
    lock = FolderLock.inside(out, f"--output-dir {out}")  # rank 0 holds it: one run per folder
    try:
        return _train_locked(cfg, engine, progress, on_step, lock, stop)
    finally:
        lock.release()


def _train_locked(cfg: TrainConfig, engine: Engine, progress: bool, on_step, lock: FolderLock,
                  stop: Stop) -> TrainResult:
    d, out = engine.dist, Path(cfg.output.output_dir)
    distributed.main_first(d, lambda: check_output_dir(out, cfg.output.resume, lock) if d.main else None)
    distributed.check_shared_dir(d, out)  # several machines: checkpoints must reach every rank
    run = load_run(cfg, d, check_model=engine.check_model, device=engine.device)
    engine.attach(run.model)
    cfg, budget = resolve_steps(cfg, d, run.model, run.n_train, engine.device,
                                lambda: engine.probe(cfg, run.model, run.tokenizer, run.train_blocks, engine.device))
    engine.start(cfg, run.tokenizer)
    say(engine.describe())
    scoring = Scoring(d, engine.device, cfg.schedule.eval_batch_size or cfg.schedule.batch_size, progress,
                      engine.eval_autocast)
    evaluate = evaluator(cfg, run, engine, scoring)
    checks = measurements(run.tokenizer, scoring, run.general, run.cloze, run.downstream, run.embedding)
    state, resumed = start_or_resume(cfg, out, engine, evaluate, checks)
    if not resumed:  # the probes scored the model as loaded, before its vocabulary grew (`load_run`)
        state.downstream_before, state.embedding_before = run.downstream_before, run.embedding_before
        state.budget = budget  # a resumed run keeps its own (and whether it was re-planned)
    dash = dashboard.Dashboard(cfg.output.report_to, out, start_step=state.step, enabled=d.main, config=to_dict(cfg),
                               runs=state.trackers if resumed else None)
    state.trackers = {**state.trackers, **dash.runs}  # the checkpoints keep them: --resume continues each run
    if not resumed and state.eval_before:
        dash.eval(0, state.eval_before["eval_loss"], state.eval_before["perplexity"])
    for m in checks if not resumed else []:
        if getattr(state, f"{m.name}_before"):
            getattr(dash, m.name)(0, getattr(state, f"{m.name}_before"))
    loop = Loop(cfg, run, engine, state, evaluate, dash, progress, on_step, stop)
    try:
        loop.train()
        cfg = loop.cfg  # with the step count a time budget's re-plan chose: what the output folder's config says
        stop.end_steps(lambda: state.step)  # the last step's checkpoint is saved: a signal now leaves at once
        return finish(cfg, run, engine, state, evaluate, loop, checks, dash)
    finally:
        dash.close()


def start_or_resume(cfg: TrainConfig, out: Path, engine: Engine, evaluate: Callable[[str], EvalResult | None],
                    checks: list[Measurement]) -> tuple[ckpt.TrainState, bool]:
    """The run's state and whether it was resumed: with --resume the newest checkpoint's (restored into the
    engine), else a new state holding the evaluations before training (the eval split's, and those of `checks`
    that every rank takes with the engine's weights)."""
    config = to_dict(cfg)
    resumed = resume.resume_latest(out, config, engine.restore, engine.dist) if cfg.output.resume else None
    if resumed is not None:
        return resumed, True
    if cfg.output.resume:
        say(f"--resume: no checkpoint in {out}, starting from the beginning")
    state = ckpt.TrainState(config=config, world_size=engine.dist.world)
    before = evaluate("Eval (before)")
    if before:
        state.eval_before = eval_entry(before)
        say(f"Before training: eval loss {before.loss:.4f}, perplexity {before.perplexity:,.2f}{token_note(before)}")
    for m in checks:
        if not m.on_main:
            entry = m.score(engine.eval_model(), f"{m.name.capitalize()} (before)")
            setattr(state, f"{m.name}_before", entry)
            say(m.line("Before training", entry))
    return state, False


def finish(cfg: TrainConfig, run: Run, engine: Engine, state: ckpt.TrainState,
           evaluate: Callable[[str], EvalResult | None], loop: Loop, checks: list[Measurement],
           dash: dashboard.Dashboard) -> TrainResult:
    """The measurements after training (every rank takes its share of the general check's and the cloze's, with
    the engine's weights; rank 0 probes the downstream task and checks a sentence encoder's embeddings with the
    full model), the metrics (with each rank's tokens and weight digest, from the finished `loop`); rank 0 writes
    the output folder, while the others wait; all leave together."""
    d = engine.dist
    after = state.epochs[-1] if state.epochs and state.epochs[-1]["step"] == state.step else None
    if after is None and run.eval_blocks is not None:  # resumed a finished run with no eval on record
        after = {"step": state.step, **eval_entry(evaluate("Eval (after)"))}
    scored = {m.name: m.score(engine.eval_model(), f"{m.name.capitalize()} (after)") for m in checks
              if not m.on_main}
    full_model = engine.output_model()  # under FSDP every rank takes part in gathering it
    if full_model is not None:
        full_model.eval()  # training is over: the checks below and the saved model run without dropout
    metrics = {
        **run_metrics(cfg, run, state, after),
        "world_size": d.world,
        "rank_train_tokens": [int(t) for t in distributed.all_reduce_sum(
            d, [loop.my_tokens if r == d.rank else 0 for r in range(d.world)], engine.device)],
        "rank_weights_sha256": sharding.weights_digests(d, run.model),  # under --fsdp, of each rank's shards
        **({"time_budget_plan": state.budget} if state.budget else {}),
        "precision": engine.precision,
        "eval_precision": PRECISION_NAMES[engine.eval_autocast],  # before and after alike (a resume setting)
        **engine.metrics(),
    }
    # MFU on a CUDA device of known peak, peak memory (a CPU's: the process's resident memory, labelled so)
    metrics.update(device_figures(engine.device, engine.precision,
                                  loop.flops,
                                  metrics["train_tokens_per_second"], d.world))
    metrics["rank_weights_disagree"] = sharding.disagreeing(metrics["rank_weights_sha256"],
                                                               sharding.replica_groups(d, run.model))
    if metrics["rank_weights_disagree"]:
        groups = "; ".join(", ".join(f"rank {r} {metrics['rank_weights_sha256'][r]}" for r in g)
                           for g in metrics["rank_weights_disagree"])
        say(f"warning: ranks that must hold the same weights ended with different ones ({groups}); the model saved "
            f"is what rank 0 gathered")
    if d.main:  # the tokenizer-free figures, with the full model
        metrics.update(vocabulary_metrics(run, full_model, engine.device))
        if run.sentence is not None:
            metrics["sentence_modules"] = list(run.sentence.modules)
    for m in checks:  # the probes exist on rank 0 only, which scores them with the full model
        entry = scored[m.name] if not m.on_main else m.score(full_model, f"{m.name.capitalize()} (after)")
        say(m.line("After training", entry))
        getattr(dash, m.name)(state.step, entry)
        metrics.update(m.metrics(getattr(state, f"{m.name}_before"), entry))
    engine.close()
    try:
        if d.main:  # rank 0 writes the model, metrics, plots and card, once; the others wait for it in close()
            write_output(cfg, Path(cfg.output.output_dir), full_model, run.tokenizer, metrics,
                         run.vocabulary.words if run.vocabulary else None, run.sentence)
            dash.final(state.step, metrics, Path(cfg.output.output_dir) / "README.md")  # the model card, as written
    finally:
        distributed.close(d)
    return TrainResult(output_dir=Path(cfg.output.output_dir), metrics=metrics, rank=d.rank)
