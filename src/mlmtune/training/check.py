"""`mlmtune check`: what would go wrong in a run, said before any compute is spent on it.

It runs every check `train` runs at its start (which stops on the first error), the engine's own
refusals, and a short timed probe that estimates the run's time and memory. `--show-masks N` shows
instead the first N blocks as the run will mask them.
"""

from __future__ import annotations

import math

import torch

from mlmtune.config import TrainConfig
from mlmtune.data.blocks import Blocks
from mlmtune.data.masking import IGNORE_INDEX, Masker, word_numbers
from mlmtune.data.prepare import prepare_blocks
from mlmtune.errors import MlmtuneError
from mlmtune.evaluation.task import TaskData
from mlmtune.model.forward import describe_head
from mlmtune.model.load import check_block_size, load_model, load_tokenizer
from mlmtune.training.budget import timed_probe
from mlmtune.training.dashboard import missing
from mlmtune.training.engine import engine_class
from mlmtune.training.feed import StepBatches
from mlmtune.training.preflight import ERROR, OK, Findings, check_data, check_tokenizer
from mlmtune.training.schedule import steps_for


def preflight(cfg: TrainConfig, probe: bool = True) -> Findings:
    """Every check of a training config, and (with `probe`) estimates of time and memory.

    Errors a run would hit are findings here, not exceptions: the findings say all that is wrong.
    """
    findings = Findings()
    for line in missing(cfg.output.report_to):  # what `train` refuses first
        findings.add(ERROR, line)
    try:
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(cfg.model)
        findings.add(OK, f"model {cfg.model}: {type(model).__name__}, "
                         f"{sum(p.numel() for p in model.parameters()):,} parameters")
        findings.add(OK, describe_head(model))
        engine = engine_class(cfg.backend)  # Keras' packages missing: a finding
        note = engine.check_model(model)  # what `train` refuses before it reads the data
        if note:
            findings.add(OK, note)
        check_tokenizer(tokenizer, findings)
        check_block_size(cfg.data.block_size, model, tokenizer)
        blocks, stats = prepare_blocks(cfg.data, tokenizer, cfg.seed)
    except MlmtuneError as e:
        findings.add(ERROR, str(e))
        return findings
    check_data(stats, cfg.data.block_size, findings)
    task = cfg.measure.downstream.task()
    if task is not None:  # read and checked as train reads it, before any training
        try:
            findings.add(OK, f"downstream task {TaskData(task, cfg.seed).describe([cfg.seed])}")
        except MlmtuneError as e:
            findings.add(ERROR, f"--downstream: {e}")
    train_blocks = Blocks(blocks["train"])
    per_epoch, total = steps_for(cfg, len(train_blocks))
    findings.estimates.update(train_blocks=len(train_blocks), eval_blocks=stats.blocks.get("test", 0),
                              steps_per_epoch=per_epoch, total_steps=total)
    if probe:
        measured = timed_probe(cfg, model, tokenizer, train_blocks)
        step = measured["step_seconds"]
        if cfg.backend != "torch":  # the engine's own step time; evaluation stays PyTorch's (fp32)
            step = engine.probe(cfg, model, tokenizer, train_blocks, None)(False)
        eval_batch = cfg.schedule.eval_batch_size or cfg.schedule.batch_size
        eval_batches = math.ceil(stats.blocks.get("test", 0) / eval_batch)
        evals = 2 + math.ceil(total / per_epoch)  # before, each epoch end, after
        # an eval batch is a forward pass in fp32: about a third of a PyTorch training step's work
        seconds = total * step + evals * eval_batches * measured["step_seconds"] / 3
        findings.estimates.update(seconds_per_step=round(step, 3), run_time=_duration(seconds))
        if cfg.backend == "torch":  # PyTorch's peak; TensorFlow's allocator is not measured here
            findings.estimates.update(peak_memory_gb=measured["peak_memory_gb"])
    return findings


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def masked_examples(cfg: TrainConfig, n: int) -> tuple[list[dict], object]:
    """The first `n` blocks the run trains on, masked as training masks them (its first steps, one process).

    Returns:
        (one dict per block: `input_ids` (what the model sees), `labels` (IGNORE_INDEX where nothing is
        predicted), `word_ids` (each token's word within the block, None for special tokens) and `tokens` (the
        original pieces); the tokenizer).
    """
    tokenizer = load_tokenizer(cfg.model)
    blocks, _ = prepare_blocks(cfg.data, tokenizer, cfg.seed)
    train_blocks = Blocks(blocks["train"])
    masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability, cfg.masking)
    steps = StepBatches(train_blocks, None, masker, cfg.seed, cfg.schedule.batch_size,
                        cfg.schedule.gradient_accumulation_steps)
    special = set(tokenizer.all_special_ids)
    out: list[dict] = []
    for step in range(steps_for(cfg, len(train_blocks))[1]):
        micro = steps.blocks_of(step, words=True)
        for (ids, starts, _), (inputs, labels) in zip(micro, steps.mask(micro)):
            words = word_numbers(starts) if starts is not None else torch.arange(ids.shape[1]).expand_as(ids)
            for row in range(len(ids)):
                out.append({"step": step, "input_ids": inputs[row].tolist(), "labels": labels[row].tolist(),
                            "word_ids": [None if t in special else w for t, w in zip(ids[row].tolist(),
                                                                                       words[row].tolist())],
                            "tokens": tokenizer.convert_ids_to_tokens(ids[row].tolist())})
                if len(out) == n:
                    return out, tokenizer
    return out, tokenizer


def render_masks(example: dict, tokenizer) -> str:
    """One masked block as its pieces: [piece] masked, [piece=] kept, [piece>other] replaced by a random piece."""
    parts = []
    for piece, shown, label in zip(example["tokens"], example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            parts.append(piece)
        elif shown == tokenizer.mask_token_id:
            parts.append(f"[{piece}]")
        elif shown == label:
            parts.append(f"[{piece}=]")
        else:
            parts.append(f"[{piece}>{tokenizer.convert_ids_to_tokens(shown)}]")
    return " ".join(parts)
