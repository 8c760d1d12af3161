"""What a run is, for every engine: its output folder, model, tokenizer and blocks, its step counts,
the evaluation before training (or the checkpoint it resumes), its metrics and its output folder.

`train.train` (PyTorch) and `keras.train.train_keras` (Keras' `model.fit`) differ only in the loop
between these; everything here is shared by both.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlmtune import checkpoint as ckpt
from mlmtune import dashboard, distributed
from mlmtune.blocks import Blocks, BlockStats, build_blocks, prepare_blocks
from mlmtune.check import WARNING, Report, check_data, check_tokenizer
from mlmtune.config import CONFIG_FILENAME, TrainConfig, save_config, to_dict
from mlmtune.errors import MlmtuneError
from mlmtune.evaluate import EvalResult
from mlmtune.hub import push_folder
from mlmtune.masking import Masker
from mlmtune.model import check_block_size, has_new_head, load_model
from mlmtune.report import plot_curves, write_metrics, write_model_card
from mlmtune.schedule import plan_budget, steps_for
from mlmtune.stream import held_out_texts

AUTO_HEAD_SHARE = 0.1  # of a run's steps that train a new head alone, when no count or budget is given
DEFAULT_HEAD_LR = 1e-3  # Adam's usual rate for fitting a linear probe, whatever --learning-rate the encoder gets


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    rank: int = 0  # this process's rank: under torchrun only rank 0 reports


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


def eval_entry(result: EvalResult) -> dict[str, Any]:
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
        state.eval_before = eval_entry(before) if before else None
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


