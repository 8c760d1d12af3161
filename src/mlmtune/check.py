"""Preflight: what would go wrong in a run, said before any compute is spent on it.

`mlmtune check` runs every check and a short timed probe; `train` runs the same checks (without
the probe) at its start and stops on the first error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mlmtune.blocks import BlockStats
from mlmtune.config import TrainConfig
from mlmtune.errors import MlmtuneError
from mlmtune.schedule import steps_for, timed_probe

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass
class Report:
    """Findings in the order they were made, and the estimates of the run."""

    findings: list[tuple[str, str]] = field(default_factory=list)
    estimates: dict[str, float | int | str] = field(default_factory=dict)

    def add(self, level: str, message: str) -> None:
        self.findings.append((level, message))

    @property
    def errors(self) -> list[str]:
        return [m for level, m in self.findings if level == ERROR]

    def lines(self) -> list[str]:
        out = [f"{level:>7}  {message}" for level, message in self.findings]
        if self.estimates:
            out.append("estimate " + ", ".join(f"{k}: {v}" for k, v in self.estimates.items()))
        return out


def check_tokenizer(tokenizer, report: Report) -> None:
    if tokenizer.pad_token_id is None:
        report.add(WARNING, "the tokenizer has no pad token: fill-mask will run one text per forward pass")
    elif tokenizer.eos_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        report.add(WARNING, f"the pad token is the end-of-sequence token ({tokenizer.pad_token!r}), as the guide's "
                            "`tokenizer.pad_token = tokenizer.eos_token` makes it: padding is then indistinguishable "
                            "from a real end of text; prefer a tokenizer with its own pad token")
    else:
        report.add(OK, f"tokenizer: mask {tokenizer.mask_token!r}, pad {tokenizer.pad_token!r}")


def check_data(stats: BlockStats, block_size: int, report: Report) -> None:
    if stats.empty_texts:
        report.add(WARNING, f"{stats.empty_texts:,} of {stats.records:,} records have empty or whitespace-only text "
                            "(dropped)")
    if stats.duplicate_texts:
        report.add(WARNING, f"{stats.duplicate_texts:,} eval texts also stand, word for word, in the training split: "
                            "perplexity will look better than it is; deduplicate the corpus")
    for split in stats.blocks:
        report.add(OK, f"{split}: {stats.blocks[split]:,} blocks of {block_size} tokens, "
                       f"{stats.dropped_tokens[split]} tokens dropped by grouping")


def preflight(cfg: TrainConfig, probe: bool = True) -> Report:
    """Every check of a training config, and (with `probe`) estimates of time and memory.

    Errors a run would hit are findings here, not exceptions: the report says all that is wrong.
    """
    from mlmtune.blocks import Blocks, prepare_blocks
    from mlmtune.model import check_block_size, load_model

    report = Report()
    try:
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(cfg.model)
    except MlmtuneError as e:
        report.add(ERROR, str(e))
        return report
    report.add(OK, f"model {cfg.model}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
                   "parameters")
    if cfg.backend == "keras":
        try:  # what `train --backend keras` refuses before it reads the data
            from mlmtune.keras import require
            from mlmtune.keras.convert import family_of

            require()
            report.add(OK, f"--backend keras: the {family_of(model).model_type} family, on keras-hub")
        except MlmtuneError as e:
            report.add(ERROR, str(e))
            return report
    check_tokenizer(tokenizer, report)
    try:
        check_block_size(cfg.data.block_size, model, tokenizer)
        blocks, stats = prepare_blocks(cfg.data, tokenizer, cfg.seed)
    except MlmtuneError as e:
        report.add(ERROR, str(e))
        return report
    check_data(stats, cfg.data.block_size, report)
    train_blocks = Blocks(blocks["train"])
    per_epoch, total = steps_for(cfg, len(train_blocks))
    report.estimates.update(train_blocks=len(train_blocks), eval_blocks=stats.blocks.get("test", 0),
                            steps_per_epoch=per_epoch, total_steps=total)
    if probe:
        measured = timed_probe(cfg, model, tokenizer, train_blocks)
        step = measured["step_seconds"]
        if cfg.backend == "keras":  # Keras' own step time; evaluation stays PyTorch's (fp32, the PyTorch twin)
            from mlmtune.keras.train import keras_policy, keras_probe

            step = keras_probe(cfg, model, tokenizer, train_blocks, keras_policy(cfg.precision))(False)
        eval_batches = math.ceil(stats.blocks.get("test", 0) / (cfg.eval_batch_size or cfg.batch_size))
        evals = 2 + math.ceil(total / per_epoch)  # before, each epoch end, after
        # an eval batch is a forward pass in fp32: about a third of a PyTorch training step's work
        seconds = total * step + evals * eval_batches * measured["step_seconds"] / 3
        report.estimates.update(seconds_per_step=round(step, 3), run_time=_duration(seconds))
        if cfg.backend == "torch":  # PyTorch's peak; TensorFlow's allocator is not measured here
            report.estimates.update(peak_memory_gb=measured["peak_memory_gb"])
    return report


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
