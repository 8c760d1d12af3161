"""What a model is measured with, by a training run (the engine's current weights, on every rank) and by `mlmtune
eval` (one process), the same for every engine: perplexity on fixed masks shared over the ranks
(`ranks_perplexity`), the general corpus' perplexity (`forgetting.py`), the domain cloze (`cloze.py`), the downstream
probe and the embedding check, as one list (`measurements`); and the metrics that report them. A run binds the
eval split to its engine in `training/run.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mlmtune import distributed
from mlmtune.data.blocks import Blocks
from mlmtune.data.masking import Masker, iter_eval_masks, rank_shares, regroup
from mlmtune.evaluation.cloze import ClozeCase, cloze_accuracy
from mlmtune.evaluation.downstream import RunProbe, downstream_line, downstream_metrics, eval_keys
from mlmtune.evaluation.embedding import EmbeddingCheck, embedding_line, embedding_metrics
from mlmtune.evaluation.forgetting import GENERAL_SEED, general_entry, general_masker
from mlmtune.evaluation.perplexity import EvalResult, perplexity_of


def token_note(result: EvalResult) -> str:
    """What a log line adds for a run in another masking scheme: the same model's loss on token masks."""
    return "" if result.token is None else f" (on token masks: eval loss {result.token.loss:.4f})"


def eval_entry(result: EvalResult) -> dict[str, Any]:
    entry = {"eval_loss": result.loss, "perplexity": result.perplexity, "masked_tokens": result.masked_tokens}
    if result.token is not None:  # the same model on the token scheme's masks: one yardstick for every scheme
        entry.update(token_eval_loss=result.token.loss, token_perplexity=result.token.perplexity)
    return entry


@dataclass(frozen=True)
class Scoring:
    """How a measurement runs: on which ranks (each masked chunk shared evenly over them, the sums added up), on
    which device, in batches of how many rows, under which autocast (None: fp32). A training run's is its engine's;
    `mlmtune eval`'s one process."""

    dist: distributed.Dist
    device: torch.device
    batch_size: int
    progress: bool = True
    autocast: torch.dtype | None = None


def ranks_perplexity(scoring: Scoring, model, blocks, masker: Masker, seed: int, desc: str) -> EvalResult:
    """Perplexity of `model` (the engine's current weights) on `blocks`, each masked chunk shared evenly over the
    ranks and the sums added up token-weighted. The chunks are regrouped to one eval batch per rank (eval batch x
    world rows), so that more ranks do not mean smaller forward passes."""
    d = scoring.dist
    chunks = regroup(iter_eval_masks(blocks, masker, seed), scoring.batch_size * d.world)
    if not d.enabled:
        return perplexity_of(model, chunks, scoring.batch_size, progress=scoring.progress, desc=desc,
                             total=len(blocks), autocast=scoring.autocast)
    return perplexity_of(model, rank_shares(chunks, d.rank, d.world), scoring.batch_size, progress=scoring.progress,
                         desc=desc, total=-(-len(blocks) // d.world),
                         reduce=lambda v: distributed.all_reduce_sum(d, v, scoring.device), autocast=scoring.autocast)


@dataclass(frozen=True)
class Measurement:
    """One figure a run takes of its model before and after training, and `mlmtune eval` of a model: its name (the
    TrainState field `{name}_before`, the dashboard's), how it scores a model, the line that says it, its metrics.

    `on_main`: rank 0 alone scores the full model (the probes: they train a classifier); else every rank scores the
    engine's current weights, sharded under FSDP, and the ranks add up their shares."""

    name: str
    score: Callable[[Any, str], dict]  # (model, a progress label) -> its entry
    line: Callable[[str, dict], str]  # ("Before training" or "After training", entry) -> the line said
    metrics: Callable[[dict | None, dict | None], dict]  # (before, after) -> the run's metrics
    on_main: bool = False
    flat: Callable[[dict], dict] = dict  # the entry's keys in `mlmtune eval`'s output


def measurements(tokenizer, scoring: Scoring, general: tuple[str, Blocks] | None = None,
                 cloze: tuple[str, list[ClozeCase]] | None = None, downstream: RunProbe | None = None,
                 embedding: EmbeddingCheck | None = None) -> list[Measurement]:
    """The measurements asked for, in the order they are taken: the general corpus' fixed sample (`forgetting.py`),
    the domain cloze (`cloze.py`), the downstream probe (`downstream.py`), a sentence encoder's embedding check
    (`embedding.py`). The eval split's perplexity is `training.run.evaluator`'s: a run takes it at every epoch's
    end too."""
    out = []
    if general is not None:
        source, blocks = general
        out.append(Measurement("general", lambda model, desc: general_entry(
            ranks_perplexity(scoring, model, blocks, general_masker(tokenizer), GENERAL_SEED, desc), source, blocks),
            general_line, general_metrics))
    if cloze is not None:
        name, cases = cloze
        out.append(Measurement("cloze", lambda model, desc: {"cloze": name, **cloze_accuracy(
            model, tokenizer, cases, scoring.device, scoring.batch_size)}, cloze_line, cloze_metrics))
    if downstream is not None:
        out.append(Measurement("downstream", lambda model, desc: downstream(model, tokenizer), downstream_line,
                               downstream_metrics, on_main=True, flat=eval_keys))
    if embedding is not None:
        out.append(Measurement("embedding", lambda model, desc: embedding(model, tokenizer), embedding_line,
                               embedding_metrics, on_main=True))
    return out


def general_line(when: str, g: dict) -> str:
    return (f"{when}, {g['general_eval']}: loss {g['general_loss']:.4f}, perplexity {g['general_perplexity']:,.2f} "
            f"({g['general_masked_tokens']:,} masked tokens)")


def cloze_line(when: str, c: dict) -> str:
    return (f"{when}, cloze ({c['cloze']}): top-1 {c['cloze_top1']:.1%}, top-3 {c['cloze_top3']:.1%} of "
            f"{c['cloze_cases']} cases")


def general_metrics(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The general check before and after training, and what it scored."""
    if before is None and after is None:
        return {}
    some = after or before
    return {"general_eval": some["general_eval"], "general_blocks": some["general_blocks"],
            "general_masked_tokens": some["general_masked_tokens"],
            "general_loss_before": before["general_loss"] if before else None,
            "general_perplexity_before": before["general_perplexity"] if before else None,
            "general_loss_after": after["general_loss"] if after else None,
            "general_perplexity_after": after["general_perplexity"] if after else None}


def cloze_metrics(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The cloze before and after training, and what it scored."""
    some = after or before
    if some is None:
        return {}
    return {"cloze": some["cloze"], "cloze_cases": some["cloze_cases"], "cloze_words": some["cloze_words"],
            **{f"cloze_top{k}_{when}": e[f"cloze_top{k}"] if e else None
               for k in (1, 3) for when, e in (("before", before), ("after", after))}}
