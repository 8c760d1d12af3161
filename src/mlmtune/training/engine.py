"""What `train()` asks of a training engine (`Engine`), and the engine of each --backend: PyTorch's
(`torch_engine.py`) or Keras' (`keras/engine.py`). Everything else a run does (data, masks, the learning rate
of each step, evaluation, checkpoints, metrics, the output folder) is `train.py`'s, the same for every engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from mlmtune import distributed
from mlmtune.config import TrainConfig
from mlmtune.data.blocks import Blocks
from mlmtune.training import checkpoint as ckpt
from mlmtune.training.budget import Probe
from mlmtune.training.torch_engine import TorchEngine


class Engine(Protocol):
    """What `train()` asks of a training engine; everything else (data, masks, the learning rate of each step,
    evaluation, checkpoints, metrics, the output folder) is `train()`'s, the same for every engine."""

    dist: distributed.Dist
    device: torch.device  # where the PyTorch model evaluates
    precision: str  # what the steps compute in: fp32, bf16 or fp16
    eval_autocast: torch.dtype | None  # what the evaluations run under (None: fp32), set by start()
    pin_memory: bool  # batches are pinned for asynchronous copies to a GPU

    @classmethod
    def open(cls, cfg: TrainConfig) -> tuple[Engine, TrainConfig]:
        """Join the job and refuse what this engine cannot do, before any data is read."""

    @staticmethod
    def check_model(model) -> str | None:
        """Refuse (MlmtuneError) a model this engine cannot train; a line on what it will train, or None."""

    @staticmethod
    def probe(cfg: TrainConfig, model, tokenizer, train_blocks: Blocks, device: torch.device) -> Probe:
        """Seconds per optimizer step (full, or head-only) as this engine trains, for --time-budget."""

    def session(self):
        """A context manager around the whole run (deterministic kernels for PyTorch)."""

    def attach(self, model) -> None:
        """Take the loaded model (a new head already seeded), before the step counts are planned."""

    def start(self, cfg: TrainConfig, tokenizer) -> None:
        """Set up the optimizer and whatever the steps need, from the run's final config."""

    def describe(self) -> str: ...

    def restore(self, path: Path, state: ckpt.TrainState) -> None:
        """A checkpoint's weights and optimizer state, read into the engine."""

    def set_phase(self, head_only: bool) -> None:
        """Train the new head alone (the encoder frozen), or the whole model, from the next step on."""

    def step(self, step: int, batches: list, n_masked: int, learning_rate: float, head_only: bool):
        """One optimizer step over this rank's micro-batches; returns this rank's share of the step's mean loss
        (a 0-d tensor or a float: nothing here waits for a GPU)."""

    def sync(self) -> None:
        """Wait for queued device work (before a clock is read)."""

    def eval_model(self) -> torch.nn.Module:
        """The PyTorch model (or sharded root) that evaluation runs, holding the current weights."""

    def shard_writer(self, state: ckpt.TrainState) -> Callable[[Path], None] | None:
        """What writes this rank's shards of a sharded checkpoint (--fsdp), or None for full files."""

    def checkpoint(self, state: ckpt.TrainState) -> tuple[torch.nn.Module | None, dict]:
        """The full model (rank 0; None elsewhere) and the optimizer state to write; every rank calls it."""

    def output_model(self) -> torch.nn.Module | None:
        """The full model to write as the output (rank 0); every rank calls it."""

    def metrics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def engine_class(backend: str) -> type[Engine]:
    """The engine of a --backend. Keras' is imported only then: keras and tensorflow are an optional
    dependency (`require` says how to install them) that takes seconds to import."""
    if backend == "keras":
        from mlmtune.keras import require

        require()
        from mlmtune.keras.engine import KerasEngine

        return KerasEngine
    return TorchEngine


