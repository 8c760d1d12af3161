"""The downstream task's settings: `TaskConfig` (`mlmtune probe --task`) and `DownstreamConfig` (the
`--downstream` group of train and eval, which makes a `TaskConfig`).

Frozen and validated in `__post_init__`, as every config of `config.py`; each field's docstring is its `--help`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlmtune.errors import require

PROBE_METHODS = ("linear", "finetune")
QUICKSTART_TASK = "builtin:python-docs-chapters"


@dataclass(frozen=True)
class TaskConfig:
    """A downstream task and how the probe learns it (`mlmtune probe`; `train --downstream` makes one from
    `DownstreamConfig`)."""

    task: str | None = None
    """Labelled texts: a .jsonl/.json/.csv/.parquet file, a folder holding train.* and test.* files, a Hub
    dataset id (its train and test or validation splits), or builtin:python-docs-chapters."""
    text_field: str = "text"
    """Column holding the text; a dotted path reaches into nested records."""
    label_field: str = "label"
    """Column holding the label (any type: each distinct value is a class)."""
    test_size: float = 0.2
    """When the task has no test split: the share of each class held out, drawn by the seed."""
    max_examples: int | None = None
    """Use at most this many texts of the task (and as many of its own test split): one stratified sample drawn
    by the first seed, which every run and every model shares."""
    method: str = "linear"
    """linear: the encoder frozen, logistic regression on its features (mean of the last layer over the real
    tokens, and the first token; a sentence encoder's own sentence embedding); finetune:
    AutoModelForSequenceClassification trained whole, a short fixed recipe."""
    seeds: int = 3
    """Runs per model, seeds seed, seed+1, ...: each draws its own split (when the task has none) and, with
    finetune, its own classifier, order and dropout. Scores are their mean and standard deviation."""
    epochs: float = 3
    """finetune: passes over the task's training split."""
    learning_rate: float = 5e-5
    """finetune: AdamW's peak learning rate, decayed linearly to 0 after 10% warm-up."""
    batch_size: int = 16
    """Texts per forward pass (finetune: per optimizer step)."""
    max_length: int = 128
    """Tokens per text (longer texts are cut; at most the model's positions)."""

    def __post_init__(self):
        require(self.method in PROBE_METHODS, f"--method must be one of {', '.join(PROBE_METHODS)}, "
                f"got {self.method!r}")
        require(self.seeds >= 1, f"--seeds must be a positive integer, got {self.seeds}")
        require(0 < self.test_size < 1, f"--test-size must be in (0, 1), got {self.test_size}")
        require(self.max_examples is None or self.max_examples >= 2, "--max-examples must be at least 2")
        require(math.isfinite(self.epochs) and self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning-rate must be positive, got {self.learning_rate}")
        require(self.batch_size >= 1, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.max_length >= 4, f"--max-length must be at least 4, got {self.max_length}")
        require(bool(self.text_field) and bool(self.label_field), "--text-field and --label-field must not be empty")


@dataclass(frozen=True)
class DownstreamConfig:
    """`train --downstream` and `eval --downstream`: the probe of `mlmtune probe` before and after training."""

    downstream: str | None = None
    """A downstream task scored before and after training (as `mlmtune probe --task`): labelled texts in a file, a
    folder with train.* and test.* files, a Hub dataset, or builtin:python-docs-chapters; none to turn it off."""
    downstream_text_field: str = "text"
    """The task's text column."""
    downstream_label_field: str = "label"
    """The task's label column."""
    downstream_method: str = "linear"
    """linear (logistic regression on the frozen encoder's features) or finetune (a short fine-tune)."""
    downstream_seeds: int = 3
    """Runs of the probe, each with its own seed (and split, when the task has none)."""
    downstream_max_examples: int | None = None
    """Use at most this many texts of the task (and as many of its own test split): a stratified sample."""

    def task(self) -> TaskConfig | None:
        """The probe's settings (the finetune recipe at `mlmtune probe`'s defaults), or None when off."""
        if self.downstream is None or self.downstream.strip().lower() == "none":
            return None
        return TaskConfig(task=self.downstream, text_field=self.downstream_text_field,
                          label_field=self.downstream_label_field, method=self.downstream_method,
                          seeds=self.downstream_seeds, max_examples=self.downstream_max_examples)

    def __post_init__(self):
        self.task()  # validates the method, seeds and fields
