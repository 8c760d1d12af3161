"""What a run works with (`Run`, made by `load_run`): its model and tokenizer (the vocabulary grown with
--add-tokens), its blocks and masker, the general check's sample, the cloze's cases, and the downstream probe's
and the embedding check's figures of the model as loaded; the run's perplexity on its eval split (`evaluator`) and
the figures of its grown vocabulary (`vocabulary_metrics`). `train.train` is the lifecycle that uses them;
`output.py` checks and writes the output folder; `engine.py` says what an engine does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict

from mlmtune import distributed
from mlmtune.config import TrainConfig
from mlmtune.data.blocks import Blocks, BlockStats, build_blocks
from mlmtune.data.masking import Masker
from mlmtune.data.prepare import cache_root, is_prepared, prepare_blocks
from mlmtune.data.stream import held_out_texts
from mlmtune.errors import MlmtuneError, say
from mlmtune.evaluation.cloze import ClozeCase, held_out_cases
from mlmtune.evaluation.downstream import RunProbe, downstream_line
from mlmtune.evaluation.embedding import EmbeddingCheck, embedding_check, embedding_line
from mlmtune.evaluation.forgetting import general_blocks, general_source, tokenizer_free
from mlmtune.evaluation.measurements import Scoring, ranks_perplexity
from mlmtune.evaluation.perplexity import EvalResult
from mlmtune.model.forward import encoder_layers
from mlmtune.model.load import check_block_size, load_model, max_positions
from mlmtune.model.sentence import SentenceEncoder, sentence_encoder
from mlmtune.training import checkpoint as ckpt
from mlmtune.training.engine import Engine
from mlmtune.training.preflight import Findings, check_data, check_tokenizer
from mlmtune.training.vocab import Grown, grow_vocabulary


@dataclass
class Run:
    """What a run trains on and with: model, tokenizer, blocks, masker (the same for every engine)."""

    model: Any
    tokenizer: Any
    stats: BlockStats
    train_blocks: Blocks | None  # None: a stream, read as it trains
    eval_blocks: Blocks | None
    masker: Masker
    general: tuple[str, Blocks] | None = None  # --general-eval: the corpus and its fixed sample
    vocabulary: Grown | None = None  # what --add-tokens added
    cloze: tuple[str, list[ClozeCase]] | None = None  # --cloze-words: which words, and the held-out cases
    downstream: RunProbe | None = None  # --downstream: the task (rank 0 only)
    downstream_before: dict | None = None  # and its probe of the model as loaded (None when resuming)
    sentence: SentenceEncoder | None = None  # a sentence encoder's modules, kept in the output (rank 0 only)
    embedding: EmbeddingCheck | None = None  # its embedding check (rank 0 only)
    embedding_before: dict | None = None  # and the check of the model as loaded (None when resuming)

    @property
    def n_train(self) -> int | None:
        return None if self.train_blocks is None else len(self.train_blocks)


def _held_out_blocks(cfg: TrainConfig, tokenizer, texts: list[str]):
    """With --streaming: blocks of the first --eval-records records (`texts`), the eval split."""
    if not cfg.data.eval_records:
        return DatasetDict(), BlockStats({}, {}, {})
    return build_blocks(DatasetDict(test=Dataset.from_dict({"text": texts})), tokenizer, cfg.data.block_size)


def _cached_first(d: distributed.Dist, data):
    """Who tokenizes first: rank 0, when every rank reads the block cache it writes; else the first rank of each
    node (nodes with their own disks), so that no rank tokenizes while another waits for it in a collective."""
    if not d.enabled or (data.dataset and is_prepared(data.dataset)):
        return distributed.main_first
    root = cache_root(data)
    if not distributed.blind_ranks(d, root):
        return distributed.main_first
    say(f"note: the block cache {root} is not shared by every rank: the first rank of each node tokenizes")
    return distributed.node_first


def load_run(cfg: TrainConfig, d: distributed.Dist, check_model: Callable[[Any], Any] | None = None,
             device: torch.device | None = None) -> Run:
    """Model and tokenizer (a new seeded head when the folder has none; the domain's words added with
    --add-tokens), blocks, the general check's sample and the preflight warnings.

    Args:
        check_model: called on the model before the data is read, to refuse one the engine cannot train.
        device: where rank 0 scores the tokenizer-free figures before the vocabulary grows.
    """
    torch.manual_seed(cfg.seed)  # a new head (or any new weight) starts the same way every run
    model, tokenizer = load_model(cfg.model, attn_implementation=cfg.compute.attn_implementation)
    if check_model is not None:
        check_model(model)
    check_block_size(cfg.data.block_size, model, tokenizer)
    sentence = sentence_encoder(cfg.model) if d.main else None  # rank 0 checks and writes: only it reads them
    probe, before = distributed.main_first(d, lambda: downstream_before(cfg, model, tokenizer, device, sentence,
                                                                        d.main))
    held = held_out_texts(cfg.data) if cfg.data.streaming and cfg.data.eval_records else None  # read once
    embedding, embedded = distributed.main_first(d, lambda: embedding_before(cfg, model, tokenizer, device, sentence,
                                                                            held, d.main))
    layers = len(encoder_layers(model))
    if cfg.optim.freeze_layers >= max(layers, 1):
        raise MlmtuneError(f"--freeze-layers {cfg.optim.freeze_layers}: {cfg.model} has {layers} encoder layers, so at "
                           f"most {layers - 1} can be frozen (--head-warmup-steps trains the head alone)")
    grown = (distributed.main_first(d, lambda: grow_vocabulary(cfg, model, tokenizer, device, d.main))
             if cfg.add_tokens else None)
    source = general_source(cfg.measure.general_eval, quiet=not d.main)
    general = (source, distributed.main_first(d, lambda: general_blocks(source, model, tokenizer))) if source else None

    # text -> tokens -> blocks: tokenized once, by rank 0; the other ranks read its cache. A stream
    # is tokenized as it is read; only its held-out eval records are prepared up front.
    if cfg.data.streaming:
        blocks, stats = _held_out_blocks(cfg, tokenizer, held)
    else:
        blocks, stats = _cached_first(d, cfg.data)(d, lambda: prepare_blocks(cfg.data, tokenizer, cfg.seed))
    preflight = Findings()  # the cheap checks of `mlmtune check`; the errors among them have raised already
    check_tokenizer(tokenizer, preflight)
    check_data(stats, cfg.data.block_size, preflight)
    for message in preflight.warnings:
        say(f"warning: {message}")
    train_blocks = Blocks(blocks["train"]) if "train" in blocks else None  # read per batch from the memory map
    eval_blocks = Blocks(blocks["test"]) if "test" in blocks else None
    n_train = "a stream of" if train_blocks is None else len(train_blocks)
    say(f"Blocks: {n_train} train, {0 if eval_blocks is None else len(eval_blocks)} eval, "
        f"{cfg.data.block_size} tokens each; {stats.total_dropped} tokens dropped by grouping")
    check_words(cfg, tokenizer, [b for b in (train_blocks, eval_blocks) if b is not None])
    masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability, cfg.masking)
    if general is not None:
        say(f"General check: {len(general[1])} blocks of {source} ({general[1].block_size} tokens each, fixed "
            f"token masks at 15%), scored before and after training")
    cloze = held_out_cases(cfg.measure.cloze_words, cfg.data, cfg.seed, tokenizer, max_positions(model, tokenizer),
                           quiet=not d.main, held=held)
    if cloze is not None:
        say(f"Cloze: {len(cloze[1])} held-out occurrences of {len({c.word for c in cloze[1]})} words "
            f"({cloze[0]}), each masked whole, scored top-1 and top-3 before and after training")
    return Run(model, tokenizer, stats, train_blocks, eval_blocks, masker, general, grown, cloze, probe, before,
               sentence, embedding, embedded)


def downstream_before(cfg: TrainConfig, model, tokenizer, device, sentence: SentenceEncoder | None,
                      main: bool) -> tuple[RunProbe | None, dict | None]:
    """--downstream (rank 0): the task, read and checked before any training, and the probe of the model as loaded
    (before its vocabulary grows), unless a checkpoint to resume already holds it. A sentence encoder is probed
    through its own pooling."""
    task = cfg.measure.downstream.task()
    if task is None or not main:
        return None, None
    return _scored_before(cfg, RunProbe(task, cfg.seed, device or torch.device("cpu"), sentence), model, tokenizer,
                          downstream_line)


def embedding_before(cfg: TrainConfig, model, tokenizer, device, sentence: SentenceEncoder | None,
                     held: list[str] | None, main: bool) -> tuple[EmbeddingCheck | None, dict | None]:
    """A sentence encoder's embedding check (rank 0): the pairs drawn from the eval split and the check of the model
    as loaded (before its vocabulary grows), unless a checkpoint to resume already holds it."""
    if not main:
        return None, None
    check = embedding_check(cfg.measure.embedding_eval, sentence, cfg.data, cfg.seed, device or torch.device("cpu"),
                            held)
    if check is None:
        return None, None
    return _scored_before(cfg, check, model, tokenizer, embedding_line)


def _scored_before(cfg: TrainConfig, measure, model, tokenizer, line) -> tuple[Any, dict | None]:
    """A measurement that rank 0 takes of the model as loaded: said, and scored unless a checkpoint to resume
    already holds its figure (None then: the checkpoint's state has it)."""
    say(measure.describe())
    if cfg.output.resume and ckpt.list_checkpoints(Path(cfg.output.output_dir)):
        return measure, None
    before = measure(model, tokenizer)
    say(line("Before training", before))
    return measure, before


def check_words(cfg, tokenizer, blocks: list[Blocks]) -> None:
    """--masking whole-word and span need each token's word: refuse blocks made without them, before training."""
    if cfg.masking == "token":
        return
    if not getattr(tokenizer, "is_fast", False):
        raise MlmtuneError(f"--masking {cfg.masking} needs the words of a fast tokenizer, and the tokenizer of "
                           f"{cfg.model} is not one: use --masking token")
    if any(not b.has_words for b in blocks):
        raise MlmtuneError(f"--masking {cfg.masking} needs word boundaries, and the blocks of {cfg.data.dataset} have "
                           f"none (prepared by an older mlmtune): run mlmtune prepare again, or use --masking token")


def evaluator(cfg: TrainConfig, run: Run, engine: Engine, scoring: Scoring) -> Callable[[str], EvalResult | None]:
    """Perplexity of the engine's current weights on the eval split (under `scoring.autocast`), with the masks
    `iter_eval_masks` draws from the seed in the run's scheme (and in the token scheme too, when the run's is
    another); None without an eval split."""
    token_masker = Masker.from_tokenizer(run.tokenizer, cfg.mlm_probability) if cfg.masking != "token" else None

    def evaluate(desc: str) -> EvalResult | None:
        if run.eval_blocks is None:
            return None
        model = engine.eval_model()
        result = ranks_perplexity(scoring, model, run.eval_blocks, run.masker, cfg.seed, desc)
        if token_masker is None:
            return result
        return dataclasses.replace(result, token=ranks_perplexity(scoring, model, run.eval_blocks, token_masker,
                                                                  cfg.seed, f"{desc}, token masks"))

    return evaluate


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
