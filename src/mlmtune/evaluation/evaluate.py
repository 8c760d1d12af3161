"""`mlmtune eval`: a model's perplexity on fixed masks (`perplexity.py`) over the records `eval_plan` picks
(the training run's own held-out split when it scores the run's data), and the run's other measurements of it:
pseudo-perplexity, the tokenizer-free figures, the cloze, the downstream probe, the embedding check, the general
check.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset, DatasetDict

from mlmtune.config import CONFIG_FILENAME, DataConfig, EvalConfig
from mlmtune.data.blocks import Blocks, TooFewTokens, build_blocks
from mlmtune.data.masking import Masker, iter_eval_masks
from mlmtune.data.prepare import is_prepared, prepare_blocks
from mlmtune.data.stream import held_out_texts
from mlmtune.data.text import load_texts
from mlmtune.device import WEIGHT_DTYPES, resolve_device
from mlmtune.distributed import Dist
from mlmtune.errors import MlmtuneError, say
from mlmtune.evaluation.cloze import held_out_cases
from mlmtune.evaluation.downstream import METHOD_NAMES, RunProbe
from mlmtune.evaluation.embedding import embedding_check
from mlmtune.evaluation.forgetting import (
    FREE_TEXTS,
    free_sample,
    general_blocks,
    general_source,
    tokenizer_free,
)
from mlmtune.evaluation.measurements import Scoring, measurements
from mlmtune.evaluation.perplexity import perplexity_of, pseudo_perplexity
from mlmtune.model.load import check_block_size, load_model, max_positions
from mlmtune.model.sentence import sentence_encoder


def _recorded_run(model: str) -> dict | None:
    """The resolved config a training run saved in its model folder, if `model` is such a folder."""
    path = Path(model).expanduser() / CONFIG_FILENAME
    if not path.is_file():
        return None
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("data"), dict) else None


def _recorded_eval_precision(model: str) -> str:
    """What a training run's evaluations ran in (its metrics.json), fp32 when it does not say (older runs)."""
    try:
        found = json.loads((Path(model).expanduser() / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "fp32"
    precision = found.get("eval_precision") if isinstance(found, dict) else None
    return precision if precision in WEIGHT_DTYPES else "fp32"


def _same_source(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    pa_, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa_.exists() and pb.exists():
        return pa_.resolve() == pb.resolve()
    return a == b


@dataclass(frozen=True)
class EvalPlan:
    """What `mlmtune eval` scores, and how its masks are drawn."""

    data: DataConfig
    seed: int
    mlm_probability: float
    masking: str
    which: str  # a sentence saying which records
    precision: str = "fp32"  # the forward passes' arithmetic: fp32, or bf16 / fp16 autocast


def eval_plan(cfg: EvalConfig) -> EvalPlan:
    """What `mlmtune eval` scores.

    - On the dataset the model was trained on (recorded in its folder's `mlmtune_config.yaml`)
      and without --test-size: the run's own held-out split, drawn with the run's seed, test size
      and masking, so `perplexity_after` is reproduced.
    - On any other dataset without --test-size: all of it.
    - With --test-size: the held-out fraction drawn with --seed.

    The perplexities run under --precision's autocast; by default the training run's own evaluation precision on
    its held-out split (recorded in its metrics.json), else fp32.
    """
    data = cfg.data
    recorded = _recorded_run(cfg.model)
    if data.test_size is None and recorded and _same_source(recorded["data"].get("dataset"), data.dataset):
        known = {f.name for f in dataclasses.fields(DataConfig)}
        run_data = {k: v for k, v in recorded["data"].items() if k in known}
        data = DataConfig(**{**run_data, "dataset": data.dataset, "cache_dir": data.cache_dir})
        seed = int(recorded.get("seed", cfg.seed))
        mlm = float(recorded.get("mlm_probability", cfg.mlm_probability))
        masking = str(recorded.get("masking", "token"))
        precision = cfg.precision or _recorded_eval_precision(cfg.model)
        if data.streaming:
            return EvalPlan(data, seed, mlm, masking,
                            f"the training run's held-out records (the first {data.eval_records:,})", precision)
        return EvalPlan(data, seed, mlm, masking, f"the training run's held-out split ({data.held_out:.0%} of the "
                        f"records, seed {seed}, block size {data.block_size}, mlm probability {mlm:g}, {masking} "
                        f"masking, {precision} evaluation)", precision)
    if data.test_size is None:
        return EvalPlan(dataclasses.replace(data, test_size=0.0), cfg.seed, cfg.mlm_probability, cfg.masking,
                        "all of it", cfg.precision or "fp32")
    return EvalPlan(data, cfg.seed, cfg.mlm_probability, cfg.masking,
                    f"a held-out {data.test_size:.0%} of the records (seed {cfg.seed})", cfg.precision or "fp32")


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    """`mlmtune eval`: perplexity of `cfg.model` on fixed masks, over the records `eval_plan` picks.

    With `cfg.pseudo`, pseudo-perplexity too; it needs no blocks, so it works on texts of any length. With
    `cfg.general_eval`, the general check of `forgetting.py`; with `cfg.tokenizer_free`, the figures that compare
    models whose tokenizers differ.

    Returns:
        A dict with scored (which records), eval_texts, eval_loss, perplexity, eval_masked_tokens,
        eval_blocks and, with `cfg.pseudo`, pseudo_perplexity, pseudo_tokens and pseudo_texts; with
        `cfg.general_eval`, general_loss, general_perplexity, general_masked_tokens, general_blocks; with
        `cfg.tokenizer_free`, nll_per_word, bits_per_char, tokenizer_free_texts and tokenizer_free_words; with
        `cfg.downstream`, the probe's downstream_accuracy, downstream_f1 (and their _std) and downstream_runs; with
        `cfg.embedding_eval` on a sentence encoder, embedding_mrr10, embedding_recall1, embedding_texts,
        embedding_pooling.
    """
    model, tokenizer = load_model(cfg.model)
    plan = eval_plan(cfg)
    data, seed, which = plan.data, plan.seed, plan.which
    model.to(resolve_device(cfg.device))
    prepared = bool(data.dataset) and is_prepared(data.dataset)
    if prepared:
        which = "the test split of the prepared folder (or its only split)"

    def texts_scored() -> list[str]:
        if data.streaming:
            return held_out_texts(data)
        if prepared:
            raise MlmtuneError("--pseudo and --tokenizer-free need the texts, not prepared blocks: pass the original "
                               "--dataset")
        split = load_texts(data, seed)
        return list(split["test" if "test" in split else "train"]["text"])

    autocast = None if plan.precision == "fp32" else WEIGHT_DTYPES[plan.precision]
    out: dict = {"model": cfg.model, "dataset": data.dataset, "scored": which, "masking": plan.masking,
                 "eval_precision": plan.precision}
    try:
        check_block_size(data.block_size, model, tokenizer)
        if data.streaming:
            blocks, stats = build_blocks(DatasetDict(test=Dataset.from_dict({"text": texts_scored()})), tokenizer,
                                         data.block_size)
        else:
            blocks, stats = prepare_blocks(data, tokenizer, seed)
        split = "test" if "test" in blocks else "train"
        eval_blocks = Blocks(blocks[split])
        masker = Masker.from_tokenizer(tokenizer, plan.mlm_probability, plan.masking)
        result = perplexity_of(model, iter_eval_masks(eval_blocks, masker, seed), cfg.batch_size,
                               progress=progress, total=len(eval_blocks), autocast=autocast)
        out.update(eval_texts=stats.texts.get(split), eval_loss=result.loss, perplexity=result.perplexity,
                   eval_masked_tokens=result.masked_tokens, eval_blocks=len(eval_blocks))
    except MlmtuneError as e:  # no blocks to score: pseudo-perplexity needs none
        if not (cfg.pseudo or cfg.tokenizer_free):
            raise (MlmtuneError(f"{e}; or pass --pseudo, which scores texts of any length") if isinstance(
                e, TooFewTokens) else e) from None
        out.update(eval_loss=None, perplexity=None, eval_masked_tokens=0, eval_blocks=0,
                   perplexity_skipped=str(e))
    if cfg.pseudo:
        texts = texts_scored()[: cfg.pseudo_max_texts]
        pseudo = pseudo_perplexity(model, tokenizer, texts, progress=progress)
        out.update(pseudo_perplexity=pseudo.perplexity, pseudo_loss=pseudo.loss, pseudo_tokens=pseudo.masked_tokens,
                   pseudo_texts=len(texts))
        out.setdefault("eval_texts", len(texts))
    if cfg.tokenizer_free:
        free = tokenizer_free(model, tokenizer, free_sample(texts_scored(), cfg.pseudo_max_texts or FREE_TEXTS),
                              model.device, batch_size=cfg.batch_size)
        out.update(nll_per_word=free["nll_per_word"], bits_per_char=free["bits_per_char"],
                   tokenizer_free_texts=free["texts"], tokenizer_free_words=free["words"],
                   tokenizer_free_left_out=free["left_out"])
    checks = measurements(tokenizer, Scoring(Dist(), model.device, cfg.batch_size, progress, autocast),
                          *_measured(cfg, data, seed, prepared, model, tokenizer))
    for m in checks:  # what a training run measures before and after, measured once
        out.update(m.flat(m.score(model, m.name.capitalize())))
    return out


def _measured(cfg: EvalConfig, data: DataConfig, seed: int, prepared: bool, model, tokenizer) -> tuple:
    """What `measurements` scores, as a training run on `data` with `seed` would: the general corpus' sample, the
    cloze's held-out cases, the downstream task, a sentence encoder's embedding pairs (None where not asked)."""
    cloze = None
    if cfg.cloze_words != "none":
        if prepared:
            raise MlmtuneError("--cloze-words needs the texts, not prepared blocks: pass the original --dataset")
        cloze = held_out_cases(cfg.cloze_words, data, seed, tokenizer, max_positions(model, tokenizer))
        if cloze is None:
            raise MlmtuneError(f"--cloze-words {cfg.cloze_words}: no case to score in the eval split")
    task = cfg.downstream.task()
    sentence = sentence_encoder(cfg.model) if task is not None or cfg.embedding_eval != "none" else None
    # the seed of the run that made the model, when scoring its data: its figure, reproduced
    downstream = RunProbe(task, seed, model.device, sentence) if task is not None else None
    embedding = None
    if cfg.embedding_eval != "none" and sentence is None:
        say(f"note: no embedding check: {cfg.model} is no sentence encoder (it has no modules.json)")
    elif cfg.embedding_eval != "none":
        if prepared:
            raise MlmtuneError("--embedding-eval needs the texts, not prepared blocks: pass the original --dataset")
        embedding = embedding_check(cfg.embedding_eval, sentence, data, seed, model.device)
    source = general_source(cfg.general_eval)
    general = (source, general_blocks(source, model, tokenizer)) if source else None
    return general, cloze, downstream, embedding


def format_report(r: dict[str, Any]) -> str:
    """`mlmtune eval`'s report without --json: a line for each figure `run_eval` returned."""
    texts = f"{r['eval_texts']:,} records" if r.get("eval_texts") is not None else "records"
    lines = [f"scored {texts} of {r['dataset']}: {r['scored']}"]
    if r["perplexity"] is None:
        lines.append(f"perplexity: skipped ({r['perplexity_skipped']})")
    else:
        lines.append(f"perplexity {r['perplexity']:,.3f} (eval loss {r['eval_loss']:.4f} over "
                     f"{r['eval_masked_tokens']:,} masked tokens in {r['eval_blocks']:,} blocks, "
                     f"{r['eval_precision']})")
    if "pseudo_perplexity" in r:
        lines.append(f"pseudo-perplexity {r['pseudo_perplexity']:,.3f} (over {r['pseudo_tokens']:,} tokens "
                     f"of {r['pseudo_texts']:,} texts)")
    if "nll_per_word" in r:
        lines.append(f"tokenizer-free: {r['nll_per_word']:.4f} nats per word, {r['bits_per_char']:.4f} bits per "
                     f"character (whole-word PLL of {r['tokenizer_free_texts']} texts, "
                     f"{r['tokenizer_free_words']:,} words{_left_out(r['tokenizer_free_left_out'])})")
    if "general_perplexity" in r:
        lines.append(f"general perplexity ({r['general_eval']}) {r['general_perplexity']:,.3f} (loss "
                     f"{r['general_loss']:.4f} over {r['general_masked_tokens']:,} masked tokens in "
                     f"{r['general_blocks']} blocks)")
    if "cloze_top1" in r:
        lines.append(f"cloze ({r['cloze']}): top-1 {r['cloze_top1']:.1%}, top-3 {r['cloze_top3']:.1%} of "
                     f"{r['cloze_cases']} held-out cases ({r['cloze_words']} words)")
    if "downstream_accuracy" in r:
        runs = len(r["downstream_seeds"])
        spread = lambda k: f" ± {r[f'downstream_{k}_std']:.1%}" if runs > 1 else ""  # noqa: E731
        lines.append(f"downstream ({r['downstream']}, {METHOD_NAMES[r['downstream_method']]}, {runs} run"
                     f"{'s' if runs > 1 else ''}): accuracy {r['downstream_accuracy']:.1%}{spread('accuracy')}, "
                     f"macro-F1 {r['downstream_f1']:.1%}{spread('f1')}")
    if "embedding_mrr10" in r:
        lines.append(f"embeddings ({r['embedding_texts']} held-out texts cut in two, {r['embedding_pooling']}): "
                     f"MRR@10 {r['embedding_mrr10']:.3f}, recall@1 {r['embedding_recall1']:.1%}")
    return "\n".join(lines)


def _left_out(n: int) -> str:
    return f"; {n} longer than the model takes left out" if n else ""
