"""Model -> logits, computing the vocabulary head only where a prediction is needed.

In an MLM step only the ~15% masked positions have a label, yet the usual forward projects
every position onto the whole vocabulary: for DistilRoBERTa that projection is about half the
FLOPs of a training step and most of its activation memory. Here the encoder runs as usual,
the hidden states of the wanted positions are gathered, and only those go through the head
(as ModernBERT's `sparse_prediction`, MosaicBERT and cramming do). The result equals the dense
logits at those positions; architectures without a known head layout take the dense path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mlmtune.data.masking import IGNORE_INDEX
from mlmtune.errors import MlmtuneError


def _bert_head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.cls(hidden)


def _roberta_head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden)


def _distilbert_head(model, hidden: torch.Tensor) -> torch.Tensor:
    hidden = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    return model.vocab_projector(hidden)


def _modernbert_head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.decoder(model.head(hidden))  # ModernBERT's own sparse_prediction gathers at the same place


def _eurobert_head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden)  # the final norm is the encoder's


# class name -> head applied to (P, H) gathered hidden states. Keyed by exact class so that a
# subclass with another head layout falls back to the dense path instead of being wrong.
SPARSE_HEADS: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "BertForMaskedLM": _bert_head,
    "RobertaForMaskedLM": _roberta_head,
    "XLMRobertaForMaskedLM": _roberta_head,
    "CamembertForMaskedLM": _roberta_head,
    "Data2VecTextForMaskedLM": _roberta_head,
    "DistilBertForMaskedLM": _distilbert_head,
    "ModernBertForMaskedLM": _modernbert_head,  # ModernBERT and mmBERT
    "EuroBertForMaskedLM": _eurobert_head,
}


def has_sparse_head(model) -> bool:
    return type(model).__name__ in SPARSE_HEADS


def describe_head(model) -> str:
    """Which vocabulary head a run of `model` computes, and why (for `mlmtune check`)."""
    name = type(model).__name__
    if name in SPARSE_HEADS:
        return f"head: sparse (the vocabulary projection at the masked positions only; {name}'s layout is known)"
    return (f"head: dense (the vocabulary projection at every position, then the masked ones picked: {name}'s "
            f"head layout is not one mlmtune knows; correct, but slower and heavier)")


def pad_rows(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows of different lengths as one right-padded batch: ids and attention mask, both (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        attention[i, : len(r)] = 1
    return ids, attention


def logits_at_positions(model, input_ids: torch.Tensor, positions: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, encoder_grad: bool = True) -> torch.Tensor:
    """Vocabulary logits at flat positions (row-major indices into the (B, T) batch).

    Indexing by positions, not by a boolean mask, lets the caller find them on the CPU, where the
    masks were drawn: the device never waits for the host to learn how many there are.

    Args:
        model: a masked-LM.
        input_ids: (B, T) token ids.
        positions: (P,) long, indices into the flattened (B*T) batch, on the model's device.
        attention_mask: (B, T) or None when every position is real.
        encoder_grad: False runs the encoder without autograd (a head-only step); only the head,
            its tied projection included, gets gradients. The dense path relies on `freeze_encoder`.

    Returns:
        (P, V) logits.
    """
    runtime = getattr(model, "logits_at_positions", None)
    if runtime is not None:  # another runtime with this call surface (`onnx_runtime.OnnxMaskedLM`)
        return runtime(input_ids, positions, attention_mask)
    head = SPARSE_HEADS.get(type(model).__name__)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        return logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
    return head(model, hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))  # (P, V)


def logits_where(model, input_ids: torch.Tensor, where: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Vocabulary logits at the positions where `where` ((B, T) bool) is True, in row-major order: (P, V). Give
    `where` on the CPU (where the texts were tokenized): the positions are found there, and the device never
    waits for the host to learn how many there are."""
    positions = torch.nonzero(where.reshape(-1)).squeeze(1)
    return logits_at_positions(model, input_ids, positions.to(input_ids.device, non_blocking=True), attention_mask)


def encoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The encoder's repeated blocks: the longest ModuleList in the model (BERT's and RoBERTa's
    `encoder.layer`, DistilBERT's `transformer.layer`)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def freeze_encoder(model, frozen: bool, lower_layers: int = 0) -> None:
    """Freeze (or unfreeze) everything but the masked-LM head, for head-only steps; or, with `lower_layers` N,
    the embeddings and the N lowest encoder layers only (`--freeze-layers`).

    With a sparse head the encoder runs without autograd, so a decoder tied to the input embedding
    stays trainable as part of the head; on the dense path it is frozen with the encoder (training it
    there would run the backward pass through the whole encoder to reach the input embedding). With lower
    layers frozen, the backward pass stops below layer N (its input is detached), so each frozen layer saves
    its backward; a tied decoder still trains, from the head's side.
    """
    for p in model.base_model.parameters():
        p.requires_grad_(not frozen)
    layers = encoder_layers(model)
    lower = lower_layers if not frozen else 0
    _detach_below(model, layers[lower] if lower else None)
    if lower:
        for p in _below(model, layers[:lower]):
            p.requires_grad_(False)
    if (frozen and has_sparse_head(model)) or lower:
        model.get_output_embeddings().weight.requires_grad_(True)


def _below(model, layers: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The embeddings' parameters (word, position, type, norm) and those of `layers`."""
    embeddings = getattr(model.base_model, "embeddings", None)
    params = list(embeddings.parameters()) if embeddings is not None else []
    return params + [p for layer in layers for p in layer.parameters()]


def _detach_below(model, layer: torch.nn.Module | None) -> None:
    """Detach the input of `layer` (None: remove the hook), so that the backward pass stops there."""
    handle = getattr(model, "_mlmtune_detach", None)
    if handle is not None:
        handle.remove()
        model._mlmtune_detach = None
    if layer is None:
        return

    def detach(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    model._mlmtune_detach = layer.register_forward_pre_hook(detach, with_kwargs=True)


COMPILE_BACKEND = "inductor"


def compile_encoder(model, length: int, layers: bool = False) -> None:
    """torch.compile, in place, the part of the forward whose shapes never change: the encoder, (B, T) -> (B, T, H);
    with `layers` (--fsdp) each encoder layer on its own, before it is sharded. Then checked (`check_compiled`).

    The gather at the masked positions and the head see a different count every batch, so they stay eager
    (compiled, they would recompile for every new count). `Module.compile` keeps the parameter names, so
    checkpoints and `save_pretrained` are unchanged. A model without a sparse head compiles whole.
    """
    def compile_now() -> None:
        for module in encoder_layers(model) if layers else [model.base_model if has_sparse_head(model) else model]:
            module.compile(backend=COMPILE_BACKEND)

    check_compiled(model, compile_now, length)


COMPILED_TOLERANCE = 1e-3  # of the logits' largest magnitude: inductor's own order of fp32 sums moves them ~1e-6


def check_compiled(model, compile_now: Callable[[], None], length: int) -> None:
    """Compile (`compile_now`) between two forward passes of the model over one seeded batch of 2 x `length` (at
    most 128) token ids, in eval mode and fp32, and refuse a compiled model whose logits are not the eager model's:
    inductor has generated wrong code for some CPUs (torch 2.13 with ATen's AVX2 kernels: differences of the
    logits' size), and a run on it would train and report numbers that look right.

    Raises:
        MlmtuneError: the compiled logits differ by more than `COMPILED_TOLERANCE` of their largest magnitude.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    length = min(length, 128)  # the logits of a long block (ModernBERT's 8,192) over the vocabulary: gigabytes
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0)).to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            eager = model(input_ids=ids).logits.float()
            compile_now()
            compiled = model(input_ids=ids).logits.float()
    finally:
        model.train(training)
    diff, scale = (compiled - eager).abs().max().item(), eager.abs().max().item()
    if not diff <= COMPILED_TOLERANCE * max(scale, 1.0):  # also a NaN
        raise MlmtuneError(f"--compile: torch.compile's model gives other logits than the eager model on this machine "
                           f"(largest difference {diff:.3g}, logits up to {scale:.3g}; torch {torch.__version__}), so "
                           f"it would train on wrong numbers; train without --compile")


class MaskedLMLoss(torch.nn.Module):
    """A training forward as one module: (input ids, positions, targets) -> summed NLL at those positions.

    DDP, FSDP and torch.compile wrap a module whose forward is the whole computation; calling the
    encoder and the head separately would bypass their hooks. This module is that whole computation.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor | None,
                head_only: bool = False, attention_mask: torch.Tensor | None = None, top_k: int = 0) -> torch.Tensor:
        logits = logits_at_positions(self.model, input_ids, positions, attention_mask,
                                     encoder_grad=not head_only)  # (P, V)
        if top_k:  # the cloze's ranks (`cloze.py`): through the same root, so a sharded model gathers its weights
            return logits.float().topk(top_k, dim=-1).indices  # (P, k)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def positions_and_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of the labelled tokens and their labels: (P,), (P,), on labels' device (the CPU
    in training, where the masks are drawn, so that nothing waits for a GPU to count them)."""
    positions = torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).squeeze(1)
    return positions, labels.reshape(-1).index_select(0, positions)


def masked_nll_sum(model, inputs: torch.Tensor, labels: torch.Tensor,
                   device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """Sum of -log p(label) over the labelled positions of one batch, and how many there were.

    Labels left on the CPU (where the masker made them) give positions and count without a device
    sync; the tensors are then moved to `device` (default: where `inputs` is).
    """
    device = device or inputs.device
    positions, targets = positions_and_targets(labels)
    step = model if isinstance(model, MaskedLMLoss) else MaskedLMLoss(model)  # a sharded model runs through its root
    nll = step(inputs.to(device, non_blocking=True), positions.to(device, non_blocking=True),
               targets.to(device, non_blocking=True))
    return nll, positions.numel()


def backward_masked(step: torch.nn.Module, batches, denominator: int | torch.Tensor, device: torch.device,
                    autocast_dtype: torch.dtype | None, head_only: bool = False, scaler=None,
                    world: int = 1) -> torch.Tensor:
    """Forward and backward over micro-batches, the loss weighted by tokens over `denominator`.

    Nothing here waits for the device: batches stay on the CPU until their copy, positions are found
    there, and the loss comes back as a tensor. Under DDP the gradients are all-reduced during the
    last micro-batch's backward (the others run under `no_sync`), overlapping communication with it.

    Args:
        step: a `MaskedLMLoss`, the DDP module wrapping it, or its FSDP root.
        batches: (inputs, labels) pairs of one optimizer step, on the CPU (or (inputs, labels, positions,
            targets), the positions found ahead, pinned, by the feed); every rank has as many.
        denominator: masked tokens of the whole step (over all ranks in a distributed run: a device tensor
            summed there, so nothing waits), so the accumulated gradient is that of the step's token-weighted
            mean loss.
        autocast_dtype: bf16 or fp16 for mixed precision, None for fp32.
        head_only: a head warm-up step: no backward pass through the encoder.
        scaler: fp16's `torch.amp.GradScaler` (the loss is scaled before backward), or None.
        world: ranks whose gradients DDP averages; the loss is multiplied by it, so the average is
            the gradient of the global token-weighted loss.

    Returns:
        This rank's summed negative log-likelihood, a 0-d tensor on `device`.
    """
    total = torch.zeros((), device=device)
    scale = world / (denominator.clamp(min=1) if isinstance(denominator, torch.Tensor) else max(denominator, 1))
    for i, batch in enumerate(batches):
        inputs, labels = batch[0], batch[1]
        positions, targets = batch[2:] if len(batch) == 4 else positions_and_targets(labels)
        last = i == len(batches) - 1
        if hasattr(step, "set_requires_gradient_sync"):  # FSDP: reduce-scatter after the last micro-batch only
            step.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or not hasattr(step, "no_sync") else step.no_sync():
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                nll = step(inputs.to(device, non_blocking=True), positions.to(device, non_blocking=True),
                           targets.to(device, non_blocking=True), head_only)
            loss = nll * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += nll.detach()
    return total
