"""Perplexity and pseudo-perplexity against direct, position-by-position computations."""

from __future__ import annotations

import math

import torch

from mlmtune.evaluate import perplexity, pseudo_perplexity
from mlmtune.masking import IGNORE_INDEX, Masker, fixed_eval_masks


def _blocks(tok, texts, width=32):
    ids = [i for t in texts for i in tok(t)["input_ids"]]
    n = len(ids) // width
    return torch.tensor(ids[: n * width]).view(n, width)


def test_perplexity_is_token_weighted_and_batch_size_free(tiny, docs_texts):
    model, tok = tiny
    inputs, labels = fixed_eval_masks(_blocks(tok, docs_texts[:60]), Masker.from_tokenizer(tok), seed=5)

    # direct: every masked position, one at a time, from the log-softmax of the full logits
    with torch.no_grad():
        logp = model(input_ids=inputs).logits.log_softmax(-1)
    nlls = [-float(logp[b, t, labels[b, t]]) for b in range(len(labels)) for t in range(labels.shape[1])
            if labels[b, t] != IGNORE_INDEX]
    direct = sum(nlls) / len(nlls)

    for bs in (1, 3, 64):
        result = perplexity(model, inputs, labels, batch_size=bs, progress=False)
        assert result.masked_tokens == len(nlls)
        assert math.isclose(result.loss, direct, rel_tol=1e-5)
        assert math.isclose(result.perplexity, math.exp(direct), rel_tol=1e-5)

    # the mean of per-batch means is a different number when batches hold different counts
    batch_means = []
    for start in range(0, len(labels), 3):
        y = labels[start : start + 3]
        per_batch = [-float(logp[start + b, t, y[b, t]]) for b in range(len(y)) for t in range(y.shape[1])
                     if y[b, t] != IGNORE_INDEX]
        batch_means.append(sum(per_batch) / len(per_batch))
    assert not math.isclose(sum(batch_means) / len(batch_means), direct, rel_tol=1e-7)


def test_pseudo_perplexity_matches_one_mask_at_a_time(tiny, docs_texts):
    model, tok = tiny
    texts = [docs_texts[3][:200], docs_texts[10][:120]]
    total, count = 0.0, 0
    special = set(tok.all_special_ids)
    with torch.no_grad():
        for text in texts:
            ids = tok(text)["input_ids"]
            for i, true_id in enumerate(ids):
                if true_id in special:
                    continue
                masked = list(ids)
                masked[i] = tok.mask_token_id
                logits = model(input_ids=torch.tensor([masked])).logits[0, i]
                total -= float(logits.log_softmax(-1)[true_id])
                count += 1
    result = pseudo_perplexity(model, tok, texts, batch_size=7, progress=False)
    assert result.masked_tokens == count
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-5)


def test_pseudo_perplexity_truncates_to_the_model_length(tiny, docs_texts):
    model, tok = tiny
    long_text = " ".join(docs_texts[:40])
    assert len(tok(long_text)["input_ids"]) > 64
    result = pseudo_perplexity(model, tok, [long_text], progress=False)
    assert result.masked_tokens == 64 - 2  # model length minus <s> and </s>
