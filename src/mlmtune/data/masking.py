"""Blocks -> masked batches: token, whole-word and span masking, and eval masks that never change.

Three schemes (`--masking`), all with the same budget and the same 80/10/10 rule:

- `token`: transformers' `DataCollatorForLanguageModeling` rule: each non-special token is chosen with
  probability `mlm_probability`; of the chosen, 80% become the mask token, 10% a random token, 10% stay.
- `whole-word`: each word is chosen with probability `mlm_probability` (so each token still is, as in
  `token`), and every piece of a chosen word gets the word's fate (all masked, all random, or all kept).
- `span`: SpanBERT's rule: spans of whole words, their lengths in words drawn from a geometric law
  (p = 0.2) truncated at 10 words (mean 3.8), each started at a random word, until `mlm_probability` of
  the block's tokens is covered; one fate per span.

Words are the fast tokenizer's (`word_ids()`), kept with the blocks as `word_starts` (1 where a word
begins); a word never spans two texts or two blocks. Every draw comes from an explicit `torch.Generator`,
so training masks are reproducible from the seed (and resumable), and eval masks are drawn once and reused.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from mlmtune.config import MASKING as SCHEMES
from mlmtune.errors import MlmtuneError

IGNORE_INDEX = -100  # label of an unmasked position; cross_entropy skips it
SEED_MIX = 1_000_003  # spreads (seed, counter) pairs into distinct generator seeds


def dropout_seed(seed: int, step: int) -> int:
    """The seed of optimizer step `step`'s dropout, in every engine: a resumed run draws what an uninterrupted
    one does."""
    return seed * SEED_MIX + step

SPAN_P, SPAN_MAX = 0.2, 10  # SpanBERT's geometric law of span lengths, in words, and its truncation
_SPAN_CDF = [sum(SPAN_P * (1 - SPAN_P) ** (k - 1) for k in range(1, n + 1)) for n in range(1, SPAN_MAX + 1)]
_SPAN_CDF = [c / _SPAN_CDF[-1] for c in _SPAN_CDF]  # P(length <= n), n = 1..10


def span_length(u: float) -> int:
    """A span length in words, 1..10, from a uniform draw u in [0, 1): the truncated geometric law."""
    return min(bisect.bisect_right(_SPAN_CDF, u) + 1, SPAN_MAX)


def choose_spans(sizes: list[int], budget: float,
                 uniforms: list[float]) -> tuple[list[tuple[int, float]], list[int]]:
    """SpanBERT's spans over one block's words: (the chosen words with their span's fate draw, the span lengths
    drawn).

    Spans start at a random word that can be chosen and run over consecutive words, stopping at a word that
    cannot (a special token: texts are not joined into one span) or that an earlier span took. Words are
    added while they fit the budget; the word that would overflow it is added with the probability that
    makes the expected number of chosen tokens exactly `budget`, and then the block is done.

    Args:
        sizes: per word of the block, how many of its tokens can be chosen (0 for special tokens).
        budget: the tokens to cover, `mlm_probability` x the tokens that can be chosen.
        uniforms: draws in [0, 1), used in order (3 per span, and 1 for the last word).
    """
    words = [w for w, n in enumerate(sizes) if n]
    chosen: dict[int, float] = {}
    lengths: list[int] = []
    covered, i = 0, 0
    while covered < budget and len(chosen) < len(words) and i + 4 <= len(uniforms):
        length, start, fate = span_length(uniforms[i]), words[int(uniforms[i + 1] * len(words))], uniforms[i + 2]
        i += 3
        lengths.append(length)
        for w in range(start, min(start + length, len(sizes))):
            if not sizes[w] or w in chosen:  # a span stops at a special token and at an earlier span
                break
            if covered + sizes[w] > budget:
                if uniforms[i] < (budget - covered) / sizes[w]:  # keeps the expected coverage at the budget
                    chosen[w] = fate
                i += 1
                return list(chosen.items()), lengths
            chosen[w] = fate
            covered += sizes[w]
    return list(chosen.items()), lengths


def word_numbers(word_starts: torch.Tensor) -> torch.Tensor:
    """(B, T) word starts -> (B, T) the number of each token's word within its row (the first token starts one)."""
    starts = word_starts.bool().clone()
    starts[:, 0] = True
    return starts.long().cumsum(1) - 1


@dataclass(frozen=True)
class Masker:
    """Masks batches of token ids; built once from a tokenizer."""

    mask_token_id: int
    vocab_size: int
    special_ids: torch.Tensor  # (S,) ids never masked
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    scheme: str = "token"  # one of SCHEMES

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"masking scheme {self.scheme!r} is not one of {SCHEMES}")

    @property
    def needs_words(self) -> bool:
        return self.scheme != "token"

    @classmethod
    def from_tokenizer(cls, tokenizer, mlm_probability: float = 0.15, scheme: str = "token") -> Masker:
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long),
            mlm_probability=mlm_probability,
            scheme=scheme,
        )

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator,
                 word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a (B, T) batch.

        Args:
            word_starts: (B, T), 1 where a word begins; needed by `whole-word` and `span`.

        Returns:
            (inputs, labels): inputs with masks applied; labels equal to the original ids at
            the chosen positions and IGNORE_INDEX elsewhere.
        """
        if self.scheme == "token":
            return self._tokens(input_ids, generator)
        if word_starts is None:
            raise MlmtuneError(f"--masking {self.scheme} needs word boundaries, and these blocks have none (a slow "
                               f"tokenizer, or a folder prepared before they were kept): prepare them again with a "
                               f"fast tokenizer, or use --masking token")
        return self._words(input_ids.long(), word_numbers(word_starts), generator)

    def mask_rows(self, input_ids: torch.Tensor, keys: list[int],
                  word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask each row of a (B, T) batch with a generator of its own, seeded with `keys[row]`: a row's masks
        then depend on its key alone, not on which rows share its batch."""
        outs = [self(input_ids[i : i + 1], torch.Generator().manual_seed(key),
                     None if word_starts is None else word_starts[i : i + 1]) for i, key in enumerate(keys)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _tokens(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _words(self, input_ids: torch.Tensor, words: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole words chosen (per word, or in spans), each word's or span's fate shared by its pieces."""
        candidate = ~torch.isin(input_ids, self.special_ids)  # (B, T)
        if self.scheme == "whole-word":
            chosen_word = torch.rand(input_ids.shape, generator=generator) < self.mlm_probability  # (B, W <= T)
            fate_word = torch.rand(input_ids.shape, generator=generator)
        else:
            chosen_word, fate_word = self._spans(words, candidate, generator)
        chosen = chosen_word.gather(1, words) & candidate
        fate = fate_word.gather(1, words)  # the draw of the token's word (or span)
        to_mask = chosen & (fate < self.mask_replace_prob)
        to_random = chosen & ~to_mask & (fate < self.mask_replace_prob + self.random_replace_prob)
        random_ids = torch.randint(self.vocab_size, input_ids.shape, dtype=torch.long, generator=generator)
        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        inputs = torch.where(to_mask, self.mask_token_id, torch.where(to_random, random_ids, input_ids))
        return inputs, labels

    def _spans(self, words: torch.Tensor, candidate: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = words.shape
        key = torch.arange(rows)[:, None] * width + words  # (row, word) -> one index
        sizes = torch.bincount(key[candidate], minlength=rows * width).view(rows, width).tolist()
        n_words = (words[:, -1] + 1).tolist()
        uniforms = torch.rand((rows, 3 * width + 1), generator=generator).tolist()  # enough for any block
        picked_rows, picked_words, fates = [], [], []
        for b in range(rows):
            picked, _ = choose_spans(sizes[b][: n_words[b]], self.mlm_probability * sum(sizes[b]), uniforms[b])
            for w, fate in picked:
                picked_rows.append(b)
                picked_words.append(w)
                fates.append(fate)
        chosen_word = torch.zeros((rows, width), dtype=torch.bool)
        fate_word = torch.ones((rows, width))
        chosen_word[picked_rows, picked_words] = True
        fate_word[picked_rows, picked_words] = torch.tensor(fates, dtype=fate_word.dtype)
        return chosen_word, fate_word


def block_rows(blocks, index, words: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, word starts or None) of some rows of `blocks`: `mlmtune.data.blocks.Blocks`, or an (N, T) ids tensor.
    `words=False` skips reading the word starts (the token scheme does not use them)."""
    if words and hasattr(blocks, "word_starts"):
        return blocks[index], blocks.word_starts(index)
    return blocks[index], None


def iter_eval_masks(blocks, masker: Masker, seed: int, chunk: int = 256):
    """Eval blocks masked once per `seed`, yielded `chunk` blocks at a time.

    Chunk k is masked by a generator seeded with (seed, k), so the masks depend only on the
    blocks, the masker and the seed (not on the eval batch size or on what ran before), and
    the same model on the same data gets the same perplexity every time. Nothing is stored:
    memory holds one chunk whatever the size of the eval split.

    Args:
        blocks: (N, T) tensor, or `mlmtune.data.blocks.Blocks`.
    """
    for k, start in enumerate(range(0, len(blocks), chunk)):
        generator = torch.Generator().manual_seed(seed * SEED_MIX + k)
        ids, starts = block_rows(blocks, slice(start, start + chunk), masker.needs_words)
        yield masker(ids, generator, starts)


def regroup(chunks, rows: int):
    """The same masked rows, in order, cut into pieces of `rows` rows (the last may be shorter).

    The masks are drawn per 256-block chunk (`iter_eval_masks`), whatever the number of ranks; regrouping into
    eval batch x world rows gives each rank a full eval batch per forward pass (at 32 ranks a 256-row chunk would
    give each only 8) without changing a single mask.
    """
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    n = 0
    for inputs, labels in chunks:
        held.append((inputs, labels))
        n += len(inputs)
        while n >= rows:
            x, y = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
            yield x[:rows], y[:rows]
            held, n = [(x[rows:], y[rows:])], n - rows
    if n:
        yield torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])


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
