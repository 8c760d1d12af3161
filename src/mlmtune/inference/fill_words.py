"""Fill with words, not pieces: targets of several pieces, candidates of up to K pieces, and several masks filled
jointly.

`pipeline("fill-mask")` fills one vocabulary piece per mask, each mask on its own. Here:

- a target word of k pieces is scored whole: its mask is widened to k masks and the pieces are scored left
  to right, each with the pieces after it still masked (within-word-l2r), and the log-probabilities added;
- `max_pieces` K proposes, besides single pieces, words of up to K pieces found by beam search over pieces
  (kept only when the tokenizer writes the word with exactly those pieces), ranked by the same score;
- `joint` fills all the masks of a text together: a beam search over the masks, left to right, each step one
  batched forward pass over the beams; the finished fillings are ranked by the pseudo-log-likelihood of the
  filled text (`scoring.py`).

A candidate's `score` is the probability of the whole word (or, joint, of the whole filling, left to right);
`pieces` says how many pieces it has.

Each of these runs several forward passes. Every pass is taken inside `turn` (the server's: its model lock taken
in turn, and the request's deadline and client checked before it), and `work_rows` says, before any of them, how
many rows (copies of a text) they will run through the model, so that the server can refuse a request too large.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mlmtune.errors import MlmtuneError
from mlmtune.inference.scoring import NO_TURN, copy_log_probs
from mlmtune.model.forward import logits_at_positions, pad_rows

JOINT_MAX_MASKS = 8  # a joint fill runs masks x beam forward passes: more masks is another task


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@torch.inference_mode()
def position_log_probs(filler, rows: list[list[int]], positions: list[int], turn=NO_TURN) -> torch.Tensor:
    """(R, V) log-probabilities at one position of each row (rows padded into one forward pass), on the CPU."""
    ids, attention = pad_rows(rows, _pad_id(filler.tokenizer))
    width = ids.shape[1]
    flat = torch.tensor([i * width + p for i, p in enumerate(positions)])
    with turn:
        logits = logits_at_positions(filler.model, ids.to(filler.device), flat.to(filler.device),
                                     attention.to(filler.device))
        return logits.float().log_softmax(-1).cpu()


def in_context_pieces(filler, text: str, word: str) -> list[int]:
    """The pieces `word` takes where the (single) mask of `text` stands: the text with the word in place, tokenized,
    less what stands around the mask (so a byte-level BPE word gets its leading space, as in running text)."""
    tok = filler.tokenizer
    masked = tok(filler.normalize(text))["input_ids"]
    at = masked.index(tok.mask_token_id)
    filled = tok(filler.normalize(text).replace(tok.mask_token, word, 1))["input_ids"]
    tail = len(masked) - at - 1
    pieces = filled[at : len(filled) - tail]
    if not word.strip() or not pieces or filled[:at] != masked[:at] or filled[len(filled) - tail :] != masked[at + 1 :]:
        raise MlmtuneError(f"the target {word!r} does not stand as a word where the mask is (it tokenizes to "
                           f"{'nothing' if not pieces else 'pieces that change its neighbours'})")
    return pieces


def target_pieces(filler, text: str, targets: list[str]) -> list[list[int]]:
    """The pieces each target takes in `text` (one mask): a single piece as the pipeline maps it, a word of several
    pieces as it stands where the mask is (`in_context_pieces`); the filled texts tokenized in one call.

    Raises:
        MlmtuneError: a target that tokenizes to nothing, or does not stand as a word where the mask is.
    """
    tok = filler.tokenizer
    single = [filler.single_piece(t) for t in targets]
    several = [t for t, s in zip(targets, single) if s is None]
    if not several:
        return [[s] for s in single]
    normal = filler.normalize(text)
    masked = tok(normal)["input_ids"]
    at = masked.index(tok.mask_token_id)
    tail = len(masked) - at - 1
    filled = tok([normal.replace(tok.mask_token, word, 1) for word in several])["input_ids"]
    found = {}
    for word, row in zip(several, filled):
        pieces = row[at : len(row) - tail]
        if not word.strip() or not pieces or row[:at] != masked[:at] or row[len(row) - tail :] != masked[at + 1 :]:
            raise MlmtuneError(f"the target {word!r} does not stand as a word where the mask is (it tokenizes to "
                               f"{'nothing' if not pieces else 'pieces that change its neighbours'})")
        found[word] = pieces
    return [[s] if s is not None else found[t] for t, s in zip(targets, single)]


def work_rows(filler, ids: torch.Tensor, pieces: list[list[int]] | None, max_pieces: int, joint: bool,
              beam_size: int) -> int:
    """The rows (copies of the text) a word fill of one text runs through the model, at most: the pass at the
    mask, then joint: a pass per mask over the beams and the pseudo-log-likelihood of every finished beam (one
    copy per word piece); targets (`pieces`, from `target_pieces`): one copy per piece of each distinct target of
    several pieces; else a beam search for each length of 2 to `max_pieces` pieces."""
    if joint:
        masks = int((ids == filler.tokenizer.mask_token_id).sum())
        special = set(filler.tokenizer.all_special_ids) - {filler.tokenizer.mask_token_id}
        words = sum(1 for t in ids.tolist() if t not in special)
        beams = [min(beam_size ** j, beam_size) for j in range(masks + 1)]
        return sum(beams[:-1]) + beams[-1] * words
    if pieces is not None:
        return 1 + sum(len(p) for p in {tuple(p) for p in pieces if len(p) > 1})
    return 1 + sum(1 + (k - 1) * beam_size for k in range(2, max_pieces + 1))


def word_log_prob(filler, ids: list[int], at: int, pieces: list[int], turn=NO_TURN) -> float:
    """log p(word) for `pieces` in place of the one mask at `at`: the mask widened to len(pieces) masks, piece i
    scored with pieces < i filled in and pieces >= i masked (within-word-l2r)."""
    mask = filler.tokenizer.mask_token_id
    widened = ids[:at] + [mask] * len(pieces) + ids[at + 1 :]
    copies = []
    for i in range(len(pieces)):
        row = list(widened)
        row[at : at + i] = pieces[:i]
        copies.append((row, at + i))
    return sum(copy_log_probs(filler.model, copies, pieces, _pad_id(filler.tokenizer), len(copies), filler.device,
                              turn=turn))


def _entry(filler, ids: list[int], at: int, pieces: list[int], log_prob: float) -> dict:
    tok = filler.tokenizer
    filled = ids[:at] + pieces + ids[at + 1 :]
    filled = [t for t in filled if t != tok.pad_token_id]
    return {"score": math.exp(log_prob), "token": pieces[0], "tokens": pieces,
            "token_str": tok.decode(pieces).strip(), "sequence": tok.decode(filled, skip_special_tokens=True),
            "pieces": len(pieces)}


@torch.inference_mode()
def fill_targets(filler, text: str, ids: torch.Tensor, targets: list[str], top_k: int,
                 pieces_of: list[list[int]] | None = None, turn=NO_TURN) -> list[dict]:
    """Target words scored whole, in a text with one mask: single pieces by the pipeline's probability, words of
    several pieces by their left-to-right log-probability; the best `top_k`. `pieces_of`: the targets' pieces
    from `target_pieces`, when already found."""
    ids_list = ids.tolist()
    at = ids_list.index(filler.tokenizer.mask_token_id)
    pieces_of = pieces_of if pieces_of is not None else target_pieces(filler, text, targets)
    single_probs = position_log_probs(filler, [ids_list], [at], turn)[0]
    out, seen = [], set()
    for pieces in pieces_of:
        if tuple(pieces) in seen:
            continue
        seen.add(tuple(pieces))
        lp = float(single_probs[pieces[0]]) if len(pieces) == 1 else word_log_prob(filler, ids_list, at, pieces,
                                                                                   turn)
        out.append(_entry(filler, ids_list, at, pieces, lp))
    return sorted(out, key=lambda e: -e["score"])[:top_k]


def _is_word(filler, text: str, pieces: list[int]) -> bool:
    """Whether the tokenizer writes the word these pieces spell with exactly these pieces, in this text."""
    word = filler.tokenizer.decode(pieces).strip()
    if not word or any(c.isspace() for c in word):
        return False
    try:
        return in_context_pieces(filler, text, word) == pieces
    except MlmtuneError:
        return False


@torch.inference_mode()
def fill_candidates(filler, text: str, ids: torch.Tensor, top_k: int, max_pieces: int,
                    beam_size: int, turn=NO_TURN) -> list[dict]:
    """Candidates of 1 to `max_pieces` pieces for a text's one mask, ranked by the word's log-probability."""
    tok = filler.tokenizer
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    ids_list = ids.tolist()
    at = ids_list.index(tok.mask_token_id)
    single = position_log_probs(filler, [ids_list], [at], turn)[0]
    single[special] = -math.inf
    values, indices = single.topk(min(top_k + beam_size, len(single)))
    out = {(p,): lp for lp, p in zip(values.tolist(), indices.tolist()) if _is_word(filler, text, [p])}
    for k in range(2, max_pieces + 1):
        widened = ids_list[:at] + [tok.mask_token_id] * k + ids_list[at + 1 :]
        beams: list[tuple[list[int], float]] = [([], 0.0)]
        for i in range(k):
            rows = [widened[:at] + pieces + widened[at + i :] for pieces, _ in beams]
            logp = position_log_probs(filler, rows, [at + i] * len(rows), turn)
            logp[:, special] = -math.inf
            expanded = []
            for (pieces, score), row_lp in zip(beams, logp):
                top_lp, top_ids = row_lp.topk(beam_size)
                expanded += [(pieces + [t], score + v) for v, t in zip(top_lp.tolist(), top_ids.tolist())]
            beams = sorted(expanded, key=lambda b: -b[1])[:beam_size]
        for pieces, lp in beams:
            if _is_word(filler, text, pieces):
                out.setdefault(tuple(pieces), lp)
    ranked = sorted(out.items(), key=lambda kv: -kv[1])[:top_k]
    return [_entry(filler, ids_list, at, list(pieces), lp) for pieces, lp in ranked]


@torch.inference_mode()
def fill_joint(filler, ids: torch.Tensor, top_k: int, beam_size: int, turn=NO_TURN) -> list[dict]:
    """The best joint fillings of all the masks of a text: beam search left to right, re-ranked by the
    pseudo-log-likelihood of the filled text."""
    tok = filler.tokenizer
    ids_list = ids.tolist()
    masks = [j for j, t in enumerate(ids_list) if t == tok.mask_token_id]
    if len(masks) > JOINT_MAX_MASKS:
        raise MlmtuneError(f"a joint fill takes at most {JOINT_MAX_MASKS} masks; this text has {len(masks)}")
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    beams: list[tuple[list[int], float]] = [(ids_list, 0.0)]
    for at in masks:
        logp = position_log_probs(filler, [row for row, _ in beams], [at] * len(beams), turn)
        logp[:, special] = -math.inf
        expanded = []
        for (row, score), row_lp in zip(beams, logp):
            top_lp, top_ids = row_lp.topk(beam_size)
            for v, t in zip(top_lp.tolist(), top_ids.tolist()):
                filled = list(row)
                filled[at] = t
                expanded.append((filled, score + v))
        beams = sorted(expanded, key=lambda b: -b[1])[:beam_size]
    plls = _plls(filler, [row for row, _ in beams], turn)
    ranked = sorted(zip(beams, plls), key=lambda b: -b[1])[:top_k]
    return [{"score": math.exp(lp), "pll": pll, "tokens": [row[j] for j in masks],
             "token_strs": [tok.decode([row[j]]).strip() for j in masks],
             "sequence": tok.decode(row, skip_special_tokens=True)} for (row, lp), pll in ranked]


def _plls(filler, rows: list[list[int]], turn=NO_TURN) -> list[float]:
    """The pseudo-log-likelihood (each token masked in turn) of each row of ids, all copies batched together."""
    special = set(filler.tokenizer.all_special_ids)
    copies, targets, owner = [], [], []
    for r, row in enumerate(rows):
        for j, t in enumerate(row):
            if t in special:
                continue
            masked = list(row)
            masked[j] = filler.tokenizer.mask_token_id
            copies.append((masked, j))
            targets.append(t)
            owner.append(r)
    logp = copy_log_probs(filler.model, copies, targets, _pad_id(filler.tokenizer), filler.batch_size, filler.device,
                          turn=turn)
    return np.bincount(owner, weights=logp, minlength=len(rows)).tolist()
