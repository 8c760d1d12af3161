"""TrainConfig's groups: what a run measures, how long it trains, the optimizer, the compute, the output.

`config.TrainConfig` holds one of each (`cfg.optim.learning_rate`); the flags and YAML keys name the leaves
(`--learning-rate`), as `options.flat_fields` flattens them. Each group checks its own values in
`__post_init__`; what one group asks of another (`--freeze-layers` with `--fsdp`) TrainConfig checks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlmtune.errors import MlmtuneError, require
from mlmtune.probe_config import DownstreamConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_PRECISIONS = ("train", "fp32")
REPORT_TO = ("none", "tensorboard", "mlflow", "trackio", "wandb")  # transformers' names for the same dashboards
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
EMBEDDING_EVAL = ("auto", "none")


def report_targets(report_to: str) -> tuple[str, ...]:
    """The dashboards of `--report-to` (comma-separated, as the Trainer's), in order; () for none.

    Raises:
        MlmtuneError: a name that is not one, a name given twice, or none given with others.
    """
    names = tuple(n.strip() for n in report_to.split(","))
    for n in names:
        require(n in REPORT_TO, f"--report-to: {n!r} is not one of {', '.join(REPORT_TO)} (comma-separated for "
                f"several), in {report_to!r}")
        require(names.count(n) == 1, f"--report-to names {n} twice in {report_to!r}")
    require("none" not in names or len(names) == 1, f"--report-to none reports nowhere, so it stands alone: drop it "
            f"from {report_to!r}, or give none only")
    return () if names == ("none",) else names


def parse_duration(text: str) -> float:
    """'90s', '3m', '1h30m', '2.5m' or plain seconds -> seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", s).strip():
        raise MlmtuneError(f"--time-budget {text!r} is not a duration; write e.g. 90s, 3m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)


def check_measures(cloze_words: str, embedding_eval: str) -> None:
    """--cloze-words and --embedding-eval, as train's `MeasureConfig` and `EvalConfig` both take them."""
    require(cloze_words in ("auto", "python", "none") or Path(cloze_words).is_file(),
            f"--cloze-words {cloze_words}: no such file; give a file of words, one a line, or auto, python or none")
    require(embedding_eval in EMBEDDING_EVAL, f"--embedding-eval must be one of {', '.join(EMBEDDING_EVAL)}, "
            f"got {embedding_eval!r}")


def check_batch(batch_size: int) -> None:
    """--batch-size, as train's `ScheduleConfig` and `EvalConfig` both take it."""
    require(batch_size >= 1, f"--batch-size must be a positive integer, got {batch_size}")


@dataclass(frozen=True)
class MeasureConfig:
    """What a training run measures before and after training, besides the held-out perplexity."""

    general_eval: str = "auto"
    """A general corpus scored before and after training (what the run forgot): auto (builtin:wikipedia when
    installed), none, or a --dataset value (its `text` field), on a fixed sample of 64 blocks."""
    cloze_words: str = "auto"
    """The domain cloze, top-1 and top-3 before and after training, on held-out occurrences of these words masked
    whole: auto (python on builtin:python-docs, else the training split's 100 most frequent content words),
    python (its keywords and built-ins), none, or FILE (one word a line)."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    embedding_eval: str = "auto"
    """The embedding check of a sentence encoder (a model folder with sentence-transformers' modules.json): held-out
    texts cut in two, each first half retrieving its own second half by the model's pooling, MRR@10 and recall@1
    before and after training. auto: on for a sentence encoder; none: off."""

    def __post_init__(self):
        check_measures(self.cloze_words, self.embedding_eval)


@dataclass(frozen=True)
class ScheduleConfig:
    """How long the run trains, and in what batches."""

    epochs: float = 3
    """Passes over the training split (a fraction is allowed)."""
    max_steps: int | None = None
    """Total optimizer steps; overrides --epochs when set."""
    time_budget: str | None = None
    """Train for as many steps as fit this long on this machine (90s, 3m, 1h); a probe at the start picks the
    count, which the saved config records. --max-steps, when given too, caps it."""
    batch_size: int = 8
    """Blocks per device per forward pass (the guide's per_device_train_batch_size)."""
    eval_batch_size: int | None = None
    """Blocks per evaluation forward pass (default: --batch-size)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step: the global batch is --batch-size x processes x this."""

    def __post_init__(self):
        require(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        require(self.max_steps is None or self.max_steps >= 1, "--max-steps must be a positive integer")
        require(self.time_budget is None or parse_duration(self.time_budget) > 0,
                "--time-budget must be longer than 0s")
        check_batch(self.batch_size)
        require(self.eval_batch_size is None or self.eval_batch_size >= 1, "--eval-batch-size must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer: AdamW's learning rate, its schedule and decay, the head warm-up and frozen layers."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW, reached after --warmup-steps and decayed linearly to 0."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (none on biases and LayerNorm weights)."""
    warmup_steps: int = 0
    """Steps of linear warm-up of the learning rate (after any head warm-up)."""
    max_grad_norm: float = 1.0
    """Clip gradients to this norm (the Trainer's default); 0 turns clipping off."""
    head_warmup_steps: int | None = None
    """The first N optimizer steps train only the masked-LM head, the encoder frozen (default: 0 when the model
    comes with its head; with a new head, a share of the run)."""
    head_learning_rate: float | None = None
    """Learning rate of the head warm-up steps, constant (default: 1e-3)."""
    freeze_layers: int = 0
    """After any head warm-up, the embeddings and the N lowest encoder layers stay as loaded: each frozen layer
    saves its backward pass, so more steps fit a time budget (a tied decoder still trains, from the head)."""

    def __post_init__(self):
        require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning-rate must be positive, got {self.learning_rate}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        require(self.max_grad_norm >= 0, "--max-grad-norm must be >= 0")
        require(self.head_warmup_steps is None or self.head_warmup_steps >= 0, "--head-warmup-steps must be >= 0")
        require(self.head_learning_rate is None or self.head_learning_rate > 0,
                f"--head-learning-rate must be positive, got {self.head_learning_rate}")
        require(self.freeze_layers >= 0, f"--freeze-layers must be >= 0, got {self.freeze_layers}")


@dataclass(frozen=True)
class ComputeConfig:
    """Where and in what arithmetic the steps run: precision, device, kernels, sharding."""

    precision: str = "auto"
    """Training precision: auto (bf16 where the hardware runs it fast, fp16 with a gradient scaler on GPUs before
    Ampere, else fp32), fp32, bf16 or fp16. Evaluation follows it (--eval-precision)."""
    eval_precision: str = "train"
    """The evaluations' arithmetic (eval split, general check; before, during and after training alike): train (under
    the training steps' autocast, from fp32 weights; 2.7x faster than fp32 on a CPU with AMX) or fp32 (true fp32).
    metrics.json and the card say which; `mlmtune eval` follows it."""
    device: str | None = None
    """cpu, cuda or cuda:N for one process (default: the GPU when there is one); under torchrun each rank takes
    its LOCAL_RANK GPU. The quickstart's fills use it too."""
    compile: bool = False
    """torch.compile the encoder (the gather and the head at the masked positions stay eager: their sizes change
    every batch; with --fsdp each encoder layer, before it is sharded). On a GPU it fuses the encoder's elementwise
    work (LayerNorm, GELU, dropout, residual adds); the first steps pay the compile time. Off by default: it did not
    pay on a CPU, and it is not measured on a GPU yet (benchmarks/gpu.py measures it)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing: each encoder layer's activations are recomputed in the backward pass instead of
    kept (transformers' gradient_checkpointing_enable, non-reentrant), for long blocks that do not fit otherwise;
    about a third more compute per step, the same loss. Works with DDP and --fsdp."""
    attn_implementation: str | None = None
    """The attention kernels: sdpa, eager, flash_attention_2 or flash_attention_3 (where installed), passed to
    from_pretrained (default: transformers' choice for the model)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes of a torchrun / accelerate job (FSDP2's
    fully_shard, one unit per encoder layer), for encoders that do not fit on one GPU. Checkpoints are each rank's
    shards (torch.distributed.checkpoint, written in the background); the output is an ordinary model folder."""
    deterministic: bool = False
    """Deterministic kernels only (torch.use_deterministic_algorithms): on a GPU a resumed run then ends
    bit-identical to an uninterrupted one (attention's fused backward and other atomic adds otherwise sum in a
    varying order), at some speed. Training on a CPU is deterministic without it."""

    def __post_init__(self):
        require(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, "
                f"got {self.precision!r}")
        require(self.eval_precision in EVAL_PRECISIONS, f"--eval-precision must be one of "
                f"{', '.join(EVAL_PRECISIONS)}, got {self.eval_precision!r}")
        require(self.attn_implementation is None or self.attn_implementation in ATTN_IMPLEMENTATIONS,
                f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                f"got {self.attn_implementation!r}")
        require(not (self.fsdp and self.precision == "fp16"), "--fsdp with --precision fp16 is not supported yet "
                "(its gradient scaler is not shared over the shards); use bf16 or fp32")


@dataclass(frozen=True)
class OutputConfig:
    """What the run writes, and where: checkpoints, logs, the output folder, the export and the upload."""

    save_steps: int | None = None
    """Checkpoint every N optimizer steps (default: at the end of every epoch)."""
    save_total_limit: int = 2
    """How many checkpoints to keep under output_dir/checkpoints."""
    logging_steps: int = 10
    """Log the training loss every N optimizer steps."""
    report_to: str = "none"
    """Where to log while training, one or several comma-separated: none, tensorboard (event files under
    OUTPUT_DIR/runs/), mlflow (MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db), trackio (its local store), wandb
    (WANDB_MODE=offline keeps it local). Each but none is an extra: pip install 'mlmtune[mlflow]'."""
    output_dir: str = "mlmtune-output"
    """Where the model folder, checkpoints and records go: a new or empty folder, or the run's own with --resume."""
    resume: bool = False
    """Continue from the newest checkpoint in --output-dir."""
    export: str | None = None
    """onnx: at the end of the run, onnx/ in the output folder (model.onnx and its int8 copy, checked against
    PyTorch, the figures in the model card; as `mlmtune export --quantize int8` makes them)."""
    push_to_hub: bool = False
    """Upload the finished model folder (not its checkpoints) to the Hub."""
    hub_model_id: str | None = None
    """The Hub repository to push to (default: the name of --output-dir)."""

    def __post_init__(self):
        require(self.save_steps is None or self.save_steps >= 1, "--save-steps must be a positive integer")
        require(self.save_total_limit >= 1, "--save-total-limit must be >= 1")
        require(self.logging_steps >= 1, "--logging-steps must be >= 1")
        report_targets(self.report_to)
        require(self.export in (None, "onnx"), f"--export must be onnx, got {self.export!r}")
