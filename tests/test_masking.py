"""Masking statistics against the rule (15% of non-special tokens; 80/10/10), and fixed eval masks."""

from __future__ import annotations

import math

import torch

from mlmtune.data.masking import IGNORE_INDEX, Masker, fixed_eval_masks, iter_eval_masks, rank_shares, regroup


def _within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _batch(tok, rows=400, width=64):
    g = torch.Generator().manual_seed(1)
    special = sorted(set(tok.all_special_ids))
    non_special = torch.tensor([i for i in range(len(tok)) if i not in special])
    ids = non_special[torch.randint(len(non_special), (rows, width), generator=g)]
    ids[:, 0] = tok.bos_token_id  # special tokens where a block has them
    ids[:, width // 2] = tok.eos_token_id
    ids[:, width // 2 + 1] = tok.bos_token_id
    return ids


def test_masking_statistics(tiny):
    _, tok = tiny
    masker = Masker.from_tokenizer(tok, 0.15)
    ids = _batch(tok)
    inputs, labels = masker(ids, torch.Generator().manual_seed(0))

    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    chosen = labels != IGNORE_INDEX
    n_candidates = int((~special).sum())
    n_chosen = int(chosen.sum())
    assert not (chosen & special).any(), "a special token was masked"
    assert (inputs[special] == ids[special]).all()
    assert _within(n_chosen, n_candidates, 0.15)
    assert (labels[chosen] == ids[chosen]).all()
    assert (inputs[~chosen] == ids[~chosen]).all(), "an unchosen token changed"

    as_mask = int((inputs[chosen] == tok.mask_token_id).sum())
    unchanged = int((inputs[chosen] == ids[chosen]).sum())
    other = n_chosen - as_mask - unchanged
    # a random replacement hits the original token with probability 1/V: fold that into "unchanged"
    v = len(tok)
    assert _within(as_mask, n_chosen, 0.8)
    assert _within(unchanged, n_chosen, 0.1 + 0.1 / v)
    assert _within(other, n_chosen, 0.1 - 0.1 / v)


def test_masking_is_dynamic_and_reproducible(tiny):
    _, tok = tiny
    masker = Masker.from_tokenizer(tok, 0.15)
    ids = _batch(tok, rows=8)
    a = masker(ids, torch.Generator().manual_seed(3))
    b = masker(ids, torch.Generator().manual_seed(3))
    c = masker(ids, torch.Generator().manual_seed(4))
    assert a[0].equal(b[0]) and a[1].equal(b[1])
    assert not a[1].equal(c[1])


def test_fixed_eval_masks_depend_only_on_seed(tiny):
    _, tok = tiny
    masker = Masker.from_tokenizer(tok, 0.15)
    blocks = _batch(tok, rows=300)
    x1, y1 = fixed_eval_masks(blocks, masker, seed=11)
    x2, y2 = fixed_eval_masks(blocks, masker, seed=11)
    x3, _ = fixed_eval_masks(blocks, masker, seed=12)
    assert x1.equal(x2) and y1.equal(y2)
    assert not x1.equal(x3)
    torch.manual_seed(999)  # the global RNG plays no part
    x4, _ = fixed_eval_masks(blocks, masker, seed=11)
    assert x4.equal(x1)


def test_rank_shares_cover_the_masks_once_with_equal_pass_counts(tiny):
    """3 ranks over chunks of 256 and 44 rows: every rank gets as many rows per chunk (ceil(n / 3)), the
    real rows are the chunk's in order, exactly once, and the top-up rows carry no label."""
    _, tok = tiny
    masker = Masker.from_tokenizer(tok, 0.15)
    blocks = _batch(tok, rows=300)
    whole_x, whole_y = fixed_eval_masks(blocks, masker, seed=5)
    shares = [list(rank_shares(iter_eval_masks(blocks, masker, seed=5), rank, 3)) for rank in range(3)]
    assert [[len(x) for x, _ in s] for s in shares] == [[86, 15]] * 3
    real_x, real_y = [], []
    for k, n in enumerate([256, 44]):
        per = -(-n // 3)
        for rank in range(3):
            x, y = shares[rank][k]
            keep = min(per, max(0, n - rank * per))
            assert (y[keep:] == IGNORE_INDEX).all()  # the top-up rows count for nothing
            real_x.append(x[:keep])
            real_y.append(y[:keep])
    assert torch.cat(real_x).equal(whole_x) and torch.cat(real_y).equal(whole_y)


def test_eval_pieces_give_each_of_many_ranks_a_full_eval_batch(tiny):
    """32 ranks, eval batch 4: the 256-row mask chunks regrouped into 128-row pieces give every rank 4 rows per
    forward pass (not 256 / 32 = 8 of a chunk, nor fewer for the 44-row tail), and the ranks' real rows are still
    `fixed_eval_masks`' rows, in order, each once: regrouping moves no mask."""
    _, tok = tiny
    masker = Masker.from_tokenizer(tok, 0.15)
    blocks = _batch(tok, rows=300)
    whole_x, whole_y = fixed_eval_masks(blocks, masker, seed=5)
    pieces = list(regroup(iter_eval_masks(blocks, masker, seed=5), 4 * 32))
    assert [len(x) for x, _ in pieces] == [128, 128, 44]
    shares = [list(rank_shares(pieces, rank, 32)) for rank in range(32)]
    assert all([len(x) for x, _ in s] == [4, 4, 2] for s in shares)
    real_x, real_y = [], []
    for k, n in enumerate([128, 128, 44]):
        per = -(-n // 32)
        for rank in range(32):
            x, y = shares[rank][k]
            keep = min(per, max(0, n - rank * per))
            assert (y[keep:] == IGNORE_INDEX).all()
            real_x.append(x[:keep])
            real_y.append(y[:keep])
    assert torch.cat(real_x).equal(whole_x) and torch.cat(real_y).equal(whole_y)
