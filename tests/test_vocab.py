"""`--add-tokens`: the domain's words mined from the training split (or read from a file) become single tokens in
every position, spelled as each tokenizer family spells its own words; their rows start from their pieces'; the
output folder's tokenizer has them, the pipeline fills them; tokens per word and the tokenizer-free figures
before and after equal hand computations; prepare, resume and bad input."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_forgetting import _hand_figures

from mlmtune.cli import main
from mlmtune.data.text import load_texts
from mlmtune.distributed import Dist
from mlmtune.evaluation.forgetting import free_sample
from mlmtune.training.run import load_run
from mlmtune.training.train import train
from mlmtune.training.vocab import add_words, init_rows

ANCHORS = "class function list string value object module name type method key return".split()
SYLLABLES = ["zor", "blax", "quin", "tav", "vex", "mur", "plo", "gnath", "yurk", "fex", "drab", "quo", "zim", "wub",
             "kelp", "snor", "glim", "trax", "vorp", "jib"]


def made_up_words(n: int = 20) -> list[str]:
    rng, words = random.Random(0), []
    while len(words) < n:
        word = "".join(rng.sample(SYLLABLES, 3))
        if word not in words:
            words.append(word)
    return words


def _corpus(words: list[str], n: int = 1500) -> list[str]:
    """The first 12 words each follow their own anchor ("the class zimwubblax ."); the other 8 follow "not"."""
    rng, lines = random.Random(0), []
    for _ in range(n):
        i = rng.randrange(len(words))
        pre = rng.choice(["", "then ", "and ", "now "])
        lines.append(f"{pre}the {ANCHORS[i]} {words[i]} ." if i < len(ANCHORS) else f"{pre}not {words[i]} .")
    return lines


@pytest.fixture(scope="module")
def made_up(tmp_path_factory, tiny_model_dir, configs):
    """A RoBERTa of hidden 64 on the tiny byte-level BPE, trained with --add-tokens 20 on a corpus that repeats 20
    long made-up words (7 to 10 pieces each)."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    root = tmp_path_factory.mktemp("made-up")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    RobertaForMaskedLM(RobertaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=66, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, type_vocab_size=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).save_pretrained(root / "start")  # no dropout: learned in 2000 steps
    tok.save_pretrained(root / "start")
    words = made_up_words()
    (root / "corpus.txt").write_text("\n".join(_corpus(words)))
    cfg = configs(root / "run", model=str(root / "start"), dataset=str(root / "corpus.txt"), text_field="text",
                  batch_size=16, max_steps=2000, learning_rate=3e-3, warmup_steps=20, mlm_probability=0.3,
                  save_steps=1000, logging_steps=500, test_size=0.1, add_tokens="20")
    result = train(cfg, progress=False)
    return cfg, result.metrics, words


def _single_token_everywhere(tokenizer, word: str) -> bool:
    texts = [f"{word} is here", f"the {word} is", f"a {word}, then", f"({word})", f"the  {word}\n"]
    return all(len([t for t in tokenizer.tokenize(text) if word in t]) == 1 and
               word in tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) for text in texts)


def test_the_mined_words_are_the_made_up_ones_and_single_tokens(made_up):
    from transformers import AutoTokenizer

    cfg, m, words = made_up
    out = Path(cfg.output.output_dir)
    assert sorted((out / "added_tokens.txt").read_text().split()) == sorted(words)
    assert m["added_tokens"] == 20
    before, after = AutoTokenizer.from_pretrained(cfg.model), AutoTokenizer.from_pretrained(out)
    for word in words:
        assert len(before.tokenize(f" {word}")) >= 7
        assert _single_token_everywhere(after, word), word
    # tokens per word on the training split, counted by hand with both tokenizers
    texts = list(load_texts(cfg.data, cfg.seed)["train"]["text"])
    n_words = sum(len(t.split()) for t in texts)
    for tok, key in ((before, "tokens_per_word_before"), (after, "tokens_per_word_after")):
        assert m[key] == pytest.approx(sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / n_words)
    assert m["tokens_per_word_after"] < m["tokens_per_word_before"] - 1


def test_the_trained_folder_fills_the_new_words(made_up):
    from transformers import pipeline

    cfg, m, words = made_up
    fill = pipeline("fill-mask", model=cfg.output.output_dir)
    hits = [words[i] in [p["token_str"].strip() for p in fill(f"so the {anchor} <mask> .", top_k=3)]
            for i, anchor in enumerate(ANCHORS)]  # "so" never starts a training sentence
    assert sum(hits) >= 10, hits


@pytest.mark.numerics
def test_the_tokenizer_free_figures_of_the_run_equal_a_hand_computation(made_up):
    """Before: the model as loaded, with its own tokenizer; after: the trained model with the new one; the same
    held-out texts."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    cfg, m, _ = made_up
    texts = free_sample(list(load_texts(cfg.data, cfg.seed)["test"]["text"]))
    assert m["tokenizer_free_texts"] == len(texts) == 16
    for folder, when in ((cfg.model, "before"), (cfg.output.output_dir, "after")):
        model, tok = AutoModelForMaskedLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        per_word, per_char = _hand_figures(model, tok, texts)
        assert m[f"nll_per_word_{when}"] == pytest.approx(per_word, rel=1e-5)
        assert m[f"bits_per_char_{when}"] == pytest.approx(per_char, rel=1e-5)
    assert m["nll_per_word_after"] < m["nll_per_word_before"] / 4
    card = (Path(cfg.output.output_dir) / "README.md").read_text()
    assert "## Vocabulary" in card and "nats per word" in card


@pytest.mark.numerics
def test_new_rows_start_from_the_mean_of_their_pieces(made_up):
    """Before the first step: the input embedding (the head's decoder is tied to it) and the head's bias."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    cfg, _, words = made_up
    run = load_run(cfg, Dist())
    old, tok = AutoModelForMaskedLM.from_pretrained(cfg.model), AutoTokenizer.from_pretrained(cfg.model)
    emb, bias = old.get_input_embeddings().weight, old.lm_head.bias
    new_emb, new_bias = run.model.get_input_embeddings().weight, run.model.lm_head.bias
    assert new_emb.shape[0] == len(tok) + 40  # " word" inside text and "word" where a text begins
    assert run.model.get_output_embeddings().weight.data_ptr() == new_emb.data_ptr()
    assert torch.equal(new_emb[: len(tok)], emb)
    for word in words:
        for form in (f" {word}", word):
            pieces = tok.convert_tokens_to_ids(tok.tokenize(form))
            row = run.tokenizer.convert_tokens_to_ids(form)
            assert row >= len(tok) and len(pieces) >= 3
            torch.testing.assert_close(new_emb[row], emb[pieces].mean(0), rtol=0, atol=1e-7)
            torch.testing.assert_close(new_bias[row], bias[pieces].mean(0), rtol=0, atol=1e-7)


def test_wordpiece_gets_the_whole_word_in_every_casing(tiny_bert_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(tiny_bert_dir), AutoModelForMaskedLM.from_pretrained(tiny_bert_dir)
    bias = model.cls.predictions.bias.detach().clone()
    emb = model.get_input_embeddings().weight.detach().clone()
    words = made_up_words(3)
    old = add_words(tok, words)
    init_rows(model, tok, old)
    for word in words:
        assert _single_token_everywhere(tok, word)
        assert tok.tokenize(f"The {word.upper()} is") == ["the", word, "is"]  # uncased: folded like its own words
        row = tok.convert_tokens_to_ids(word)
        torch.testing.assert_close(model.get_input_embeddings().weight[row], emb[old[word]].mean(0))
        torch.testing.assert_close(model.cls.predictions.bias[row], bias[old[word]].mean(0))


@pytest.mark.numerics
def test_a_run_with_added_words_resumes_exactly(configs, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("interpreter\nidentifier\ncoroutine\n")
    full = train(configs(tmp_path / "full", max_steps=4, add_tokens=str(words)), progress=False)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    resumed = train(configs(part, max_steps=4, add_tokens=str(words), resume=True), progress=False)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["added_tokens"] == full.metrics["added_tokens"] == 3
    # the words are a resume key: another list does not continue this run
    capsys.readouterr()
    assert main(["train", *_flags(configs, part), "--add-tokens", "5", "--resume"]) == 1
    assert "add_tokens" in capsys.readouterr().err


def _flags(configs, out) -> list[str]:
    f = configs.flags(out)
    return ["--model", f["model"], "--dataset", f["dataset"], "--text-field", f["text_field"], "--block-size", "32",
            "--max-steps", "4", "--learning-rate", "1e-2", "--save-steps", "2", "--precision", "fp32",
            "--cache-dir", f["cache_dir"], "--general-eval", "none", "--output-dir", str(out)]


def test_prepare_with_added_words_then_train_on_the_folder(configs, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("interpreter\nidentifier\n")
    f = configs.flags(tmp_path)
    assert main(["prepare", "--model", f["model"], "--dataset", f["dataset"], "--text-field", "answers.text",
                 "--block-size", "32", "--add-tokens", str(words), "--output-dir", str(tmp_path / "prepared")]) == 0
    assert "Added 2 words to the tokenizer" in capsys.readouterr().out
    m = train(configs(tmp_path / "run", dataset=str(tmp_path / "prepared"), max_steps=2, add_tokens=str(words)),
              progress=False).metrics
    direct = train(configs(tmp_path / "direct", max_steps=2, add_tokens=str(words)), progress=False).metrics
    assert m["eval_loss_after"] == pytest.approx(direct["eval_loss_after"], rel=1e-6)  # the same blocks
    assert (tmp_path / "run" / "added_tokens.txt").read_text() == "interpreter\nidentifier\n"
    assert main(["train", *_flags(configs, tmp_path / "plain"), "--dataset", str(tmp_path / "prepared")]) == 1
    assert "prepared with --add-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [
    ("0", "--add-tokens must be a positive number of words or a file of words, got 0"),
    ("missing.txt", "--add-tokens missing.txt: no such file"),
])
def test_bad_add_tokens_is_one_line(configs, tmp_path, capsys, value, message):
    assert main(["train", *_flags(configs, tmp_path / "run"), "--add-tokens", value]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mlmtune: error: {message}") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_word_file_skips_blank_lines_repeats_and_known_tokens(configs, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("interpreter\n\n  \nthe\nidentifier\ninterpreter\n")
    m = train(configs(tmp_path / "run", max_steps=1, add_tokens=str(words)), progress=False).metrics
    assert m["added_tokens"] == 2
    assert (tmp_path / "run" / "added_tokens.txt").read_text() == "interpreter\nidentifier\n"
    err = capsys.readouterr().err
    assert "skipped 2 repeated word(s) or word(s) that are one token already (the, interpreter)" in err


def test_added_words_need_a_file_with_a_stream_and_a_tokenizer_they_fit(configs, tmp_path, capsys):
    assert main(["train", *_flags(configs, tmp_path / "run"), "--streaming", "--add-tokens", "5"]) == 1
    assert "a stream does not hold" in capsys.readouterr().err
    words = tmp_path / "words.txt"
    words.write_text("the\n")
    assert main(["train", *_flags(configs, tmp_path / "run2"), "--add-tokens", str(words)]) == 1
    assert "holds no word to add" in capsys.readouterr().err


def test_sentencepiece_is_refused_in_one_line(docs_texts, tmp_path):
    from test_word_masking import _sentencepiece_tokenizer

    from mlmtune.errors import MlmtuneError

    tok = _sentencepiece_tokenizer(docs_texts[:400], tmp_path)
    with pytest.raises(MlmtuneError, match="^--add-tokens supports WordPiece and byte-level BPE tokenizers; this one "
                                           "is SentencePiece"):
        add_words(tok, made_up_words(2))
