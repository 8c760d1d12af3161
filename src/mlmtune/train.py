"""train(cfg): the PyTorch training loop. Reads top to bottom: data, masks, before-eval, steps, after-eval.

What a run is (folder, model, blocks, step counts, metrics, output) lives in `run.py`, shared with
the Keras engine; the step's forward and backward in `forward.py`; what each step trains on in
`feed.py`; the ranks in `distributed.py`. This file holds the loop and the pieces only it uses.

Reproducibility is by construction (`feed.StepBatches`), not by saved RNG state: the order of blocks in epoch e
comes from a generator seeded with (seed, e), and the masks and dropout of optimizer step s
from generators seeded with (seed, s). So a resumed run sees exactly the batches, masks and
dropout an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mlmtune import checkpoint as ckpt
from mlmtune import dashboard, distributed
from mlmtune.config import TrainConfig
from mlmtune.errors import MlmtuneError
from mlmtune.evaluate import EvalResult, perplexity_of
from mlmtune.feed import Prefetcher, StepBatches
from mlmtune.forward import MaskedLMLoss, backward_masked, compile_encoder, freeze_encoder
from mlmtune.masking import SEED_MIX, iter_eval_masks, rank_shares
from mlmtune.model import PRECISION_NAMES, resolve_device, resolve_precision
from mlmtune.run import (
    Run,
    TrainResult,
    check_output_dir,
    eval_entry,
    load_run,
    log,
    resolve_steps,
    run_metrics,
    start_or_resume,
    step_plan,
    stop_on_ctrl_c,
    write_output,
)
from mlmtune.schedule import lr_factor
from mlmtune.stream import BlockStream

__all__ = ["TrainResult", "train"]

_RANK_MIX = 7_919_000_011  # spreads the ranks' dropout apart; rank 0 draws what a single process draws


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights, as the Trainer does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    if cfg.backend == "keras":
        from mlmtune.keras.train import train_keras

        return train_keras(cfg, progress=progress, on_step=on_step)
    with deterministic_kernels(cfg.deterministic):
        return _train(cfg, progress, on_step)


def _train(cfg: TrainConfig, progress: bool, on_step: Callable[[int, float], None] | None) -> TrainResult:
    out = Path(cfg.output_dir)
    d = distributed.init()  # one process unless torchrun / accelerate launched several
    say = log if d.main else (lambda message: None)
    if not cfg.fsdp and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        say("accelerate launch with an FSDP config: sharding as --fsdp does (its other fsdp_* choices are not read)")
        cfg = dataclasses.replace(cfg, fsdp=True)
    if cfg.fsdp:
        distributed.require_ranks(d, "--fsdp")
    if d.enabled and cfg.device:
        raise MlmtuneError("--device is for one process; under torchrun each rank takes its LOCAL_RANK GPU")
    device = distributed.device_for(d) if d.enabled else resolve_device(cfg.device)  # checked before the data
    progress = progress and d.main
    distributed.main_first(d, lambda: check_output_dir(out, cfg.resume) if d.main else None)
    distributed.check_shared_dir(d, out)  # several machines: checkpoints must reach every rank
    dashboard.require(cfg.report_to)
    run = load_run(cfg, d, say)
    model = run.model
    fsdp = distributed.FSDP(d, model) if cfg.fsdp else None  # takes rank 0's copy for writing while on the CPU
    model.to(device)
    distributed.broadcast_parameters(d, model)
    cfg = resolve_steps(cfg, d, model, run.tokenizer, run.train_blocks, device, say)
    if cfg.compile:  # after the budget's probe, which times eager steps on a copy
        compile_encoder(model)
    precision = Precision.choose(cfg.precision, device, sharded=fsdp is not None)
    say(f"Training precision: {precision.describe()}; evaluation in fp32"
        + (f"; {d.world} processes{' (FSDP)' if fsdp else ''}, {cfg.batch_size} blocks each per micro-batch"
           if d.enabled else ""))
    sharded_root = fsdp.shard() if fsdp else None  # before the optimizer, which then holds the shards
    evaluate = evaluator(cfg, d, run, sharded_root if fsdp else model, device, progress)
    steps_per_epoch, total_steps, save_every = step_plan(cfg, run.train_blocks, d.world)
    optimizer, scheduler = make_optimizer(cfg, model, total_steps)
    # what checkpoints read and write: the model and optimizer, or under FSDP their full (gathered) states
    weights, full_optimizer = (fsdp, fsdp.optimizer(optimizer)) if fsdp else (model, optimizer)
    state, resumed, dash = start_or_resume(cfg, out, weights, full_optimizer, scheduler, evaluate, say,
                                           dashboard_on=d.main)
    precision.resume(state if resumed else None)
    feed = Prefetcher(step_batches(cfg, run, state.step, d, progress), state.step, total_steps,
                      pin_memory=device.type == "cuda")  # the next steps are read, masked (and pinned) in a thread

    def writable() -> torch.nn.Module | None:
        """The model with its full weights on rank 0 (under FSDP every rank takes part in gathering them)."""
        return fsdp.full_model() if fsdp else model

    def save() -> Path:
        """Rank 0 writes the checkpoint; every rank holds the same weights and state (or its shards of them)."""
        state.grad_scaler = precision.scaler_state()
        full, optimizer_state = writable(), full_optimizer.state_dict()
        if d.main:
            return ckpt.save_checkpoint(out, full, optimizer_state, scheduler.state_dict(), state,
                                        cfg.save_total_limit)
        return ckpt.checkpoints_dir(out) / f"step-{state.step:07d}"

    model.train()
    head_only = state.step < cfg.head_warmup_steps  # the first steps fit a new head, the encoder frozen
    freeze_encoder(model, head_only)
    step_loss = sharded_root if fsdp else distributed.wrap(d, MaskedLMLoss(model))  # DDP on several ranks
    bar = tqdm(total=total_steps, initial=state.step, desc="Training", disable=not progress, dynamic_ncols=True)
    window = LogWindow(state, device)
    my_tokens = 0  # what this rank trained on in this process (shows every rank took part)
    stop_requested = threading.Event()
    restore_sigint = stop_on_ctrl_c(stop_requested)
    try:
        while state.step < total_steps:
            if head_only and state.step >= cfg.head_warmup_steps:
                head_only = False
                freeze_encoder(model, False)
                if not fsdp:  # DDP registers its hooks on the parameters that train: the encoder's too now
                    step_loss = distributed.wrap(d, MaskedLMLoss(model))
                bar.write(f"step {state.step}: head warm-up done, training the whole model")
            t0 = time.perf_counter()
            # this rank's share of the step's micro-batches, masked from (seed, step, rank)
            batches, global_blocks, n_masked, my_blocks = next_batches(feed, state.step, window, save)
            my_tokens += my_blocks * cfg.data.block_size
            torch.manual_seed(cfg.seed * SEED_MIX + state.step + d.rank * _RANK_MIX)  # dropout of this step
            # token-weighted loss over the whole accumulated batch; this rank's nll stays a device tensor
            step_nll = backward_masked(step_loss, batches, n_masked, device, precision.autocast, head_only,
                                       precision.scaler, d.world)
            precision.step(optimizer, scheduler, model.parameters(), cfg.max_grad_norm)
            state.step += 1
            if on_step is not None and device.type == "cuda":
                torch.cuda.synchronize(device)  # only for a caller that times steps: the loop itself never waits
            seconds = time.perf_counter() - t0
            state.train_tokens += global_blocks * cfg.data.block_size
            window.add(step_nll / max(n_masked, 1), global_blocks * cfg.data.block_size)
            bar.update(1)
            log_step = state.step % cfg.logging_steps == 0 or state.step == total_steps
            if log_step:  # the one host sync (and, on several ranks, the one collective) of the window
                loss, tokens_per_second = window.flush(d)
                state.train_loss.append({"step": state.step, "loss": loss})
                bar.set_postfix(loss=f"{loss:.4f}")
                dash.train(state.step, loss, scheduler.get_last_lr()[0], tokens_per_second)
            epoch_end = state.step % steps_per_epoch == 0
            with window.paused(epoch_end or state.step == total_steps or state.step % save_every == 0):
                if epoch_end or state.step == total_steps:  # evaluation and checkpoints are not training time
                    record_eval(state, evaluate(f"Eval (step {state.step})"), steps_per_epoch,
                                run.train_blocks is None, bar.write, dash)
                    model.train()
                if state.step % save_every == 0 or state.step == total_steps:
                    save()
            if on_step is not None:
                on_step(state.step, seconds)
            # all ranks stop after the same step when any of them got Ctrl-C; on several ranks they agree
            # on it when they log, not at every step
            if (log_step or not d.enabled) and distributed.all_reduce_sum(
                    d, [float(stop_requested.is_set())], device)[0]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        window.count_time()
        saved_to = save()  # a consistent state: the loop stops between steps
        raise MlmtuneError(f"interrupted at step {state.step}; checkpoint saved in {saved_to}, "
                           f"continue with the same command and --resume") from None
    finally:
        feed.close()
        restore_sigint()
        dash.close()
    bar.close()
    del step_loss  # DDP's hooks and buffers, before the process group goes
    return finish(cfg, d, out, run, writable(), state, evaluate, device, precision.name, my_tokens, say)


@contextlib.contextmanager
def deterministic_kernels(on: bool):
    """--deterministic: only deterministic kernels while the run lasts (the setting is put back after it).
    cuBLAS needs a fixed workspace for that, read from CUBLAS_WORKSPACE_CONFIG when it starts."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class Precision:
    """The training step's arithmetic: autocast dtype (None: fp32) and, for fp16, the gradient scaler
    (the loss is scaled; gradients are unscaled before clipping; a step with an overflow is skipped)."""

    def __init__(self, autocast: torch.dtype | None, device: torch.device):
        self.autocast = autocast
        self.name = PRECISION_NAMES[autocast]
        self.scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None

    @classmethod
    def choose(cls, choice: str, device: torch.device, sharded: bool = False) -> Precision:
        if device.type == "cuda":  # TF32 for the matmuls that stay fp32 (evaluation, --precision fp32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        autocast = resolve_precision(choice, device)
        if sharded and autocast == torch.float16:
            raise MlmtuneError("--fsdp on this GPU would train in fp16, whose gradient scaler is not shared over "
                               "the shards yet: pass --precision fp32, or train without --fsdp")
        return cls(autocast, device)

    def describe(self) -> str:
        return self.name if self.autocast is None else f"{self.name} autocast"

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def resume(self, state: ckpt.TrainState | None) -> None:
        if self.scaler is not None and state is not None and state.grad_scaler:
            self.scaler.load_state_dict(state.grad_scaler)

    def step(self, optimizer, scheduler, params, max_grad_norm: float) -> None:
        """Unscale (fp16), clip, update, advance the schedule, clear the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


class LogWindow:
    """The steps since the last log line: their losses (device tensors), tokens and training time.

    Time is counted at log lines and around evaluations and saves, after waiting for the GPU: steps
    are queued without a sync, so only then is the time the GPU's and not the launches'.
    """

    def __init__(self, state: ckpt.TrainState, device: torch.device):
        self.state, self.device = state, device
        self.losses: list[torch.Tensor] = []
        self.tokens, self.seconds = 0, 0.0
        self.clock = time.perf_counter()  # where the training time not yet counted began

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def count_time(self) -> float:
        """Add the training time since the last count to the run's total; return it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
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

    def flush(self, d: distributed.Dist) -> tuple[float, float | None]:
        """The window's mean loss over all ranks and its tokens per second; starts a new window."""
        shares = distributed.all_reduce_sum(d, torch.stack(self.losses).tolist(), self.device)
        self.count_time()
        speed = self.tokens / self.seconds if self.seconds else None
        self.losses, self.tokens, self.seconds = [], 0, 0.0
        return sum(shares) / len(shares), speed


def make_optimizer(cfg: TrainConfig, model, total_steps: int):
    """AdamW (fused: one kernel over all parameters, 5x faster than foreach on CPU for DistilRoBERTa) and
    the warm-up/decay schedule, with the head warm-up's own rate first."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, cfg.warmup_steps, cfg.head_warmup_steps,
        (cfg.head_learning_rate or cfg.learning_rate) / cfg.learning_rate))
    return optimizer, scheduler


def evaluator(cfg: TrainConfig, d: distributed.Dist, run: Run, model: torch.nn.Module, device: torch.device,
              progress: bool) -> Callable[[str], EvalResult | None]:
    """fp32 perplexity of `model` (the run's, or its FSDP root) on the eval split, with the masks
    `iter_eval_masks` draws from the seed, each chunk shared evenly over the ranks and the sums added up
    token-weighted; None without an eval split."""
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def evaluate(desc: str) -> EvalResult | None:
        if run.eval_blocks is None:
            return None
        chunks = iter_eval_masks(run.eval_blocks, run.masker, cfg.seed)
        if not d.enabled:
            return perplexity_of(model, chunks, eval_bs, progress=progress, desc=desc, total=len(run.eval_blocks))
        return perplexity_of(model, rank_shares(chunks, d.rank, d.world), eval_bs, progress=progress, desc=desc,
                             total=-(-len(run.eval_blocks) // d.world),
                             reduce=lambda v: distributed.all_reduce_sum(d, v, device))

    return evaluate


def step_batches(cfg: TrainConfig, run: Run, first_step: int, d: distributed.Dist, progress: bool) -> StepBatches:
    """Step -> this rank's masked micro-batches, from the blocks or (--streaming) a stream started at the step."""
    stream = None
    if run.train_blocks is None:
        stream = BlockStream(cfg.data, run.tokenizer, cfg.seed, cfg.batch_size * d.world).batches(
            start=first_step * cfg.gradient_accumulation_steps, progress=progress)
    return StepBatches(run.train_blocks, stream, run.masker, cfg.seed, cfg.batch_size, cfg.gradient_accumulation_steps,
                       d.rank, d.world)


def next_batches(feed: Prefetcher, step: int, window: LogWindow, save: Callable[[], Path]):
    """The step's batches; a stream that stops parsing mid-run saves what was trained before it raises."""
    try:
        return feed.get(step)
    except MlmtuneError as e:
        window.count_time()
        saved = f"; checkpoint saved in {save()}, continue with --resume" if step else ""
        raise MlmtuneError(f"{e}{saved}") from None


def record_eval(state: ckpt.TrainState, result: EvalResult | None, steps_per_epoch: int, streaming: bool,
                write: Callable[[str], None], dash: dashboard.Dashboard) -> None:
    if result is None:
        return
    entry = {"epoch": None if streaming else round(state.step / steps_per_epoch, 4), "step": state.step,
             **eval_entry(result)}
    state.epochs.append(entry)
    where = f"step {state.step}" if streaming else f"epoch {entry['epoch']:g} step {state.step}"
    write(f"{where}: eval loss {result.loss:.4f}, perplexity {result.perplexity:,.2f}")
    dash.eval(state.step, result.loss, result.perplexity)


def finish(cfg: TrainConfig, d: distributed.Dist, out: Path, run: Run, full_model, state: ckpt.TrainState,
           evaluate: Callable[[str], EvalResult | None], device: torch.device, precision: str, my_tokens: int,
           say: Callable[[str], None]) -> TrainResult:
    """Metrics (with each rank's tokens and weight digest); rank 0 writes the output folder from `full_model`
    (the model, or under FSDP its gathered copy); all leave together."""
    run.model.eval()
    after = state.epochs[-1] if state.epochs and state.epochs[-1]["step"] == state.step else None
    if after is None and run.eval_blocks is not None:  # resumed a finished run with no eval on record
        after = {"step": state.step, **eval_entry(evaluate("Eval (after)"))}
    metrics = {
        **run_metrics(cfg, run, state, after),
        "device": device.type,
        "world_size": d.world,
        "rank_train_tokens": [int(t) for t in distributed.all_reduce_sum(
            d, [my_tokens if r == d.rank else 0 for r in range(d.world)], device)],
        "rank_weights_sha256": distributed.weights_digests(d, run.model),
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
    }
    if len(set(metrics["rank_weights_sha256"])) > 1:
        say(f"warning: the ranks ended with different weights ({', '.join(metrics['rank_weights_sha256'])}); "
            f"the model saved is rank 0's")
    try:
        if d.main:  # rank 0 writes the model, metrics, plots and card, once; the others wait for it in close()
            write_output(cfg, out, full_model, run.tokenizer, metrics)
    finally:
        distributed.close(d)
    return TrainResult(output_dir=out, metrics=metrics, rank=d.rank)
