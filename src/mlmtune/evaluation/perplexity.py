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

from mlmtune.model.forward import logits_where, masked_nll_sum
from mlmtune.model.load import max_positions


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
