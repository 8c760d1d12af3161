"""Checkpoints under OUTPUT_DIR/checkpoints: written whole or not at all, found again for --resume.

A checkpoint is a folder `step-0000123` holding the weights (safetensors), the optimizer and
scheduler states, and `state.json` (step, history, the config it was made with). It is written
under a temporary name and renamed when complete, so a folder with the final name is always
whole; leftovers of an interrupted save are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from mlmtune.errors import MlmtuneError

STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d+)$")

# Settings a resumed run must share with the run it continues; anything else may change.
RESUME_KEYS = ("model", "data", "mlm_probability", "epochs", "max_steps", "learning_rate", "weight_decay",
               "batch_size", "gradient_accumulation_steps", "warmup_steps", "max_grad_norm", "seed")


@dataclass
class TrainState:
    """What the loop needs, beyond model/optimizer/scheduler, to continue exactly."""

    step: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    eval_before: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    """Write a checkpoint atomically and keep only the newest `keep`."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    diffs = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diffs)
        raise MlmtuneError(
            f"--resume: {where} was made with other settings ({detail}); use the same settings "
            f"or another --output-dir"
        )


def read_state(path: Path) -> TrainState:
    try:
        return TrainState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise MlmtuneError(f"--resume: checkpoint {path} cannot be read ({type(e).__name__}); "
                           f"delete it to resume from an older one") from None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer and scheduler in place; returns the loop state."""
    state = read_state(path)
    try:
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise MlmtuneError(f"--resume: checkpoint {path} cannot be read ({type(e).__name__}); "
                           f"delete it to resume from an older one") from None
    return state
