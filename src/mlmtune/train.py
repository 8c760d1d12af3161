"""train(cfg): the one training loop. Reads top to bottom: data, masks, before-eval, steps, after-eval.

Reproducibility is by construction (`feed.StepBatches`), not by saved RNG state: the order of blocks in epoch e
comes from a generator seeded with (seed, e), and the masks and dropout of optimizer step s
from generators seeded with (seed, s). So a resumed run sees exactly the batches, masks and
dropout an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mlmtune import checkpoint as ckpt
from mlmtune import dashboard, distributed
from mlmtune.blocks import Blocks, BlockStats, build_blocks, prepare_blocks
from mlmtune.check import WARNING, Report, check_data, check_tokenizer
from mlmtune.config import CONFIG_FILENAME, TrainConfig, save_config, to_dict
from mlmtune.errors import MlmtuneError
from mlmtune.evaluate import EvalResult, perplexity_of
from mlmtune.feed import Prefetcher, StepBatches
from mlmtune.forward import MaskedLMLoss, backward_masked, freeze_encoder
from mlmtune.hub import push_folder
from mlmtune.masking import SEED_MIX, Masker, iter_eval_masks
from mlmtune.model import (
    PRECISION_NAMES,
    check_block_size,
    has_new_head,
    load_model,
    pick_device,
    resolve_precision,
)
from mlmtune.report import plot_curves, write_metrics, write_model_card
from mlmtune.schedule import lr_factor, plan_budget, steps_for
from mlmtune.stream import BlockStream, held_out_texts

_RANK_MIX = 7_919_000_011  # spreads the ranks' dropout apart; rank 0 draws what a single process draws
AUTO_HEAD_SHARE = 0.1  # of a run's steps that train a new head alone, when no count or budget is given
DEFAULT_HEAD_LR = 1e-3  # Adam's usual rate for fitting a linear probe, whatever --learning-rate the encoder gets


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse to write over the work of another run, and fail now rather than after training."""
    if out.exists() and not out.is_dir():
        raise MlmtuneError(f"--output-dir {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise MlmtuneError(f"--output-dir {out} is not empty; pass --resume to continue the run in it, "
                               f"or choose another --output-dir")
        if not ckpt.is_run_dir(out):
            raise MlmtuneError(f"--output-dir {out} holds files but no mlmtune run (no checkpoints/ or "
                               f"{CONFIG_FILENAME}); --resume continues a run: choose another --output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-test-", dir=out)  # a name nobody else uses
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MlmtuneError(f"--output-dir {out} is not writable: {e.strerror or e}") from None


def stop_on_ctrl_c(event: threading.Event) -> Callable[[], None]:
    """First Ctrl-C asks the loop to stop after the current step (which it saves); a second stops
    at once. Returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        log("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights, as the Trainer does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _eval_entry(result: EvalResult) -> dict[str, Any]:
    return {"eval_loss": result.loss, "perplexity": result.perplexity, "masked_tokens": result.masked_tokens}


def start_or_resume(cfg: TrainConfig, out: Path, model, optimizer, scheduler,
                    evaluate: Callable[[str], EvalResult | None], say: Callable[[str], None],
                    dashboard_on: bool = True) -> tuple[ckpt.TrainState, bool, dashboard.Dashboard]:
    """The run's state, whether it was resumed, and its dashboard: with --resume the newest checkpoint's
    (weights and optimizer loaded into `model`, `optimizer`, `scheduler`), else a new state holding the
    evaluation before training."""
    config_dict = to_dict(cfg)
    resumed = ckpt.resume_latest(out, model, optimizer, scheduler, config_dict, say) if cfg.resume else None
    if resumed is not None:
        state = resumed
    else:
        if cfg.resume:
            say(f"--resume: no checkpoint in {out}, starting from the beginning")
        state = ckpt.TrainState(config=config_dict)
        before = evaluate("Eval (before)")
        state.eval_before = _eval_entry(before) if before else None
        if before:
            say(f"Before training: eval loss {before.loss:.4f}, perplexity {before.perplexity:,.2f}")
    dash = dashboard.Dashboard(cfg.report_to, out, start_step=state.step, enabled=dashboard_on)
    if resumed is None and state.eval_before:
        dash.eval(0, state.eval_before["eval_loss"], state.eval_before["perplexity"])
    return state, resumed is not None, dash


def _held_out_blocks(cfg: TrainConfig, tokenizer):
    """With --streaming: blocks of the first --eval-records records, the eval split."""
    from datasets import Dataset, DatasetDict

    if not cfg.data.eval_records:
        return DatasetDict(), BlockStats({}, {}, {})
    texts = held_out_texts(cfg.data)
    return build_blocks(DatasetDict(test=Dataset.from_dict({"text": texts})), tokenizer, cfg.data.block_size)


@dataclass
class Run:
    """What a run trains on and with: model, tokenizer, blocks, masker (the same for every backend)."""

    model: Any
    tokenizer: Any
    stats: BlockStats
    train_blocks: Blocks | None  # None: a stream, read as it trains
    eval_blocks: Blocks | None
    masker: Masker


def load_run(cfg: TrainConfig, d: distributed.Dist, say: Callable[[str], None],
             check_model: Callable[[Any], Any] | None = None) -> Run:
    """Model and tokenizer (a new seeded head when the folder has none), blocks and the preflight warnings.

    Args:
        check_model: called on the model before the data is read, to refuse one the engine cannot train.
    """
    torch.manual_seed(cfg.seed)  # a new head (or any new weight) starts the same way every run
    model, tokenizer = load_model(cfg.model)
    if check_model is not None:
        check_model(model)
    check_block_size(cfg.data.block_size, model, tokenizer)

    # text -> tokens -> blocks: tokenized once, by rank 0; the other ranks read its cache. A stream
    # is tokenized as it is read; only its held-out eval records are prepared up front.
    if cfg.data.streaming:
        blocks, stats = _held_out_blocks(cfg, tokenizer)
    else:
        blocks, stats = distributed.main_first(d, lambda: prepare_blocks(cfg.data, tokenizer, cfg.seed))
    preflight = Report()  # the cheap checks of `mlmtune check`; the errors among them have raised already
    check_tokenizer(tokenizer, preflight)
    check_data(stats, cfg.data.block_size, preflight)
    for level, message in preflight.findings:
        if level == WARNING:
            say(f"warning: {message}")
    train_blocks = Blocks(blocks["train"]) if "train" in blocks else None  # read per batch from the memory map
    eval_blocks = Blocks(blocks["test"]) if "test" in blocks else None
    n_train = "a stream of" if train_blocks is None else len(train_blocks)
    say(f"Blocks: {n_train} train, {0 if eval_blocks is None else len(eval_blocks)} eval, "
        f"{cfg.data.block_size} tokens each; {stats.total_dropped} tokens dropped by grouping")
    masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability)
    return Run(model, tokenizer, stats, train_blocks, eval_blocks, masker)


def resolve_steps(cfg: TrainConfig, d: distributed.Dist, model, tokenizer, train_blocks, device,
                  say: Callable[[str], None], probe: Callable[[bool], float] | None = None) -> TrainConfig:
    """Turn --time-budget, an automatic --head-warmup-steps and its learning rate into numbers, once per run.

    A resumed run takes the counts its checkpoints were made with; a new one measures (rank 0 probes,
    every rank gets its numbers). The returned config is the one saved with the run.
    """
    new_head = has_new_head(model)
    head = cfg.head_warmup_steps
    max_steps = cfg.max_steps
    saved = ckpt.newest_config(Path(cfg.output_dir)) if cfg.resume and cfg.time_budget is not None else None
    if saved is not None and saved.get("time_budget") == cfg.time_budget:
        max_steps, head = saved["max_steps"], saved["head_warmup_steps"]
    elif cfg.time_budget is not None:
        counts = [0, 0]
        if d.main:
            plan = plan_budget(cfg, model, tokenizer, train_blocks, new_head, device=device, probe=probe)
            say(plan.describe(cfg.time_budget))
            counts = [plan.max_steps, plan.head_warmup_steps]
        max_steps, head = (int(c) for c in distributed.all_reduce_sum(d, counts, device))
    elif head is None:
        total = cfg.max_steps if train_blocks is None else steps_for(cfg, len(train_blocks), d.world)[1]
        head = round(AUTO_HEAD_SHARE * total) if new_head else 0
        if head:
            say(f"The model has no masked-LM head: the first {head} of {total} steps train the new head alone "
                f"(--head-warmup-steps sets this)")
    head_lr = (cfg.head_learning_rate or DEFAULT_HEAD_LR) if head else None  # unused without a warm-up
    return dataclasses.replace(cfg, max_steps=max_steps, head_warmup_steps=head, head_learning_rate=head_lr)


def step_plan(cfg: TrainConfig, train_blocks: Blocks | None, world: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, steps between checkpoints). A stream has no epochs: its "epochs" are
    the evaluation and checkpoint intervals."""
    if train_blocks is None:
        steps_per_epoch, total_steps = cfg.save_steps or max(1, cfg.max_steps // 10), cfg.max_steps
    else:
        steps_per_epoch, total_steps = steps_for(cfg, len(train_blocks), world)
    return steps_per_epoch, total_steps, cfg.save_steps or steps_per_epoch


def run_metrics(cfg: TrainConfig, run: Run, state: ckpt.TrainState, after: dict | None) -> dict[str, Any]:
    """The metrics every backend reports, from the loop state and the last evaluation."""
    before = state.eval_before
    return {
        "model": cfg.model,
        "dataset": cfg.data.dataset,
        "eval_loss_before": before["eval_loss"] if before else None,
        "perplexity_before": before["perplexity"] if before else None,
        "eval_loss_after": after["eval_loss"] if after else None,
        "perplexity_after": after["perplexity"] if after else None,
        "eval_masked_tokens": before["masked_tokens"] if before else 0,
        "epochs": state.epochs,
        "train_loss": state.train_loss,
        "train_steps": state.step,
        "head_warmup_steps": cfg.head_warmup_steps,
        "time_budget": cfg.time_budget,
        "train_tokens": state.train_tokens,
        "train_seconds": round(state.train_seconds, 3),
        "train_tokens_per_second": round(state.train_tokens / state.train_seconds, 1) if state.train_seconds else None,
        "train_blocks": None if run.train_blocks is None else len(run.train_blocks),
        "streaming": cfg.data.streaming,
        "eval_blocks": 0 if run.eval_blocks is None else len(run.eval_blocks),
        "block_size": cfg.data.block_size,
        "dropped_tokens": run.stats.total_dropped,
        "backend": cfg.backend,
    }


def write_output(cfg: TrainConfig, out: Path, model, tokenizer, metrics: dict[str, Any]) -> None:
    """The output folder: an ordinary Hugging Face model folder plus the run's records; then the push."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_config(cfg, folder)
        write_metrics(metrics, folder)
        plot_curves(metrics, folder)
        write_model_card(cfg, metrics, folder, tokenizer.mask_token, name=out.resolve().name)

    ckpt.publish(out, write)
    if cfg.push_to_hub:
        repo = cfg.hub_model_id or out.resolve().name
        log(f"Pushed to {push_folder(str(out), repo)}")


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
    out = Path(cfg.output_dir)
    d = distributed.init()  # one process unless torchrun / accelerate launched several
    say = log if d.main else (lambda message: None)
    progress = progress and d.main
    distributed.main_first(d, lambda: check_output_dir(out, cfg.resume) if d.main else None)
    distributed.check_shared_dir(d, out)  # several machines: checkpoints must reach every rank
    dashboard.require(cfg.report_to)
    run = load_run(cfg, d, say)
    model, tokenizer = run.model, run.tokenizer
    train_blocks, eval_blocks, masker = run.train_blocks, run.eval_blocks, run.masker

    device = distributed.device_for(d) if d.enabled else pick_device()
    model.to(device)
    distributed.broadcast_parameters(d, model)
    cfg = resolve_steps(cfg, d, model, tokenizer, train_blocks, device, say)
    autocast_dtype = resolve_precision(cfg.precision, device)
    precision = PRECISION_NAMES[autocast_dtype]
    # fp16's narrow range needs the loss scaled (and the gradients unscaled before clipping)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    if device.type == "cuda":  # TF32 for the matmuls that stay fp32 (evaluation, --precision fp32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    say(f"Training precision: {precision if precision == 'fp32' else precision + ' autocast'}; evaluation in fp32"
        + (f"; {d.world} processes, {cfg.batch_size} blocks each per micro-batch" if d.enabled else ""))
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def evaluate(desc: str) -> EvalResult | None:
        """fp32 perplexity on the eval split, with the masks `iter_eval_masks` draws from the seed."""
        if eval_blocks is None:
            return None
        chunks = iter_eval_masks(eval_blocks, masker, cfg.seed, shard=(d.rank, d.world))
        return perplexity_of(model, chunks, eval_bs, progress=progress, desc=desc, total=len(eval_blocks) // d.world,
                             reduce=(lambda v: distributed.all_reduce_sum(d, v, device)) if d.enabled else None)

    global_batch = cfg.batch_size * d.world  # blocks per micro-batch over all ranks
    steps_per_epoch, total_steps, save_every = step_plan(cfg, train_blocks, d.world)
    # fused AdamW: one kernel over all parameters (5x faster than foreach on CPU for DistilRoBERTa)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, cfg.warmup_steps, cfg.head_warmup_steps,
        (cfg.head_learning_rate or cfg.learning_rate) / cfg.learning_rate))

    state, resumed, dash = start_or_resume(cfg, out, model, optimizer, scheduler, evaluate, say, dashboard_on=d.main)
    if resumed and scaler is not None and state.grad_scaler:
        scaler.load_state_dict(state.grad_scaler)

    stream = None
    if train_blocks is None:
        stream = BlockStream(cfg.data, tokenizer, cfg.seed, global_batch).batches(
            start=state.step * cfg.gradient_accumulation_steps, progress=progress)
    step_batches = StepBatches(train_blocks, stream, masker, cfg.seed, cfg.batch_size, cfg.gradient_accumulation_steps,
                               d.rank, d.world)

    def save() -> Path:
        """Rank 0 writes the checkpoint; every rank holds the same weights and state."""
        path = ckpt.checkpoints_dir(out) / f"step-{state.step:07d}"
        state.grad_scaler = scaler.state_dict() if scaler is not None else None
        if d.main:
            path = ckpt.save_checkpoint(out, model, optimizer, scheduler, state, cfg.save_total_limit)
        return path

    model.train()
    head_only = state.step < cfg.head_warmup_steps  # the first steps fit a new head, the encoder frozen
    freeze_encoder(model, head_only)
    step_loss = distributed.wrap(d, MaskedLMLoss(model))  # under DDP on several ranks
    bar = tqdm(total=total_steps, initial=state.step, desc="Training", disable=not progress, dynamic_ncols=True)
    window: list[torch.Tensor] = []  # losses since the last log line (on the device), and their seconds and tokens
    window_time, window_tokens = 0.0, 0
    stop_requested = threading.Event()
    my_tokens = 0  # what this rank trained on in this process (shows every rank took part)
    restore_sigint = stop_on_ctrl_c(stop_requested)
    clock = [time.perf_counter()]  # where the training time not yet counted began

    def count_time() -> float:
        """Add the training time since the last count to the run's total and return it. It waits for the
        GPU first: steps are queued without a sync, so only then is the time the GPU's, not the launches'."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        elapsed, clock[0] = now - clock[0], now
        state.train_seconds += elapsed
        return elapsed

    # the next steps' batches are read, masked (and pinned, for a GPU) in a thread while this one runs
    feed = Prefetcher(step_batches, state.step, total_steps, pin_memory=device.type == "cuda")
    try:
        while state.step < total_steps:
            if head_only and state.step >= cfg.head_warmup_steps:
                head_only = False
                freeze_encoder(model, False)
                step_loss = distributed.wrap(d, MaskedLMLoss(model))  # DDP hooks for the encoder too
                bar.write(f"step {state.step}: head warm-up done, training the whole model")
            t0 = time.perf_counter()
            # this rank's share of the step's micro-batches, masked from (seed, step, rank)
            try:
                batches, global_blocks, n_masked, my_blocks = feed.get(state.step)
            except MlmtuneError as e:  # a stream that stops parsing mid-run: keep what was trained
                bar.close()
                count_time()
                saved = f"; checkpoint saved in {save()}, continue with --resume" if state.step else ""
                raise MlmtuneError(f"{e}{saved}") from None
            my_tokens += my_blocks * cfg.data.block_size
            torch.manual_seed(cfg.seed * SEED_MIX + state.step + d.rank * _RANK_MIX)  # dropout of this step

            # token-weighted loss over the whole accumulated batch; this rank's nll stays a device tensor
            step_nll = backward_masked(step_loss, batches, n_masked, device, autocast_dtype, head_only, scaler,
                                       d.world)
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1

            if on_step is not None and device.type == "cuda":
                torch.cuda.synchronize(device)  # only for a caller that times steps: the loop itself never waits
            seconds = time.perf_counter() - t0
            state.train_tokens += global_blocks * cfg.data.block_size
            window.append(step_nll / max(n_masked, 1))  # this rank's share of the step's mean loss
            window_tokens += global_blocks * cfg.data.block_size
            bar.update(1)
            log_step = state.step % cfg.logging_steps == 0 or state.step == total_steps
            if log_step:  # the one host sync (and, on several ranks, the one collective) of the window
                shares = distributed.all_reduce_sum(d, torch.stack(window).tolist(), device)
                window_time += count_time()
                state.train_loss.append({"step": state.step, "loss": sum(shares) / len(shares)})
                bar.set_postfix(loss=f"{state.train_loss[-1]['loss']:.4f}")
                dash.train(state.step, state.train_loss[-1]["loss"], scheduler.get_last_lr()[0],
                           window_tokens / window_time if window_time else None)
                window, window_time, window_tokens = [], 0.0, 0

            epoch_end = state.step % steps_per_epoch == 0
            pause = epoch_end or state.step == total_steps or state.step % save_every == 0
            if pause:  # evaluation and checkpoints are not training time
                window_time += count_time()
            if epoch_end or state.step == total_steps:
                result = evaluate(f"Eval (step {state.step})")
                if result:
                    entry = {"epoch": round(state.step / steps_per_epoch, 4) if stream is None else None,
                             "step": state.step,
                             **_eval_entry(result)}
                    state.epochs.append(entry)
                    where = f"step {state.step}" if stream else f"epoch {entry['epoch']:g} step {state.step}"
                    bar.write(f"{where}: eval loss {result.loss:.4f}, perplexity {result.perplexity:,.2f}")
                    dash.eval(state.step, result.loss, result.perplexity)
                model.train()
            if state.step % save_every == 0 or state.step == total_steps:
                save()
            if pause:
                clock[0] = time.perf_counter()
            if on_step is not None:
                on_step(state.step, seconds)
            # all ranks stop after the same step when any of them got Ctrl-C; on several ranks they agree
            # on it when they log, not at every step
            if (log_step or not d.enabled) and distributed.all_reduce_sum(
                    d, [float(stop_requested.is_set())], device)[0]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        count_time()
        saved_to = save()  # a consistent state: the loop stops between steps
        raise MlmtuneError(f"interrupted at step {state.step}; checkpoint saved in {saved_to}, "
                           f"continue with the same command and --resume") from None
    finally:
        feed.close()
        restore_sigint()
        dash.close()
    bar.close()
    model.eval()

    after = state.epochs[-1] if state.epochs and state.epochs[-1]["step"] == state.step else None
    if after is None and eval_blocks is not None:  # resumed a finished run with no eval on record
        result = evaluate("Eval (after)")
        after = {"step": state.step, **_eval_entry(result)}
    metrics = {
        **run_metrics(cfg, run, state, after),
        "device": device.type,
        "world_size": d.world,
        "rank_train_tokens": [int(t) for t in distributed.all_reduce_sum(
            d, [my_tokens if r == d.rank else 0 for r in range(d.world)], device)],
        "rank_weights_sha256": distributed.weights_digests(d, model),
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
    }

    if len(set(metrics["rank_weights_sha256"])) > 1:
        say(f"warning: the ranks ended with different weights ({', '.join(metrics['rank_weights_sha256'])}); "
            f"the model saved is rank 0's")
    del step_loss  # DDP's hooks and buffers, before the process group goes
    if not d.main:  # rank 0 writes the model, metrics, plots and card, once; the others wait for it in close()
        distributed.close(d)
        return TrainResult(output_dir=out, metrics=metrics)

    try:
        write_output(cfg, out, model, tokenizer, metrics)
    finally:
        distributed.close(d)
    return TrainResult(output_dir=out, metrics=metrics)

