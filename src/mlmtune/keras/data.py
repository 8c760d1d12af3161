"""Masked batches -> keras-hub's masked-LM input format.

mlmtune masks blocks once, for both backends (`mlmtune.data.masking.Masker`): (inputs, labels), each
(B, T), with IGNORE_INDEX where nothing is to be predicted. keras-hub's masked-LMs take the same
information in another shape: the masked `token_ids`, a `padding_mask`, the `mask_positions`
(B, P) to predict at, and labels (B, P) with sample weights that are 0 on the padding of P. With
the loss averaged over the weights, a step's loss is the same token-weighted mean as PyTorch's.
"""

from __future__ import annotations

import numpy as np
import torch

from mlmtune.data.blocks import Blocks
from mlmtune.data.masking import IGNORE_INDEX, SEED_MIX, Masker
from mlmtune.training.feed import epoch_order


def keras_batch(inputs: torch.Tensor, labels: torch.Tensor, segments: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """(inputs, labels) of one masked batch -> (x, y, sample_weight) for a keras-hub masked-LM.

    Args:
        inputs: (B, T) masked token ids; every position is a real token (blocks have no padding).
        labels: (B, T) original ids where masked, IGNORE_INDEX elsewhere.
        segments: add the all-zero `segment_ids` (BERT's token types).

    Returns:
        x with token_ids, padding_mask, mask_positions (B, P) (and segment_ids), y (B, P) int32 and the
        (B, P) float32 weights, where P is the most masks in one row (at least 1).
    """
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    chosen = labels != IGNORE_INDEX  # (B, T)
    width = max(int(chosen.sum(1).max(initial=0)), 1)
    # stable sort puts each row's masked positions first, in order
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :width]  # (B, P)
    weights = np.take_along_axis(chosen, order, axis=1)
    positions = np.where(weights, order, 0).astype(np.int32)
    targets = np.where(weights, np.take_along_axis(labels, order, axis=1), 0).astype(np.int32)
    x = {"token_ids": inputs.astype(np.int32), "padding_mask": np.ones(inputs.shape, np.int32),
         "mask_positions": positions}
    if segments:
        x["segment_ids"] = np.zeros(inputs.shape, np.int32)
    return x, targets, weights.astype(np.float32)


def signature(segments: bool):
    """The tf.data element spec of `keras_batch`'s output (batch and mask counts vary)."""
    import tensorflow as tf  # optional dependency

    ids = tf.TensorSpec((None, None), tf.int32)
    x = {"token_ids": ids, "padding_mask": ids, "mask_positions": ids}
    if segments:
        x["segment_ids"] = ids
    return x, ids, tf.TensorSpec((None, None), tf.float32)


def uses_segments(tokenizer) -> bool:
    """BERT's tokenizers make token types; keras-hub's BERT takes them as `segment_ids`."""
    return "token_type_ids" in tokenizer.model_input_names


def as_blocks(blocks):
    """A `datasets.Dataset` of blocks (an `input_ids` column), `mlmtune.data.blocks.Blocks`, or an (N, T) array."""
    if hasattr(blocks, "column_names"):
        return Blocks(blocks)
    if isinstance(blocks, Blocks):
        return blocks
    return torch.as_tensor(np.asarray(blocks), dtype=torch.long)


def masked_dataset(blocks, tokenizer, batch_size: int = 8, seed: int = 42, shuffle: bool = True,
                   mlm_probability: float = 0.15):
    """What `model.fit` takes: blocks masked anew on every pass (dynamic masking), as the guide's collator does.

    Pass e of the dataset (one epoch of `fit`) orders the blocks by a generator seeded with (seed, e)
    and masks batch b with one seeded from (seed, e, b), so a run is repeatable. With shuffle=False the
    order and the masks stay the same on every pass: use it for validation data, whose loss then
    changes only when the model does.

    Args:
        blocks: `datasets.Dataset` with `input_ids` (e.g. `mlmtune.data.prepare.prepare_blocks(...)["train"]`), or
            (N, T) ids.
        tokenizer: the model's Hugging Face tokenizer (its mask token and special ids).
        batch_size: blocks per batch.
        seed: the seed of orders and masks.
        shuffle: reorder the blocks each pass.
        mlm_probability: share of tokens to predict.

    Returns:
        a `tf.data.Dataset` of (x, y, sample_weight) in keras-hub's masked-LM format.

    Example:
        >>> train = masked_dataset(blocks["train"], tokenizer, batch_size=8, seed=42)  # doctest: +SKIP
        >>> model.fit(train, validation_data=masked_dataset(blocks["test"], tokenizer, shuffle=False), epochs=3)
    """
    import tensorflow as tf  # optional dependency

    blocks = as_blocks(blocks)
    masker = Masker.from_tokenizer(tokenizer, mlm_probability)
    segments = uses_segments(tokenizer)
    passes = [0]

    def generate():
        epoch = passes[0] if shuffle else 0
        passes[0] += 1
        order = epoch_order(len(blocks), seed, epoch) if shuffle else torch.arange(len(blocks))
        for b, start in enumerate(range(0, len(blocks), batch_size)):
            generator = torch.Generator().manual_seed((seed * SEED_MIX + epoch) * SEED_MIX + b)
            yield keras_batch(*masker(blocks[order[start : start + batch_size]], generator), segments)

    batches = -(-len(blocks) // batch_size)  # a known length: fit's progress bar shows it, and no "ran out" warning
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature(segments))
    return dataset.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(2)
