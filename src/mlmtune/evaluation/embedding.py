"""The embedding check: what masked-LM training did to a sentence encoder's embeddings.

A sentence encoder (all-MiniLM-L6-v2, mpnet, bge, e5, gte) was trained after its masked-LM pretraining to put
texts that belong together close to each other; masked-LM training alone can undo that, and neither perplexity
nor the cloze would show it. The check needs no labels, and no tokenizer match (the vocabulary may grow):

- **Pairs**: held-out texts of at least `MIN_WORDS` words (shorter ones are left out and counted), at most
  `TEXTS` of them drawn by the seed; each is cut at its middle word into a first half and a second half. A text
  whose half repeats another's is left out: it would tie, not test.
- **Scoring**: every half embedded as the model embeds it (`sentence.SentenceEncoder`: its pooling, its
  normalisation, its max_seq_length, case and default prompt), in fp32. Each first half ranks all the second
  halves by the model's similarity (cosine unless its config names another); MRR@10 is the mean of 1/rank of its
  own second half (0 beyond rank 10), recall@1 how often that half comes first. Chance is about H(10)/N and 1/N.

The same texts, seed and model give the same figure; `mlmtune eval --embedding-eval auto` on a run's output and
data reproduces the run's after figure.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from mlmtune.config import DataConfig
from mlmtune.data.prepare import is_prepared
from mlmtune.data.stream import held_out_texts
from mlmtune.data.text import load_texts
from mlmtune.errors import say
from mlmtune.evaluation.probe import features
from mlmtune.model.load import max_positions
from mlmtune.model.sentence import SentenceEncoder

TEXTS, MIN_WORDS, MIN_PAIRS, K = 256, 20, 16, 10


def halves(texts: list[str], seed: int, n: int = TEXTS, min_words: int = MIN_WORDS) -> tuple[list[str], list[str],
                                                                                             int]:
    """Each text of at least `min_words` words cut at its middle word, at most `n` of them drawn by `seed`.

    Returns:
        (first halves, second halves, how many texts were left out for having fewer words).
    """
    pairs, seen, short = [], set(), 0
    for text in texts:
        words = text.split()
        if len(words) < min_words:
            short += 1
            continue
        first, second = " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])
        if first in seen or second in seen:  # a repeated paragraph or half: a tie, not a test
            continue
        seen.update((first, second))
        pairs.append((first, second))
    chosen = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return [a for a, _ in chosen], [b for _, b in chosen], short


def similarities(queries: torch.Tensor, docs: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """(N, D) and (M, D) embeddings -> (N, M) scores, higher closer: sentence-transformers' similarity functions."""
    queries, docs = queries.double(), docs.double()
    if similarity == "cosine":
        return F.normalize(queries, dim=1) @ F.normalize(docs, dim=1).T
    if similarity == "dot":
        return queries @ docs.T
    return -torch.cdist(queries, docs, p=2 if similarity == "euclidean" else 1)


def retrieval(queries: torch.Tensor, docs: torch.Tensor, similarity: str = "cosine") -> dict[str, float]:
    """Query i's partner is doc i: MRR@10 and recall@1 over the queries. A doc scored equal to the partner does
    not push it down."""
    scores = similarities(queries, docs, similarity)  # (N, N)
    rank = 1 + (scores > scores.diagonal()[:, None]).sum(1)  # (N,): the partner's rank among all docs
    reciprocal = torch.where(rank <= K, 1.0 / rank, torch.zeros_like(rank, dtype=torch.float64))
    return {"mrr10": float(reciprocal.mean()), "recall1": float((rank == 1).double().mean())}


def chance_mrr10(n: int) -> float:
    """MRR@10 of a random ranking of `n` docs: the mean of 1/r over r = 1..n, counting r <= 10."""
    return sum(1 / r for r in range(1, min(K, n) + 1)) / n


@torch.no_grad()
def embed(model, tokenizer, encoder: SentenceEncoder, texts: list[str], device: torch.device,
          batch_size: int = 32) -> torch.Tensor:
    """The model's own sentence embedding of each text, (N, H) float32, in fp32; the model is left where and as it
    was."""
    where = next(model.parameters()).device
    limit = min(encoder.max_seq_length or 1 << 30, max_positions(model, tokenizer))
    model.to(device)
    try:
        return features(model, tokenizer, encoder.prepare(texts), device, batch_size, limit, pool=encoder.pool)
    finally:
        model.to(where)


class EmbeddingCheck:
    """The check of one run (rank 0): its pairs drawn once, scored on the model as loaded and as trained."""

    def __init__(self, encoder: SentenceEncoder, firsts: list[str], seconds: list[str], short: int,
                 device: torch.device):
        self.encoder, self.firsts, self.seconds, self.short, self.device = encoder, firsts, seconds, short, device

    def describe(self) -> str:
        short = f"; {self.short} shorter left out" if self.short else ""
        return (f"Embedding check: {len(self.firsts)} held-out texts of at least {MIN_WORDS} words cut in two{short}; "
                f"each first half ranks the {len(self.seconds)} second halves by the model's {self.encoder.describe()} "
                f"and {self.encoder.similarity} similarity: MRR@10 and recall@1, before and after training")

    def __call__(self, model, tokenizer) -> dict[str, Any]:
        queries = embed(model, tokenizer, self.encoder, self.firsts, self.device)
        docs = embed(model, tokenizer, self.encoder, self.seconds, self.device)
        scores = retrieval(queries, docs, self.encoder.similarity)
        return {"embedding_pooling": self.encoder.describe(), "embedding_similarity": self.encoder.similarity,
                "embedding_texts": len(self.firsts), "embedding_short_texts": self.short,
                "embedding_mrr10": scores["mrr10"], "embedding_recall1": scores["recall1"]}


def _held_texts(data: DataConfig, seed: int, held: list[str] | None) -> list[str]:
    """The eval split's texts (`load_texts` with the seed), or a stream's held-out records."""
    if data.streaming:
        return held if held is not None else held_out_texts(data) if data.eval_records else []
    split = load_texts(data, seed)
    return list(split["test" if "test" in split else "train"]["text"])  # eval of a whole dataset: all of it


def embedding_check(value: str, encoder: SentenceEncoder | None, data: DataConfig, seed: int, device: torch.device,
                    held: list[str] | None = None) -> EmbeddingCheck | None:
    """--embedding-eval on a run's data: the check, or None when it is off, the model is no sentence encoder, or
    the check cannot run (said in one line, and the run goes on without it).

    Args:
        value: auto (on for a sentence encoder) or none.
        held: with --streaming, the held-out records' texts, when the caller has read them already.
    """
    if value == "none" or encoder is None:
        return None
    if encoder.problem is not None:
        say(f"note: no embedding check: {encoder.problem}")
        return None
    if data.dataset and is_prepared(data.dataset):
        say(f"note: no embedding check: {data.dataset} holds blocks, not texts (--embedding-eval none hides this)")
        return None
    firsts, seconds, short = halves(_held_texts(data, seed, held), seed)
    if len(firsts) < MIN_PAIRS:
        say(f"note: no embedding check: {len(firsts)} held-out texts of at least {MIN_WORDS} words, fewer than "
            f"{MIN_PAIRS}")
        return None
    return EmbeddingCheck(encoder, firsts, seconds, short, device)


def embedding_line(when: str, e: dict[str, Any]) -> str:
    return (f"{when}, embeddings ({e['embedding_texts']} held-out texts cut in two, {e['embedding_pooling']}): "
            f"MRR@10 {e['embedding_mrr10']:.3f}, recall@1 {e['embedding_recall1']:.1%}")


def embedding_metrics(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The check before and after training, and what it scored."""
    some = after or before
    if some is None:
        return {}
    out = {k: some[k] for k in ("embedding_pooling", "embedding_similarity", "embedding_texts",
                                "embedding_short_texts")}
    for when, e in (("before", before), ("after", after)):
        for key in ("mrr10", "recall1"):
            out[f"embedding_{key}_{when}"] = e[f"embedding_{key}"] if e else None
    return out


def lowered(m: dict[str, Any]) -> bool:
    """Whether training lowered the check's MRR@10."""
    b, a = m.get("embedding_mrr10_before"), m.get("embedding_mrr10_after")
    return b is not None and a is not None and a < b


LOWERED = ("masked-LM training lowered how well the sentence embeddings find a text's other half: what their "
           "contrastive training built was partly undone (remedies: docs/evaluation.md, \"Sentence encoders\")")


def summary_lines(m: dict[str, Any]) -> list[str]:
    """The run's last lines on the check: MRR@10 and recall@1 before -> after, and a plain word when it fell."""
    if m.get("embedding_mrr10_before") is None or m.get("embedding_mrr10_after") is None:
        return []
    n = m["embedding_texts"]
    line = (f"embeddings ({n} held-out texts cut in two, {m['embedding_pooling']}; chance MRR@10 "
            f"{chance_mrr10(n):.3f}): MRR@10 {m['embedding_mrr10_before']:.3f} -> {m['embedding_mrr10_after']:.3f}, "
            f"recall@1 {m['embedding_recall1_before']:.1%} -> {m['embedding_recall1_after']:.1%}")
    return [line, LOWERED] if lowered(m) else [line]
