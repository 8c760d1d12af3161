"""Model -> logits -> loss: perplexity on fixed masks, and pseudo-perplexity.

Both are token-weighted: the loss is the sum of negative log-likelihoods over all masked
tokens divided by their count, never a mean of per-batch means (which over-weights batches
with few masked tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mlmtune.forward import logits_at, masked_nll_sum


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    masked_tokens: int


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.inference_mode()
def perplexity_of(model, chunks, batch_size: int = 16, progress: bool = True, desc: str = "Evaluating",
                  total: int | None = None, reduce=None) -> EvalResult:
    """Perplexity = exp(token-weighted mean NLL) over masked blocks.

    Args:
        model: a masked-LM.
        chunks: an iterable of (inputs, labels) pairs of (n, T) tensors, e.g. `iter_eval_masks`;
            labels hold the original ids at masked positions and IGNORE_INDEX elsewhere.
        batch_size: blocks per forward pass (does not change the result).
        total: number of blocks, for the progress bar.
        reduce: sums [nll, count] over the ranks of a distributed run (None: one process).

    Returns:
        EvalResult(loss, perplexity, masked_tokens).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="block")
    for inputs, labels in chunks:
        for start in range(0, len(inputs), batch_size):
            nll, n = masked_nll_sum(model, inputs[start : start + batch_size].to(device),
                                    labels[start : start + batch_size].to(device))
            total_nll += float(nll)
            count += n
            bar.update(len(inputs[start : start + batch_size]))
    bar.close()
    model.train(was_training)
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
    from mlmtune.model import max_positions

    model.eval()
    device = next(model.parameters()).device
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    limit = max_positions(model, tokenizer)
    total, count = 0.0, 0
    for text in tqdm(texts, desc="Pseudo-perplexity", disable=not progress, leave=False):
        ids = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")["input_ids"][0]
        positions = torch.nonzero(~torch.isin(ids, special)).flatten()
        for start in range(0, len(positions), batch_size):
            pos = positions[start : start + batch_size]  # (P,)
            batch = ids.repeat(len(pos), 1)  # (P, T): one copy per masked position
            batch[torch.arange(len(pos)), pos] = tokenizer.mask_token_id
            where = batch == tokenizer.mask_token_id  # exactly one position per row
            picked = logits_at(model, batch.to(device), where.to(device)).float()  # (P, V)
            logp = picked.log_softmax(-1).gather(1, ids[pos].to(device)[:, None])
            total -= float(logp.sum())
            count += len(pos)
    loss = total / count if count else float("nan")
    return EvalResult(loss=loss, perplexity=_perplexity(loss), masked_tokens=count)


def run_eval(cfg) -> dict:
    """`mlmtune eval`: perplexity of `cfg.model` on the eval split of `cfg.data`, on fixed masks.

    The eval split is the `test` split made with the same seed and --test-size as training (so
    this reproduces a run's `perplexity_after`), or the whole split with --test-size 0.

    Returns:
        A dict with eval_loss, perplexity, eval_masked_tokens, eval_blocks and, with
        `cfg.pseudo`, pseudo_perplexity, pseudo_tokens and pseudo_texts.
    """
    from mlmtune.blocks import Blocks, is_prepared, prepare_blocks
    from mlmtune.data import load_texts
    from mlmtune.errors import MlmtuneError
    from mlmtune.masking import Masker, iter_eval_masks
    from mlmtune.model import check_block_size, load_model, pick_device

    model, tokenizer = load_model(cfg.model)
    check_block_size(cfg.data.block_size, model, tokenizer)
    model.to(pick_device())
    blocks, _ = prepare_blocks(cfg.data, tokenizer, cfg.seed)
    split = "test" if "test" in blocks else "train"
    eval_blocks = Blocks(blocks[split])
    masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability)
    result = perplexity_of(model, iter_eval_masks(eval_blocks, masker, cfg.seed), cfg.batch_size,
                           total=len(eval_blocks))
    out = {"model": cfg.model, "eval_loss": result.loss, "perplexity": result.perplexity,
           "eval_masked_tokens": result.masked_tokens, "eval_blocks": len(eval_blocks)}
    if cfg.pseudo:
        if is_prepared(cfg.data.dataset):
            raise MlmtuneError("--pseudo needs the texts, not prepared blocks: pass the original --dataset")
        texts = list(load_texts(cfg.data, cfg.seed)[split]["text"])[: cfg.pseudo_max_texts]
        pseudo = pseudo_perplexity(model, tokenizer, texts)
        out.update(pseudo_perplexity=pseudo.perplexity, pseudo_loss=pseudo.loss, pseudo_tokens=pseudo.masked_tokens,
                   pseudo_texts=len(texts))
    return out
