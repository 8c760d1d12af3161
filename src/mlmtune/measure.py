"""What a training run measures with the engine's current weights, the same for every engine and every
number of ranks: the eval split's perplexity on fixed masks (in the run's masking scheme, and on token masks
too when that is another), the general corpus' perplexity (`general.py`), the domain cloze (`cloze.py`), and
the tokenizer-free figures of a run whose vocabulary grew; and the metrics that report them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mlmtune import distributed
from mlmtune.cloze import cloze_accuracy
from mlmtune.config import TrainConfig
from mlmtune.evaluate import EvalResult, perplexity_of
from mlmtune.general import GENERAL_SEED, general_entry, general_masker, tokenizer_free
from mlmtune.masking import Masker, iter_eval_masks, rank_shares, regroup
from mlmtune.run import Engine, Run


def eval_entry(result: EvalResult) -> dict[str, Any]:
    entry = {"eval_loss": result.loss, "perplexity": result.perplexity, "masked_tokens": result.masked_tokens}
    if result.token is not None:  # the same model on the token scheme's masks: one yardstick for every scheme
        entry.update(token_eval_loss=result.token.loss, token_perplexity=result.token.perplexity)
    return entry


def evaluator(cfg: TrainConfig, run: Run, engine: Engine, progress: bool) -> Callable[[str], EvalResult | None]:
    """Perplexity of the engine's current weights on the eval split (under `engine.eval_autocast`), with the masks
    `iter_eval_masks` draws from the seed in the run's scheme (and in the token scheme too, when the run's is
    another); None without an eval split."""
    token_masker = Masker.from_tokenizer(run.tokenizer, cfg.mlm_probability) if cfg.masking != "token" else None

    def evaluate(desc: str) -> EvalResult | None:
        if run.eval_blocks is None:
            return None
        result = ranks_perplexity(cfg, engine, run.eval_blocks, run.masker, cfg.seed, progress, desc)
        if token_masker is None:
            return result
        return dataclasses.replace(result, token=ranks_perplexity(cfg, engine, run.eval_blocks, token_masker,
                                                                  cfg.seed, progress, f"{desc}, token masks"))

    return evaluate


def ranks_perplexity(cfg: TrainConfig, engine: Engine, blocks, masker: Masker, seed: int, progress: bool,
                     desc: str) -> EvalResult:
    """Perplexity of the engine's current weights on `blocks`, each masked chunk shared evenly over the ranks
    and the sums added up token-weighted. The chunks are regrouped to one eval batch per rank (eval batch x world
    rows), so that more ranks do not mean smaller forward passes."""
    d, eval_bs = engine.dist, cfg.eval_batch_size or cfg.batch_size
    chunks = regroup(iter_eval_masks(blocks, masker, seed), eval_bs * d.world)
    if not d.enabled:
        return perplexity_of(engine.eval_model(), chunks, eval_bs, progress=progress, desc=desc, total=len(blocks),
                             autocast=engine.eval_autocast)
    return perplexity_of(engine.eval_model(), rank_shares(chunks, d.rank, d.world), eval_bs, progress=progress,
                         desc=desc, total=-(-len(blocks) // d.world),
                         reduce=lambda v: distributed.all_reduce_sum(d, v, engine.device),
                         autocast=engine.eval_autocast)


def general_check(cfg: TrainConfig, run: Run, engine: Engine, progress: bool) -> Callable[[str], dict | None]:
    """The general corpus' fixed sample scored with the engine's current weights (`general.py`); None when off."""
    if run.general is None:
        return lambda desc: None
    source, blocks = run.general

    def check(desc: str) -> dict:
        result = ranks_perplexity(cfg, engine, blocks, general_masker(run.tokenizer), GENERAL_SEED, progress, desc)
        return general_entry(result, source, blocks)

    return check


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


def vocabulary_metrics(run: Run, model, device) -> dict[str, Any]:
    """A run whose vocabulary grew: the words added, tokens per word, and the tokenizer-free figures before (the
    model as loaded, with its own tokenizer) and after (the trained model, with the new one) on the same texts."""
    grown = run.vocabulary
    if grown is None:
        return {}
    out = {"added_tokens": len(grown.words), "tokens_per_word_before": grown.tokens_per_word_before,
           "tokens_per_word_after": grown.tokens_per_word_after}
    if grown.free_before is not None:
        after = tokenizer_free(model, run.tokenizer, grown.free_texts, device)
        out.update(tokenizer_free_texts=after["texts"], tokenizer_free_words=after["words"],
                   nll_per_word_before=grown.free_before["nll_per_word"], nll_per_word_after=after["nll_per_word"],
                   bits_per_char_before=grown.free_before["bits_per_char"], bits_per_char_after=after["bits_per_char"])
    return out


def cloze_check(run: Run, engine: Engine) -> Callable[[str], dict | None]:
    """The domain cloze (`cloze.py`) with the engine's current weights; every rank scores every case (a few
    hundred short texts), so that sharded weights see the same forward passes on each. None when off."""
    if run.cloze is None:
        return lambda desc: None
    name, cases = run.cloze

    def check(desc: str) -> dict:
        return {"cloze": name, **cloze_accuracy(engine.eval_model(), run.tokenizer, cases, engine.device)}

    return check


def cloze_metrics(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The cloze before and after training, and what it scored."""
    some = after or before
    if some is None:
        return {}
    return {"cloze": some["cloze"], "cloze_cases": some["cloze_cases"], "cloze_words": some["cloze_words"],
            **{f"cloze_top{k}_{when}": e[f"cloze_top{k}"] if e else None
               for k in (1, 3) for when, e in (("before", before), ("after", after))}}
