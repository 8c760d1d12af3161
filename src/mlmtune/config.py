"""The config schema: dataclasses that every command, config file and flag resolve into.

Config flows one way: dataclass defaults < `--config FILE.yaml` < command-line flags, resolved
once by `options.resolve()` and never changed afterwards (the dataclasses are frozen). Validation
lives in `__post_init__`, so a config that exists is a config that is valid. Each field's docstring is its `--help`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlmtune.errors import MlmtuneError

DEFAULT_MODEL = "distilbert/distilroberta-base"
QUICKSTART_MODEL = "builtin:all-minilm-l6-v2"
QUICKSTART_DATASET = "builtin:python-docs"
CONFIG_FILENAME = "mlmtune_config.yaml"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_PRECISIONS = ("train", "fp32")
REPORT_TO = ("none", "tensorboard", "mlflow", "trackio", "wandb")  # transformers' names for the same dashboards
BACKENDS = ("torch", "keras")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
MASKING = ("token", "whole-word", "span")  # the schemes of masking.py
DEFAULT_TEST_SIZE = 0.2
PROBE_METHODS = ("linear", "finetune")
EMBEDDING_EVAL = ("auto", "none")
QUICKSTART_TASK = "builtin:python-docs-chapters"

# `mlmtune quickstart`: applied over TrainConfig's defaults, under any --config file and flags. The head is
# new: the first 15% of the budget trains it alone (budget.HEAD_SHARE), at 3e-3; then the whole model trains
# at 1e-3, far above the guide's 2e-5, in many small batches, because a 3-minute run on a CPU has few steps
# to spend (docs/training.md measures it: lr 2e-3 diverged, batch 16 at 5e-4 learned slower).
QUICKSTART_DEFAULTS: dict[str, Any] = {
    "model": QUICKSTART_MODEL,
    "dataset": QUICKSTART_DATASET,
    "learning_rate": 1e-3,
    "head_learning_rate": 3e-3,
    "batch_size": 8,
    "time_budget": "3m",
    "warmup_steps": 10,
    "output_dir": "mlmtune-quickstart",
    "downstream": QUICKSTART_TASK,
    "downstream_max_examples": 600,
}


def report_targets(report_to: str) -> tuple[str, ...]:
    """The dashboards of `--report-to` (comma-separated, as the Trainer's), in order; () for none.

    Raises:
        MlmtuneError: a name that is not one, a name given twice, or none given with others.
    """
    names = tuple(n.strip() for n in report_to.split(","))
    for n in names:
        _require(n in REPORT_TO, f"--report-to: {n!r} is not one of {', '.join(REPORT_TO)} (comma-separated for "
                 f"several), in {report_to!r}")
        _require(names.count(n) == 1, f"--report-to names {n} twice in {report_to!r}")
    _require("none" not in names or len(names) == 1, f"--report-to none reports nowhere, so it stands alone: drop it "
             f"from {report_to!r}, or give none only")
    return () if names == ("none",) else names


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MlmtuneError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes blocks (shared by train, prepare and eval)."""

    dataset: str | None = None
    """Hub dataset id, local file or folder, a folder made by `mlmtune prepare`, or a built-in corpus:
    builtin:python-docs, builtin:wikipedia (-fr, -es)."""
    dataset_config: str | None = None
    """The dataset's configuration (subset) name, for Hub datasets that have several."""
    split: str = "train"
    """Split to read; slicing works (`train[:5000]`, `train[:10%]`)."""
    text_field: str = "text"
    """Column holding the text; a dotted path reaches into nested records (`answers.text`)."""
    test_size: float | None = None
    """Fraction of records held out for evaluation; 0 means none (default: 0.2 for train and prepare; eval
    scores the training run's held-out split on its own dataset, and all of any other dataset)."""
    block_size: int = 128
    """Tokens per block: each split is concatenated and cut into blocks of this length."""
    cache_dir: str | None = None
    """Where tokenized blocks are cached (default: ~/.cache/mlmtune)."""
    streaming: bool = False
    """Read the corpus as a stream, tokenizing and grouping on the fly (needs --max-steps)."""
    eval_records: int = 1000
    """With --streaming: the first N records are held out for evaluation."""

    def __post_init__(self):
        _require(self.block_size >= 2, f"--block-size must be at least 2, got {self.block_size}")
        _require(self.test_size is None or 0 <= self.test_size < 1,
                 f"--test-size must be in [0, 1), got {self.test_size}")
        _require(bool(self.split), "--split must not be empty")
        _require(bool(self.text_field), "--text-field must not be empty")
        _require(self.eval_records >= 0, "--eval-records must be >= 0")

    @property
    def held_out(self) -> float:
        """The fraction of records held out when training or preparing (`test_size`, default 0.2)."""
        return DEFAULT_TEST_SIZE if self.test_size is None else self.test_size


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
        _require(self.method in PROBE_METHODS, f"--method must be one of {', '.join(PROBE_METHODS)}, "
                 f"got {self.method!r}")
        _require(self.seeds >= 1, f"--seeds must be a positive integer, got {self.seeds}")
        _require(0 < self.test_size < 1, f"--test-size must be in (0, 1), got {self.test_size}")
        _require(self.max_examples is None or self.max_examples >= 2, "--max-examples must be at least 2")
        _require(math.isfinite(self.epochs) and self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
                 f"--learning-rate must be positive, got {self.learning_rate}")
        _require(self.batch_size >= 1, f"--batch-size must be a positive integer, got {self.batch_size}")
        _require(self.max_length >= 4, f"--max-length must be at least 4, got {self.max_length}")
        _require(bool(self.text_field) and bool(self.label_field), "--text-field and --label-field must not be empty")


@dataclass(frozen=True)
class ProbeConfig:
    """`mlmtune probe`: does a model help a downstream task? Several models score side by side."""

    model: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    """The models to compare: Hub ids, model folders or builtin:all-minilm-l6-v2 (repeat the flag, or separate
    them with commas)."""
    probe: TaskConfig = field(default_factory=TaskConfig)
    seed: int = 42
    """The first seed (see --seeds)."""
    device: str | None = None
    """cpu, cuda or cuda:N (default: the GPU when there is one)."""

    def __post_init__(self):
        _require(bool(self.probe.task), "--task is required (a file or folder of labelled texts, a Hub dataset id, "
                 f"or {QUICKSTART_TASK})")
        _require(len(self.model) >= 1, "--model must name at least one model")


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


def parse_duration(text: str) -> float:
    """'90s', '3m', '1h30m', '2.5m' or plain seconds -> seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", s).strip():
        raise MlmtuneError(f"--time-budget {text!r} is not a duration; write e.g. 90s, 3m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)


def check_add_tokens(value: str | None) -> None:
    """--add-tokens is a positive number of words, or a file of words that exists."""
    if value is not None and value.strip().lstrip("-").isdigit():
        _require(int(value) >= 1, f"--add-tokens must be a positive number of words or a file of words, got {value}")
    elif value is not None:
        _require(Path(value).expanduser().is_file(), f"--add-tokens {value}: no such file (give a number of words, "
                 f"or a file of words, one a line)")


def _check_common(cfg: Any) -> None:
    _require(0 < cfg.mlm_probability < 1, f"--mlm-probability must be in (0, 1), got {cfg.mlm_probability}")
    _require(cfg.masking in MASKING, f"--masking must be one of {', '.join(MASKING)}, got {cfg.masking!r}")
    _require(cfg.batch_size >= 1, f"--batch-size must be a positive integer, got {cfg.batch_size}")
    _require(cfg.cloze_words in ("auto", "python", "none") or Path(cfg.cloze_words).is_file(),
             f"--cloze-words {cfg.cloze_words}: no such file; give a file of words, one a line, or auto, python "
             f"or none")
    _require(cfg.embedding_eval in EMBEDDING_EVAL, f"--embedding-eval must be one of {', '.join(EMBEDDING_EVAL)}, "
             f"got {cfg.embedding_eval!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `mlmtune train` (and `mlmtune quickstart`) needs; saved beside every output."""

    model: str = DEFAULT_MODEL
    """The model to continue training: a Hub id, a local model folder, or builtin:all-minilm-l6-v2."""
    data: DataConfig = field(default_factory=DataConfig)
    backend: str = "torch"
    """Training engine: torch, or keras (a keras-hub model trained with model.fit on TensorFlow, for the BERT,
    RoBERTa and DistilBERT families; needs `pip install "mlmtune[keras]"`). Data, masks, evaluation and the
    output folder are the same."""
    mlm_probability: float = 0.15
    """Share of the tokens chosen for prediction (of which 80% become the mask, 10% a random token, 10% stay)."""
    masking: str = "token"
    """What is chosen: token (each sub-word token on its own, the guide's rule), whole-word (every piece of a chosen
    word) or span (SpanBERT's, of whole words). Eval uses it, and token masks too, so that schemes compare."""
    add_tokens: str | None = None
    """The domain's words as single tokens started from their pieces: N (the training split's that save the most
    tokens) or FILE (one a line)."""
    add_numbers: bool = False
    """With --add-tokens N: words with digits may be added too."""
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
    epochs: float = 3
    """Passes over the training split (a fraction is allowed)."""
    max_steps: int | None = None
    """Total optimizer steps; overrides --epochs when set."""
    time_budget: str | None = None
    """Train for as many steps as fit this long on this machine (90s, 3m, 1h); a probe at the start picks the
    count, which the saved config records. --max-steps, when given too, caps it."""
    head_warmup_steps: int | None = None
    """The first N optimizer steps train only the masked-LM head, the encoder frozen (default: 0 when the model
    comes with its head; with a new head, a share of the run)."""
    head_learning_rate: float | None = None
    """Learning rate of the head warm-up steps, constant (default: 1e-3)."""
    freeze_layers: int = 0
    """After any head warm-up, the embeddings and the N lowest encoder layers stay as loaded: each frozen layer
    saves its backward pass, so more steps fit a time budget (a tied decoder still trains, from the head)."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW, reached after --warmup-steps and decayed linearly to 0."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (none on biases and LayerNorm weights)."""
    batch_size: int = 8
    """Blocks per device per forward pass (the guide's per_device_train_batch_size)."""
    eval_batch_size: int | None = None
    """Blocks per evaluation forward pass (default: --batch-size)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step: the global batch is --batch-size x processes x this."""
    warmup_steps: int = 0
    """Steps of linear warm-up of the learning rate (after any head warm-up)."""
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
    max_grad_norm: float = 1.0
    """Clip gradients to this norm (the Trainer's default); 0 turns clipping off."""
    seed: int = 42
    """Seeds the split, the new head, the order of the blocks, every step's masks and dropout, and the eval masks."""
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
        _check_common(self)
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"--learning-rate must be positive, got {self.learning_rate}",
        )
        _require(self.head_learning_rate is None or self.head_learning_rate > 0,
                 f"--head-learning-rate must be positive, got {self.head_learning_rate}")
        _require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _require(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _require(self.max_steps is None or self.max_steps >= 1, "--max-steps must be a positive integer")
        _require(self.head_warmup_steps is None or self.head_warmup_steps >= 0, "--head-warmup-steps must be >= 0")
        _require(self.freeze_layers >= 0, f"--freeze-layers must be >= 0, got {self.freeze_layers}")
        _require(not (self.freeze_layers and self.backend == "keras"),
                 "--freeze-layers is for --backend torch (the Keras engine trains every layer)")
        _require(not (self.freeze_layers and self.fsdp), "--freeze-layers is not available with --fsdp yet: "
                 "use DDP (torchrun without --fsdp) or train every layer")
        _require(self.time_budget is None or parse_duration(self.time_budget) > 0,
                 "--time-budget must be longer than 0s")
        check_add_tokens(self.add_tokens)
        _require(not (self.add_tokens and self.data.streaming and self.add_tokens.isdigit()),
                 "--add-tokens N mines the training split, which a stream does not hold: give a FILE of words")
        _require(self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1")
        _require(self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        _require(self.max_grad_norm >= 0, "--max-grad-norm must be >= 0")
        _require(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, "
                 f"got {self.precision!r}")
        _require(self.eval_precision in EVAL_PRECISIONS, f"--eval-precision must be one of "
                 f"{', '.join(EVAL_PRECISIONS)}, got {self.eval_precision!r}")
        _require(self.save_steps is None or self.save_steps >= 1, "--save-steps must be a positive integer")
        _require(self.save_total_limit >= 1, "--save-total-limit must be >= 1")
        _require(self.logging_steps >= 1, "--logging-steps must be >= 1")
        _require(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        _require(self.backend == "torch" or not (self.compile or self.deterministic or self.fsdp or self.device),
                 "--device, --compile, --fsdp and --deterministic are options of --backend torch")
        _require(self.attn_implementation is None or self.attn_implementation in ATTN_IMPLEMENTATIONS,
                 f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                 f"got {self.attn_implementation!r}")
        _require(self.backend == "torch" or not (self.gradient_checkpointing or self.attn_implementation),
                 "--gradient-checkpointing and --attn-implementation are options of --backend torch")
        _require(not (self.fsdp and self.precision == "fp16"), "--fsdp with --precision fp16 is not supported yet "
                 "(its gradient scaler is not shared over the shards); use bf16 or fp32")
        report_targets(self.report_to)
        _require(self.export in (None, "onnx"), f"--export must be onnx, got {self.export!r}")
        _require(self.eval_batch_size is None or self.eval_batch_size >= 1, "--eval-batch-size must be >= 1")
        _require(bool(self.data.dataset), "--dataset is required (a Hub id, a local file or folder, "
                 "or builtin:python-docs)")
        _require(not self.data.streaming or self.max_steps is not None,
                 "--streaming needs --max-steps: a stream has no length to count epochs by")
        _require(not (self.data.streaming and self.time_budget), "--time-budget does not work with --streaming yet; "
                 "give --max-steps")


@dataclass(frozen=True)
class PrepareConfig:
    """`mlmtune prepare`: the data half of train, written with `save_to_disk`."""

    model: str = DEFAULT_MODEL
    """Whose tokenizer to use."""
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 42
    """Seeds the split into train and test records."""
    add_tokens: str | None = None
    """As `train --add-tokens`: the blocks are tokenized with the domain's words added (train with the same value)."""
    add_numbers: bool = False
    """With --add-tokens N: words with digits may be added too."""
    output_dir: str = "mlmtune-prepared"
    """A new or empty folder, or an earlier `mlmtune prepare` output (only its own entries are replaced)."""

    def __post_init__(self):
        _require(bool(self.data.dataset), "--dataset is required")
        check_add_tokens(self.add_tokens)


@dataclass(frozen=True)
class EvalConfig:
    """`mlmtune eval`: perplexity on fixed masks, and optionally pseudo-perplexity."""

    model: str = DEFAULT_MODEL
    """The model to score: a Hub id or a model folder (a training run's output reuses its own settings)."""
    data: DataConfig = field(default_factory=DataConfig)
    mlm_probability: float = 0.15
    """Share of the tokens masked for scoring (a training run's own value when scoring its data)."""
    masking: str = "token"
    """token, whole-word or span: how the fixed eval masks are drawn (a training run's own scheme when scoring its
    data)."""
    seed: int = 42
    """Seeds the split and the fixed eval masks (a training run's own seed when scoring its data)."""
    batch_size: int = 16
    """Blocks per forward pass (the result does not depend on it)."""
    device: str | None = None
    """cpu, cuda or cuda:N (default: the GPU when there is one)."""
    precision: str | None = None
    """The perplexities' arithmetic: fp32, bf16 or fp16 autocast (default: what the training run evaluated in, from
    its metrics.json, when scoring its own held-out split, so its figure is reproduced; else fp32)."""
    pseudo: bool = False
    """Also compute pseudo-perplexity (every token masked in turn; slow)."""
    pseudo_max_texts: int | None = None
    """Pseudo-perplexity on at most this many texts of the eval split (default: all; --tokenizer-free: 16)."""
    tokenizer_free: bool = False
    """Also nats per word and bits per character (whole-word PLL): figures that compare models of any tokenizer."""
    general_eval: str = "none"
    """A general corpus scored too, as `train --general-eval` does (auto: builtin:wikipedia when installed)."""
    cloze_words: str = "none"
    """The domain cloze too, as `train --cloze-words` does: auto, python, or FILE (one word a line)."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    embedding_eval: str = "none"
    """The embedding check too, as `train --embedding-eval` does: auto (when the model is a sentence encoder) or
    none."""

    def __post_init__(self):
        _check_common(self)
        _require(bool(self.data.dataset), "--dataset is required")
        _require(self.pseudo_max_texts is None or self.pseudo_max_texts >= 1, "--pseudo-max-texts must be >= 1")
        _require(self.precision in (None, "fp32", "bf16", "fp16"), f"--precision must be one of fp32, bf16, fp16, "
                 f"got {self.precision!r}")
