"""What a run works with and what it leaves: its output folder (checked before any work), its model,
tokenizer, blocks and masker, its engine, its metrics and its output folder.

`train.train` is the lifecycle that uses these; an engine (`Engine` below) is what it asks of PyTorch
(`torch_engine.py`) or Keras (`keras/engine.py`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from datasets import Dataset, DatasetDict

from mlmtune import checkpoint as ckpt
from mlmtune import distributed
from mlmtune.blocks import Blocks, BlockStats, build_blocks
from mlmtune.budget import Probe
from mlmtune.card import plot_curves, write_metrics, write_model_card
from mlmtune.cloze import ClozeCase, held_out_cases
from mlmtune.config import CONFIG_FILENAME, TrainConfig
from mlmtune.data import load_texts
from mlmtune.downstream import RunProbe, downstream_line
from mlmtune.embedding import EmbeddingCheck, embedding_check, embedding_line
from mlmtune.errors import MlmtuneError, say
from mlmtune.findings import Findings, check_data, check_tokenizer
from mlmtune.forward import encoder_layers
from mlmtune.general import free_sample, general_blocks, general_source, tokenizer_free
from mlmtune.hub import push_folder
from mlmtune.lock import LOCK_NAME, FolderLock
from mlmtune.masking import Masker
from mlmtune.model import check_block_size, load_model, max_positions
from mlmtune.options import save_config
from mlmtune.prepare import cache_root, is_prepared, prepare_blocks, prepared_words
from mlmtune.sentence import SentenceEncoder, copy_files, sentence_encoder
from mlmtune.stream import held_out_texts
from mlmtune.torch_engine import TorchEngine
from mlmtune.vocab import TOKENS_PER_WORD_TEXTS, Grown, add_words, choose_words, init_rows, tokens_per_word


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    rank: int = 0  # this process's rank: under torchrun only rank 0 reports


class Engine(Protocol):
    """What `train()` asks of a training engine; everything else (data, masks, the learning rate of each step,
    evaluation, checkpoints, metrics, the output folder) is `train()`'s, the same for every engine."""

    dist: distributed.Dist
    device: torch.device  # where the PyTorch model evaluates
    precision: str  # what the steps compute in: fp32, bf16 or fp16
    pin_memory: bool  # batches are pinned for asynchronous copies to a GPU

    @classmethod
    def open(cls, cfg: TrainConfig) -> tuple[Engine, TrainConfig]:
        """Join the job and refuse what this engine cannot do, before any data is read."""

    @staticmethod
    def check_model(model) -> str | None:
        """Refuse (MlmtuneError) a model this engine cannot train; a line on what it will train, or None."""

    @staticmethod
    def probe(cfg: TrainConfig, model, tokenizer, train_blocks: Blocks, device: torch.device) -> Probe:
        """Seconds per optimizer step (full, or head-only) as this engine trains, for --time-budget."""

    def session(self):
        """A context manager around the whole run (deterministic kernels for PyTorch)."""

    def attach(self, model) -> None:
        """Take the loaded model (a new head already seeded), before the step counts are planned."""

    def start(self, cfg: TrainConfig, tokenizer) -> None:
        """Set up the optimizer and whatever the steps need, from the run's final config."""

    def describe(self) -> str: ...

    def restore(self, path: Path, state: ckpt.TrainState) -> None:
        """A checkpoint's weights and optimizer state, read into the engine."""

    def set_phase(self, head_only: bool) -> None:
        """Train the new head alone (the encoder frozen), or the whole model, from the next step on."""

    def step(self, step: int, batches: list, n_masked: int, learning_rate: float, head_only: bool):
        """One optimizer step over this rank's micro-batches; returns this rank's share of the step's mean loss
        (a 0-d tensor or a float: nothing here waits for a GPU)."""

    def sync(self) -> None:
        """Wait for queued device work (before a clock is read)."""

    def eval_model(self) -> torch.nn.Module:
        """The PyTorch model (or sharded root) that evaluation runs, holding the current weights."""

    def shard_writer(self, state: ckpt.TrainState) -> Callable[[Path], None] | None:
        """What writes this rank's shards of a sharded checkpoint (--fsdp), or None for full files."""

    def checkpoint(self, state: ckpt.TrainState) -> tuple[torch.nn.Module | None, dict]:
        """The full model (rank 0; None elsewhere) and the optimizer state to write; every rank calls it."""

    def output_model(self) -> torch.nn.Module | None:
        """The full model to write as the output (rank 0); every rank calls it."""

    def metrics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def engine_class(backend: str) -> type[Engine]:
    """The engine of a --backend. Keras' is imported only then: keras and tensorflow are an optional
    dependency (`require` says how to install them) that takes seconds to import."""
    if backend == "keras":
        from mlmtune.keras import require

        require()
        from mlmtune.keras.engine import KerasEngine

        return KerasEngine
    return TorchEngine


def check_output_dir(out: Path, resume: bool, lock: FolderLock | None = None) -> None:
    """Refuse to write over the work of another run, and fail now rather than after training. `lock`: taken
    here, before the folder is read, so that a second run on it is refused while this one runs."""
    if out.exists() and not out.is_dir():
        raise MlmtuneError(f"--output-dir {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlmtuneError(f"--output-dir {out} is not writable: {e.strerror or e}") from None
    if lock is not None:
        lock.acquire()
    try:
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            if not resume:
                raise MlmtuneError(f"--output-dir {out} is not empty; pass --resume to continue the run in it, "
                                   f"or choose another --output-dir")
            if not ckpt.is_run_dir(out):
                raise MlmtuneError(f"--output-dir {out} holds files but no mlmtune run (no checkpoints/ or "
                                   f"{CONFIG_FILENAME}); --resume continues a run: choose another --output-dir")
        try:
            fd, probe = tempfile.mkstemp(prefix=".tmp-write-test-", dir=out)  # a name nobody else uses
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise MlmtuneError(f"--output-dir {out} is not writable: {e.strerror or e}") from None
    except BaseException:
        if lock is not None:
            lock.release()
        raise


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
    model, tokenizer = load_model(cfg.model, attn_implementation=cfg.attn_implementation)
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
    if cfg.freeze_layers >= max(layers, 1):
        raise MlmtuneError(f"--freeze-layers {cfg.freeze_layers}: {cfg.model} has {layers} encoder layers, so at "
                           f"most {layers - 1} can be frozen (--head-warmup-steps trains the head alone)")
    grown = (distributed.main_first(d, lambda: grow_vocabulary(cfg, model, tokenizer, device, d.main))
             if cfg.add_tokens else None)
    source = general_source(cfg.general_eval, quiet=not d.main)
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
    cloze = held_out_cases(cfg.cloze_words, cfg.data, cfg.seed, tokenizer, max_positions(model, tokenizer),
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
    task = cfg.downstream.task()
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
    check = embedding_check(cfg.embedding_eval, sentence, cfg.data, cfg.seed, device or torch.device("cpu"), held)
    if check is None:
        return None, None
    return _scored_before(cfg, check, model, tokenizer, embedding_line)


def _scored_before(cfg: TrainConfig, measure, model, tokenizer, line) -> tuple[Any, dict | None]:
    """A measurement that rank 0 takes of the model as loaded: said, and scored unless a checkpoint to resume
    already holds its figure (None then: the checkpoint's state has it)."""
    say(measure.describe())
    if cfg.resume and ckpt.list_checkpoints(Path(cfg.output_dir)):
        return measure, None
    before = measure(model, tokenizer)
    say(line("Before training", before))
    return measure, before


def grow_vocabulary(cfg: TrainConfig, model, tokenizer, device, main: bool) -> Grown:
    """--add-tokens: choose the words (mined from the training split, read from a FILE, or those a prepared
    folder was made with), score the tokenizer-free figures of the model as loaded (rank 0), add the words and
    start their rows from their pieces'."""
    data, train_texts, held = cfg.data, None, []
    if data.dataset and is_prepared(data.dataset):
        words = prepared_words(data.dataset)
        if words is None:
            raise MlmtuneError(f"{data.dataset} was prepared without --add-tokens: prepare it again with "
                               f"--add-tokens {cfg.add_tokens}, or train without --add-tokens")
        say(f"--add-tokens: the {len(words)} words {data.dataset} was prepared with")
    else:
        if data.streaming:
            held = held_out_texts(data) if data.eval_records else []
        else:
            split = load_texts(data, cfg.seed)
            train_texts = list(split["train"]["text"])
            held = list(split["test"]["text"]) if "test" in split else []
        words = choose_words(cfg.add_tokens, cfg.add_numbers, train_texts, tokenizer)
    counted = (train_texts or held)[:TOKENS_PER_WORD_TEXTS]
    free_texts = free_sample(held)
    free_before = tokenizer_free(model, tokenizer, free_texts, device) if main and free_texts else None
    before = tokens_per_word(counted, tokenizer)
    init_rows(model, tokenizer, add_words(tokenizer, words))
    after = tokens_per_word(counted, tokenizer)
    shown = ", ".join(words[:8]) + (", ..." if len(words) > 8 else "")
    per_word = f"; tokens per word {before:.3f} -> {after:.3f}" if before is not None else ""
    if main:
        say(f"Added {len(words)} words to the tokenizer ({shown}){per_word}")
    return Grown(words, before, after, free_texts, free_before)


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


def run_metrics(cfg: TrainConfig, run: Run, state: ckpt.TrainState, after: dict | None) -> dict[str, Any]:
    """The metrics every engine reports, from the loop state and the last evaluation."""
    before = state.eval_before
    return {
        "model": cfg.model,
        "dataset": cfg.data.dataset,
        "eval_loss_before": before["eval_loss"] if before else None,
        "perplexity_before": before["perplexity"] if before else None,
        "eval_loss_after": after["eval_loss"] if after else None,
        "perplexity_after": after["perplexity"] if after else None,
        "eval_masked_tokens": before["masked_tokens"] if before else 0,
        "epochs": state.epochs,
        "train_loss": state.train_loss,
        "train_steps": state.step,
        "head_warmup_steps": cfg.head_warmup_steps,
        "time_budget": cfg.time_budget,
        "train_tokens": state.train_tokens,
        "train_seconds": round(state.train_seconds, 3),
        "train_tokens_per_second": round(state.train_tokens / state.train_seconds, 1) if state.train_seconds else None,
        "train_blocks": run.n_train,
        "streaming": cfg.data.streaming,
        "eval_blocks": 0 if run.eval_blocks is None else len(run.eval_blocks),
        "block_size": cfg.data.block_size,
        "dropped_tokens": run.stats.total_dropped,
        "backend": cfg.backend,
        "masking": cfg.masking,
        **(_token_metrics(before, after) if cfg.masking != "token" else {}),
    }


def _token_metrics(before: dict | None, after: dict | None) -> dict[str, Any]:
    """A whole-word or span run scored on the token scheme's masks too: one yardstick for every scheme."""
    return {"token_eval_loss_before": before.get("token_eval_loss") if before else None,
            "token_perplexity_before": before.get("token_perplexity") if before else None,
            "token_eval_loss_after": after.get("token_eval_loss") if after else None,
            "token_perplexity_after": after.get("token_perplexity") if after else None}


def write_output(cfg: TrainConfig, out: Path, model, tokenizer, metrics: dict[str, Any],
                 added: list[str] | None = None, sentence: SentenceEncoder | None = None) -> None:
    """The output folder: an ordinary Hugging Face model folder plus the run's records (added_tokens.txt: the
    words --add-tokens added) and, from a sentence encoder, its sentence-transformers files (the Transformer module
    is the folder itself: the trained weights and tokenizer); then the push."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if added:
            (folder / "added_tokens.txt").write_text("".join(f"{w}\n" for w in added), encoding="utf-8")
        if sentence is not None:
            copy_files(sentence, folder)
        save_config(cfg, folder)
        write_metrics(metrics, folder)
        plot_curves(metrics, folder)
        write_model_card(cfg, metrics, folder, tokenizer.mask_token, name=out.resolve().name)

    ckpt.write_final(out, write)
    if cfg.push_to_hub:
        repo = cfg.hub_model_id or out.resolve().name
        say(f"Pushed to {push_folder(str(out), repo)}")
