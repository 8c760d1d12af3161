"""Model -> logits, computing the vocabulary head only where a prediction is needed.

In an MLM step only the ~15% masked positions have a label, yet the usual forward projects
every position onto the whole vocabulary: for DistilRoBERTa that projection is about half the
FLOPs of a training step and most of its activation memory. Here the encoder runs as usual,
the hidden states of the wanted positions are gathered, and only those go through the head
(as ModernBERT's `sparse_prediction`, MosaicBERT and cramming do). The result equals the dense
logits at those positions; architectures without a known head layout take the dense path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlmtune.masking import IGNORE_INDEX


def _bert_head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.cls(hidden)


def _roberta_head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden)


def _distilbert_head(model, hidden: torch.Tensor) -> torch.Tensor:
    hidden = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    return model.vocab_projector(hidden)


# class name -> head applied to (P, H) gathered hidden states. Keyed by exact class so that a
# subclass with another head layout falls back to the dense path instead of being wrong.
SPARSE_HEADS: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "BertForMaskedLM": _bert_head,
    "RobertaForMaskedLM": _roberta_head,
    "XLMRobertaForMaskedLM": _roberta_head,
    "CamembertForMaskedLM": _roberta_head,
    "Data2VecTextForMaskedLM": _roberta_head,
    "DistilBertForMaskedLM": _distilbert_head,
}


def has_sparse_head(model) -> bool:
    return type(model).__name__ in SPARSE_HEADS


def logits_at(model, input_ids: torch.Tensor, where: torch.Tensor,
              attention_mask: torch.Tensor | None = None, encoder_grad: bool = True) -> torch.Tensor:
    """Vocabulary logits at the positions where `where` is True, in row-major order.

    Args:
        model: a masked-LM.
        input_ids: (B, T) token ids.
        where: (B, T) bool, the positions to predict.
        attention_mask: (B, T) or None when every position is real.
        encoder_grad: False runs the encoder without autograd (a head-only step); only the head,
            its tied projection included, gets gradients. The dense path relies on `freeze_encoder`.

    Returns:
        (P, V) logits, P = where.sum().
    """
    head = SPARSE_HEADS.get(type(model).__name__)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[where]
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
    return head(model, hidden[where])  # (P, V)


def freeze_encoder(model, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the masked-LM head, for head-only steps.

    With a sparse head the encoder runs without autograd, so a decoder tied to the input embedding
    stays trainable as part of the head; on the dense path it is frozen with the encoder (training it
    there would run the backward pass through the whole encoder to reach the input embedding).
    """
    for p in model.base_model.parameters():
        p.requires_grad_(not frozen)
    if frozen and has_sparse_head(model):
        model.get_output_embeddings().weight.requires_grad_(True)


def masked_nll_sum(model, inputs: torch.Tensor, labels: torch.Tensor,
                   head_only: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of -log p(label) over the labelled positions of one batch, and how many there were."""
    where = labels != IGNORE_INDEX  # (B, T)
    logits = logits_at(model, inputs, where, encoder_grad=not head_only)  # (P, V)
    nll = torch.nn.functional.cross_entropy(logits.float(), labels[where], reduction="sum")
    return nll, int(where.sum())


def backward_masked(model, batches, denominator: int, device: torch.device,
                    autocast_dtype: torch.dtype | None, head_only: bool = False) -> float:
    """Forward and backward over micro-batches, the loss weighted by tokens over `denominator`.

    Args:
        batches: (inputs, labels) pairs of one optimizer step.
        denominator: masked tokens of the whole step (over all ranks in a distributed run), so
            the accumulated gradient is that of the step's token-weighted mean loss.
        autocast_dtype: bf16 for mixed precision, None for fp32.
        head_only: a head warm-up step: no backward pass through the encoder.

    Returns:
        The summed negative log-likelihood of these batches.
    """
    total = 0.0
    for inputs, labels in batches:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            nll, _ = masked_nll_sum(model, inputs.to(device), labels.to(device), head_only)
        (nll / max(denominator, 1)).backward()
        total += float(nll.detach())
    return total
