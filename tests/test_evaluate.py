"""Perplexity and pseudo-perplexity against direct, position-by-position computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlmtune.data.masking import IGNORE_INDEX, Masker, fixed_eval_masks
from mlmtune.evaluation.perplexity import perplexity, pseudo_perplexity

pytestmark = pytest.mark.numerics


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


# ---------------------------------------------------------------------------------------------
# `mlmtune eval`: which records it scores


def _eval(*args):
    from mlmtune.config import EvalConfig
    from mlmtune.evaluation.evaluate import run_eval
    from mlmtune.options import resolve

    flags = dict(zip(args[::2], args[1::2]))
    return run_eval(resolve(EvalConfig, {}, flags), progress=False)


def test_eval_on_the_training_source_reproduces_perplexity_after(configs, eli5_like, tmp_path, cache_dir):
    from mlmtune.training.train import train

    out = tmp_path / "run"
    cfg = configs(out, max_steps=3, seed=7, test_size=0.3, mlm_probability=0.2)
    metrics = train(cfg, progress=False).metrics
    # the user names only the model and the data: the run's seed, split, block size and masking are its own
    ev = _eval("model", str(out), "dataset", str(eli5_like), "text_field", "answers.text", "cache_dir", cache_dir)
    assert "the training run's held-out split (30% of the records, seed 7, block size 32" in ev["scored"]
    assert math.isclose(ev["perplexity"], metrics["perplexity_after"], rel_tol=1e-6)
    assert ev["eval_masked_tokens"] == metrics["eval_masked_tokens"] and ev["eval_blocks"] == metrics["eval_blocks"]
    records = sum(1 for _ in eli5_like.open())
    assert ev["eval_texts"] == math.ceil(0.3 * records)  # datasets' train_test_split rounds the test share up


def test_eval_on_another_dataset_scores_all_of_it(tiny_model_dir, tmp_path, docs_texts, cache_dir):
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(docs_texts[200:320]) + "\n\n")
    ev = _eval("model", str(tiny_model_dir), "dataset", str(corpus), "block_size", "32", "cache_dir", cache_dir)
    assert ev["scored"] == "all of it" and ev["eval_texts"] == 120
    tok_count = sum(len(t) for t in __import__("transformers").AutoTokenizer.from_pretrained(
        tiny_model_dir)(docs_texts[200:320])["input_ids"])
    assert ev["eval_blocks"] == tok_count // 32  # every record's tokens, grouped once
    held = _eval("model", str(tiny_model_dir), "dataset", str(corpus), "block_size", "32", "cache_dir", cache_dir,
                 "test_size", "0.25")
    assert held["eval_texts"] == 30 and "a held-out 25%" in held["scored"]


def test_pseudo_perplexity_of_a_text_shorter_than_a_block(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmtune.cli import main

    text = "The for statement loops."
    corpus = tmp_path / "one.txt"
    corpus.write_text(text + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(corpus), "--block-size", "32", "--pseudo",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] is None and "fewer than one block" in out["perplexity_skipped"]
    # independent: each token masked in turn through the plain transformers model
    model, tok = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir)
    ids = tok(text)["input_ids"]
    nll = []
    with torch.no_grad():
        for i in range(1, len(ids) - 1):
            masked = torch.tensor([ids[:i] + [tok.mask_token_id] + ids[i + 1:]])
            nll.append(-float(model(input_ids=masked).logits[0, i].log_softmax(-1)[ids[i]]))
    assert out["pseudo_tokens"] == len(nll) and out["pseudo_texts"] == 1
    assert math.isclose(out["pseudo_perplexity"], math.exp(sum(nll) / len(nll)), rel_tol=1e-5)
    # without --pseudo the same file is one line that says what to do
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(corpus), "--block-size", "32"]) == 1
    assert "or pass --pseudo, which scores texts of any length" in capsys.readouterr().err
