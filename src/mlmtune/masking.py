"""Blocks -> masked batches: BERT-style dynamic masking, and eval masks that never change.

The rule is the one of transformers' `DataCollatorForLanguageModeling`: each non-special token
is chosen with probability `mlm_probability`; of the chosen, 80% become the mask token, 10% a
random token, 10% stay. Every draw comes from an explicit `torch.Generator`, so training masks
are reproducible from the seed (and resumable), and eval masks are drawn once and reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of an unmasked position; cross_entropy skips it
SEED_MIX = 1_000_003  # spreads (seed, counter) pairs into distinct generator seeds


@dataclass(frozen=True)
class Masker:
    """Masks batches of token ids; built once from a tokenizer."""

    mask_token_id: int
    vocab_size: int
    special_ids: torch.Tensor  # (S,) ids never masked
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1

    @classmethod
    def from_tokenizer(cls, tokenizer, mlm_probability: float = 0.15) -> Masker:
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long),
            mlm_probability=mlm_probability,
        )

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a (B, T) batch.

        Returns:
            (inputs, labels): inputs with masks applied; labels equal to the original ids at
            the chosen positions and IGNORE_INDEX elsewhere.
        """
        input_ids = input_ids.long()
        labels = input_ids.clone()
        probs = torch.full(input_ids.shape, self.mlm_probability)
        probs.masked_fill_(torch.isin(input_ids, self.special_ids), 0.0)
        chosen = torch.bernoulli(probs, generator=generator).bool()
        labels[~chosen] = IGNORE_INDEX

        inputs = input_ids.clone()
        to_mask = torch.bernoulli(torch.full(input_ids.shape, self.mask_replace_prob), generator=generator).bool()
        to_mask &= chosen
        inputs[to_mask] = self.mask_token_id

        # of what is left, the share that becomes random: 0.1 / (1 - 0.8) = 0.5
        rest = 1.0 - self.mask_replace_prob
        p_random = self.random_replace_prob / rest if rest > 0 else 0.0
        to_random = torch.bernoulli(torch.full(input_ids.shape, p_random), generator=generator).bool()
        to_random &= chosen & ~to_mask
        random_ids = torch.randint(self.vocab_size, input_ids.shape, dtype=torch.long, generator=generator)
        inputs[to_random] = random_ids[to_random]
        return inputs, labels


def iter_eval_masks(blocks, masker: Masker, seed: int, chunk: int = 256):
    """Eval blocks masked once per `seed`, yielded `chunk` blocks at a time.

    Chunk k is masked by a generator seeded with (seed, k), so the masks depend only on the
    blocks, the masker and the seed (not on the eval batch size or on what ran before), and
    the same model on the same data gets the same perplexity every time. Nothing is stored:
    memory holds one chunk whatever the size of the eval split.

    Args:
        blocks: (N, T) tensor, or `mlmtune.data.Blocks`.
    """
    for k, start in enumerate(range(0, len(blocks), chunk)):
        generator = torch.Generator().manual_seed(seed * SEED_MIX + k)
        yield masker(blocks[start : start + chunk], generator)


def rank_shares(chunks, rank: int, world: int):
    """This rank's even share of every masked chunk: together the ranks score exactly the chunks' masks.

    Every rank gets ceil(n / world) rows of an n-row chunk; a short share is topped up with rows whose
    labels are all IGNORE_INDEX (they count for nothing), so every rank runs as many forward passes:
    under FSDP each one is a collective that all ranks must join.
    """
    for inputs, labels in chunks:
        per = -(-len(inputs) // world)
        mine = slice(rank * per, (rank + 1) * per)
        x, y = inputs[mine], labels[mine]
        short = per - len(x)
        if short:
            x = torch.cat([x, inputs[:short]])
            y = torch.cat([y, torch.full_like(labels[:short], IGNORE_INDEX)])
        yield x, y


def fixed_eval_masks(blocks, masker: Masker, seed: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `iter_eval_masks` as two (N, T) tensors: masked inputs and labels."""
    parts = list(iter_eval_masks(blocks, masker, seed, chunk))
    if not parts:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return empty, empty.clone()
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
