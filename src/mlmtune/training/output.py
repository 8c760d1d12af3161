"""A run's output folder: checked before any work (`check_output_dir`), and written at the end (`write_output`:
an ordinary Hugging Face model folder plus the run's records, its metrics and card), with the metrics every engine
reports (`run_metrics`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlmtune.config import CONFIG_FILENAME, TrainConfig
from mlmtune.errors import MlmtuneError, say
from mlmtune.hub import push_folder
from mlmtune.lock import LOCK_NAME, FolderLock
from mlmtune.model.sentence import SentenceEncoder, copy_files
from mlmtune.options import save_config
from mlmtune.training import checkpoint as ckpt
from mlmtune.training.card import plot_curves, write_metrics, write_model_card
from mlmtune.training.run import Run


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    rank: int = 0  # this process's rank: under torchrun only rank 0 reports


def check_output_dir(out: Path, resume: bool, lock: FolderLock | None = None) -> None:
    """Refuse to write over the work of another run, and fail now rather than after training. `lock`: taken
    here, before the folder is read, so that a second run on it is refused while this one runs."""
    if out.exists() and not out.is_dir():
        raise MlmtuneError(f"--output-dir {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlmtuneError(f"--output-dir {out} is not writable: {e.strerror or e}") from None
    if lock is not None:
        lock.acquire()
    try:
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            if not resume:
                raise MlmtuneError(f"--output-dir {out} is not empty; pass --resume to continue the run in it, "
                                   f"or choose another --output-dir")
            if not ckpt.is_run_dir(out):
                raise MlmtuneError(f"--output-dir {out} holds files but no mlmtune run (no checkpoints/ or "
                                   f"{CONFIG_FILENAME}); --resume continues a run: choose another --output-dir")
        try:
            fd, probe = tempfile.mkstemp(prefix=".tmp-write-test-", dir=out)  # a name nobody else uses
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise MlmtuneError(f"--output-dir {out} is not writable: {e.strerror or e}") from None
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def run_metrics(cfg: TrainConfig, run: Run, state: ckpt.TrainState, after: dict | None) -> dict[str, Any]:
    """The metrics every engine reports, from the loop state and the last evaluation."""
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
        "head_warmup_steps": cfg.optim.head_warmup_steps,
        "time_budget": cfg.schedule.time_budget,
        "train_tokens": state.train_tokens,
        "train_seconds": round(state.train_seconds, 3),
        "train_tokens_per_second": round(state.train_tokens / state.train_seconds, 1) if state.train_seconds else None,
        "train_blocks": run.n_train,
        "streaming": cfg.data.streaming,
        "eval_blocks": 0 if run.eval_blocks is None else len(run.eval_blocks),
        "block_size": cfg.data.block_size,
        "dropped_tokens": run.stats.total_dropped,
        "backend": cfg.backend,
        "masking": cfg.masking,
        **(_token_metrics(before, after) if cfg.masking != "token" else {}),
    }


def _token_metrics(before: dict | None, after: dict | None) -> dict[str, Any]:
    """A whole-word or span run scored on the token scheme's masks too: one yardstick for every scheme."""
    return {"token_eval_loss_before": before.get("token_eval_loss") if before else None,
            "token_perplexity_before": before.get("token_perplexity") if before else None,
            "token_eval_loss_after": after.get("token_eval_loss") if after else None,
            "token_perplexity_after": after.get("token_perplexity") if after else None}


def write_output(cfg: TrainConfig, out: Path, model, tokenizer, metrics: dict[str, Any],
                 added: list[str] | None = None, sentence: SentenceEncoder | None = None) -> None:
    """The output folder: an ordinary Hugging Face model folder plus the run's records (added_tokens.txt: the
    words --add-tokens added) and, from a sentence encoder, its sentence-transformers files (the Transformer module
    is the folder itself: the trained weights and tokenizer); then the push."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if added:
            (folder / "added_tokens.txt").write_text("".join(f"{w}\n" for w in added), encoding="utf-8")
        if sentence is not None:
            copy_files(sentence, folder)
        save_config(cfg, folder)
        write_metrics(metrics, folder)
        plot_curves(metrics, folder)
        write_model_card(cfg, metrics, folder, tokenizer.mask_token, name=out.resolve().name)

    ckpt.write_final(out, write)
    if cfg.output.push_to_hub:
        repo = cfg.output.hub_model_id or out.resolve().name
        say(f"Pushed to {push_folder(str(out), repo)}")
