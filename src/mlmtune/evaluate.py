"""Model -> logits -> loss: perplexity on fixed masks, and pseudo-perplexity.

Both are token-weighted: the loss is the sum of negative log-likelihoods over all masked
tokens divided by their count, never a mean of per-batch means (which over-weights batches
with few masked tokens).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm

from mlmtune.blocks import Blocks, TooFewTokens, build_blocks
from mlmtune.cloze import cloze_accuracy, held_out_cases
from mlmtune.config import CONFIG_FILENAME, DataConfig, EvalConfig
from mlmtune.data import load_texts
from mlmtune.device import WEIGHT_DTYPES, resolve_device
from mlmtune.downstream import RunProbe, eval_entry
from mlmtune.embedding import embedding_check
from mlmtune.errors import MlmtuneError, say
from mlmtune.forward import logits_where, masked_nll_sum
from mlmtune.general import (
    FREE_TEXTS,
    GENERAL_SEED,
    free_sample,
    general_blocks,
    general_entry,
    general_masker,
    general_source,
    tokenizer_free,
)
from mlmtune.masking import Masker, iter_eval_masks
from mlmtune.model import check_block_size, load_model, max_positions
from mlmtune.prepare import is_prepared, prepare_blocks
from mlmtune.sentence import sentence_encoder
from mlmtune.stream import held_out_texts


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    masked_tokens: int
    token: EvalResult | None = None
    """The same model scored on the token scheme's masks, when the run masks whole words or spans."""


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()  # not inference_mode: FSDP's root keeps the weights it gathers, which must stay ordinary tensors
def perplexity_of(model, chunks, batch_size: int = 16, progress: bool = True, desc: str = "Evaluating",
                  total: int | None = None, reduce=None, autocast: torch.dtype | None = None) -> EvalResult:
    """Perplexity = exp(token-weighted mean NLL) over masked blocks.

    Args:
        model: a masked-LM, or the root of a sharded one (a `MaskedLMLoss` under FSDP).
        chunks: an iterable of (inputs, labels) pairs of (n, T) tensors, e.g. `iter_eval_masks`;
            labels hold the original ids at masked positions and IGNORE_INDEX elsewhere.
        batch_size: blocks per forward pass (does not change the result).
        total: number of blocks, for the progress bar.
        reduce: sums [nll, count] over the ranks of a distributed run (None: one process).
        autocast: run the forward passes under this autocast dtype (bf16, fp16; None: fp32). The weights stay as
            they are, and the loss is summed in fp32 (float64 over batches) either way.

    Returns:
        EvalResult(loss, perplexity, masked_tokens).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, count = [], 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="block")
    for inputs, labels in chunks:
        for start in range(0, len(inputs), batch_size):
            # labels stay on the CPU, where their positions are found; the sums stay on the device
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                nll, n = masked_nll_sum(model, inputs[start : start + batch_size],
                                        labels[start : start + batch_size], device=device)
            sums.append(nll.double())
            count += n
            bar.update(len(inputs[start : start + batch_size]))
    bar.close()
    if hasattr(model, "reshard"):  # FSDP's root: free the gathered weights, put the shards (the optimizer's) back
        model.reshard()
    model.train(was_training)
    total_nll = float(torch.stack(sums).sum()) if sums else 0.0
    if reduce is not None:
        total_nll, count = reduce([total_nll, float(count)])
        count = int(count)
    loss = total_nll / count if count else float("nan")
    return EvalResult(loss=loss, perplexity=_perplexity(loss), masked_tokens=count)


def perplexity(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16,
               progress: bool = True, desc: str = "Evaluating") -> EvalResult:
    """`perplexity_of` for (N, T) tensors already in memory, e.g. from `fixed_eval_masks`."""
    return perplexity_of(model, [(inputs, labels)], batch_size, progress, desc, total=len(inputs))


@torch.inference_mode()
def pseudo_perplexity(model, tokenizer, texts: list[str], batch_size: int = 32, progress: bool = True) -> EvalResult:
    """Pseudo-perplexity (Salazar et al., 2020): every non-special token masked in turn.

    Each text is tokenized on its own with the model's special tokens and truncated to the
    model's maximum length. PPPL = exp(sum of -log p(token | rest) / number of tokens).
    """
    model.eval()
    device = next(model.parameters()).device
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    limit = max_positions(model, tokenizer)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: one wait at the end
    for text in tqdm(texts, desc="Pseudo-perplexity", disable=not progress, leave=False):
        ids = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")["input_ids"][0]
        positions = torch.nonzero(~torch.isin(ids, special)).flatten()
        for start in range(0, len(positions), batch_size):
            pos = positions[start : start + batch_size]  # (P,)
            batch = ids.repeat(len(pos), 1)  # (P, T): one copy per masked position
            batch[torch.arange(len(pos)), pos] = tokenizer.mask_token_id
            where = batch == tokenizer.mask_token_id  # exactly one position per row, found on the CPU
            picked = logits_where(model, batch.to(device), where).float()  # (P, V)
            logp = picked.log_softmax(-1).gather(1, ids[pos].to(device)[:, None])
            total -= logp.sum().double()
            count += len(pos)
    total = float(total)
    loss = total / count if count else float("nan")
    return EvalResult(loss=loss, perplexity=_perplexity(loss), masked_tokens=count)


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
    `cfg.general_eval`, the general check of `general.py`; with `cfg.tokenizer_free`, the figures that compare
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
    if cfg.cloze_words != "none":
        if prepared:
            raise MlmtuneError("--cloze-words needs the texts, not prepared blocks: pass the original --dataset")
        held = held_out_cases(cfg.cloze_words, data, seed, tokenizer, max_positions(model, tokenizer))
        if held is None:
            raise MlmtuneError(f"--cloze-words {cfg.cloze_words}: no case to score in the eval split")
        out.update(cloze=held[0], **cloze_accuracy(model, tokenizer, held[1], model.device, cfg.batch_size))
    task = cfg.downstream.task()
    sentence = sentence_encoder(cfg.model) if task is not None or cfg.embedding_eval != "none" else None
    if task is not None:  # the seed of the run that made the model, when scoring its data: its figure, reproduced
        out.update(eval_entry(RunProbe(task, seed, model.device, sentence)(model, tokenizer)))
    if cfg.embedding_eval != "none" and sentence is None:
        say(f"note: no embedding check: {cfg.model} is no sentence encoder (it has no modules.json)")
    elif cfg.embedding_eval != "none":
        if prepared:
            raise MlmtuneError("--embedding-eval needs the texts, not prepared blocks: pass the original --dataset")
        check = embedding_check(cfg.embedding_eval, sentence, data, seed, model.device)
        if check is not None:
            out.update(check(model, tokenizer))
    source = general_source(cfg.general_eval)
    if source:
        blocks = general_blocks(source, model, tokenizer)
        result = perplexity_of(model, iter_eval_masks(blocks, general_masker(tokenizer), GENERAL_SEED),
                               cfg.batch_size, progress=progress, desc="General check", total=len(blocks),
                               autocast=autocast)
        out.update(general_entry(result, source, blocks))
    return out
