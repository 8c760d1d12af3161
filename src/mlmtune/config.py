"""The config schema: dataclasses that every command, config file and flag resolve into.

Config flows one way: dataclass defaults < `--config FILE.yaml` < command-line flags, resolved
once by `options.resolve()` and never changed afterwards (the dataclasses are frozen). Validation
lives in `__post_init__`, so a config that exists is a config that is valid. Each field's docstring is its `--help`.
TrainConfig's settings come in groups (`cfg.optim.learning_rate`), defined in `config_groups.py`; the flags
and YAML keys stay flat (`--learning-rate`, `learning_rate: 1e-4`), as `options.flat_fields` makes them. The
downstream task's settings (`TaskConfig`, `DownstreamConfig`) are in `probe_config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlmtune.config_groups import (
    ComputeConfig,
    MeasureConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
    check_batch,
    check_measures,
)
from mlmtune.errors import require
from mlmtune.probe_config import QUICKSTART_TASK, DownstreamConfig, TaskConfig

DEFAULT_MODEL = "distilbert/distilroberta-base"
QUICKSTART_MODEL = "builtin:all-minilm-l6-v2"
QUICKSTART_DATASET = "builtin:python-docs"
CONFIG_FILENAME = "mlmtune_config.yaml"
BACKENDS = ("torch", "keras")
MASKING = ("token", "whole-word", "span")  # the schemes of masking.py
DEFAULT_TEST_SIZE = 0.2

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
        require(self.block_size >= 2, f"--block-size must be at least 2, got {self.block_size}")
        require(self.test_size is None or 0 <= self.test_size < 1,
                f"--test-size must be in [0, 1), got {self.test_size}")
        require(bool(self.split), "--split must not be empty")
        require(bool(self.text_field), "--text-field must not be empty")
        require(self.eval_records >= 0, "--eval-records must be >= 0")

    @property
    def held_out(self) -> float:
        """The fraction of records held out when training or preparing (`test_size`, default 0.2)."""
        return DEFAULT_TEST_SIZE if self.test_size is None else self.test_size


def check_add_tokens(value: str | None) -> None:
    """--add-tokens is a positive number of words, or a file of words that exists."""
    if value is not None and value.strip().lstrip("-").isdigit():
        require(int(value) >= 1, f"--add-tokens must be a positive number of words or a file of words, got {value}")
    elif value is not None:
        require(Path(value).expanduser().is_file(), f"--add-tokens {value}: no such file (give a number of words, "
                f"or a file of words, one a line)")


def _check_masks(mlm_probability: float, masking: str) -> None:
    require(0 < mlm_probability < 1, f"--mlm-probability must be in (0, 1), got {mlm_probability}")
    require(masking in MASKING, f"--masking must be one of {', '.join(MASKING)}, got {masking!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `mlmtune train` (and `mlmtune quickstart`) needs; saved beside every output.

    The settings other than the model's and the masks' come in groups (`cfg.optim.learning_rate`,
    `cfg.schedule.max_steps`); flags and YAML keys name the leaves (`--learning-rate`).
    """

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
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    seed: int = 42
    """Seeds the split, the new head, the order of the blocks, every step's masks and dropout, and the eval masks."""
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):  # each group checked its own values; here, what one group asks of another
        _check_masks(self.mlm_probability, self.masking)
        require(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        c, freeze = self.compute, self.optim.freeze_layers
        require(not (freeze and self.backend == "keras"),
                "--freeze-layers is for --backend torch (the Keras engine trains every layer)")
        require(not (freeze and c.fsdp), "--freeze-layers is not available with --fsdp yet: "
                "use DDP (torchrun without --fsdp) or train every layer")
        check_add_tokens(self.add_tokens)
        require(not (self.add_tokens and self.data.streaming and self.add_tokens.isdigit()),
                "--add-tokens N mines the training split, which a stream does not hold: give a FILE of words")
        require(self.backend == "torch" or not (c.compile or c.deterministic or c.fsdp or c.device),
                "--device, --compile, --fsdp and --deterministic are options of --backend torch")
        require(self.backend == "torch" or not (c.gradient_checkpointing or c.attn_implementation),
                "--gradient-checkpointing and --attn-implementation are options of --backend torch")
        require(bool(self.data.dataset), "--dataset is required (a Hub id, a local file or folder, "
                "or builtin:python-docs)")
        require(not self.data.streaming or self.schedule.max_steps is not None,
                "--streaming needs --max-steps: a stream has no length to count epochs by")
        require(not (self.data.streaming and self.schedule.time_budget), "--time-budget does not work with "
                "--streaming yet; give --max-steps")


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
        require(bool(self.probe.task), "--task is required (a file or folder of labelled texts, a Hub dataset id, "
                f"or {QUICKSTART_TASK})")
        require(len(self.model) >= 1, "--model must name at least one model")


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
        require(bool(self.data.dataset), "--dataset is required")
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
        _check_masks(self.mlm_probability, self.masking)
        check_batch(self.batch_size)
        check_measures(self.cloze_words, self.embedding_eval)
        require(bool(self.data.dataset), "--dataset is required")
        require(self.pseudo_max_texts is None or self.pseudo_max_texts >= 1, "--pseudo-max-texts must be >= 1")
        require(self.precision in (None, "fp32", "bf16", "fp16"), f"--precision must be one of fp32, bf16, fp16, "
                f"got {self.precision!r}")
