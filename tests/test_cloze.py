"""The domain cloze (`--cloze-words`): held-out cases only, the same for the same seed, whole words masked whole,
and top-k accuracy equal to a hand count through `pipeline("fill-mask")` on a model trained in the test."""

from __future__ import annotations

import json

import pytest
from transformers import pipeline

from mlmtune.cli import main
from mlmtune.config import DataConfig
from mlmtune.data.text import load_texts
from mlmtune.errors import MlmtuneError
from mlmtune.evaluation import cloze
from mlmtune.evaluation.cloze import cloze_accuracy, cloze_cases, held_out_cases, python_words, read_cloze_words
from mlmtune.model.load import load_model
from mlmtune.training.train import train

# sentences the cities model never saw whole (its corpus repeats six templates), in its vocabulary
UNSEEN = ["many people live in the city of new york .", "we went to los angeles to make food .",
          "plants use light and water to make food .", "i live in los angeles and we use photosynthesis .",
          "the city of los angeles is old and big .", "photosynthesis is big in the city of new york .",
          "people there use photosynthesis to make food from light and water ."]
WORDS = ["york", "angeles", "photosynthesis", "light", "food", "city"]


def test_python_words_are_keywords_and_builtins_not_english_function_words():
    words = set(python_words())
    assert {"break", "def", "None", "lambda", "yield", "len", "isinstance", "ValueError", "try"} <= words
    assert not words & {"and", "in", "is", "if", "for", "or", "not", "with", "as", "else", "while"}


def pipeline_right(model, tok, cases) -> dict[int, int]:
    """How many cases `pipeline("fill-mask")` gets right at top-1 and top-3: every piece of the word among its
    mask's first k."""
    fill = pipeline("fill-mask", model=model, tokenizer=tok, top_k=3)
    right = {1: 0, 3: 0}
    for c in cases:
        masked = c.masked(tok.mask_token)
        assert masked.count(tok.mask_token) == len(c.targets)
        got = fill(masked)
        per_mask = got if isinstance(got[0], list) else [got]  # the pipeline nests when there are several masks
        for k in right:
            right[k] += all(t in [p["token"] for p in preds[:k]] for t, preds in zip(c.targets, per_mask))
    return right


def test_top_k_equals_a_hand_count_through_the_pipeline(cities_run):
    model, tok = load_model(str(cities_run.folder))
    cases = cloze_cases(UNSEEN, WORDS, tok, max_length=32)
    assert {c.word for c in cases} == set(WORDS)
    several = [c for c in cases if c.word == "photosynthesis"]
    assert several and all(len(c.positions) == 3 for c in several)  # photo ##syn ##thesis, all three masked
    right = pipeline_right(model, tok, cases)
    got = cloze_accuracy(model, tok, cases, batch_size=4)
    assert got["cloze_cases"] == len(cases) and got["cloze_words"] == len(WORDS)
    assert got["cloze_top1"] == right[1] / len(cases) and got["cloze_top3"] == right[3] / len(cases)
    assert 0 < right[1] <= right[3] < len(cases) or right[3] == len(cases)  # the model learned something


def test_a_word_counts_only_when_every_piece_does(cities_run, monkeypatch):
    model, tok = load_model(str(cities_run.folder))
    case = next(c for c in cloze_cases(UNSEEN, ["photosynthesis"], tok, max_length=32))
    first, second, third = case.targets
    # the first two pieces top-1, the last one only third: right at 3, wrong at 1
    monkeypatch.setattr(cloze, "cloze_ranks", lambda *a, **k: [[[first, 0, 0], [second, 0, 0], [0, 0, third]]])
    got = cloze_accuracy(model, tok, [case])
    assert (got["cloze_top1"], got["cloze_top3"]) == (0.0, 1.0)
    monkeypatch.setattr(cloze, "cloze_ranks", lambda *a, **k: [[[first, 0, 0], [0, 0, 0], [third, 0, 0]]])
    assert cloze_accuracy(model, tok, [case])["cloze_top3"] == 0.0


def _corpus(tmp_path):
    """Texts each written once, and one paragraph written many times (so it falls in both splits)."""
    unique = [f"the {w} number {i} is read by the parser in line {i} ." for i in range(60) for w in ("lambda", "yield")]
    repeated = ["a lambda repeated in both splits is no test ."] * 40
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(unique + repeated) + "\n")
    return path


def test_cases_are_held_out_and_drawn_by_the_seed(tmp_path):
    _, tok = load_model("builtin:all-minilm-l6-v2")
    data = DataConfig(dataset=str(_corpus(tmp_path)), test_size=0.2)
    name, cases = held_out_cases("python", data, 42, tok, 512)
    assert name == "Python keywords and built-ins" and {c.word for c in cases} == {"lambda", "yield"}
    split = load_texts(data, 42)
    train_texts, eval_texts = set(split["train"]["text"]), set(split["test"]["text"])
    assert "a lambda repeated in both splits is no test ." in train_texts & eval_texts
    assert all(any(c.text in t for t in eval_texts) and not any(c.text in t for t in train_texts) for c in cases)
    again = held_out_cases("python", data, 42, tok, 512)[1]
    assert [(c.text, c.start) for c in again] == [(c.text, c.start) for c in cases]
    other = held_out_cases("python", data, 7, tok, 512)[1]
    assert [(c.text, c.start) for c in other] != [(c.text, c.start) for c in cases]
    assert len(cases) <= 2 * cloze.PER_WORD  # a few frequent words do not make the whole measure


def test_a_word_file_skips_blanks_and_repeats_and_refuses_phrases(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("lambda\n\n  yield \nlambda\n")
    assert read_cloze_words(str(words)) == ["lambda", "yield"]
    words.write_text("new york\n")
    with pytest.raises(MlmtuneError, match="one word a line, without spaces"):
        read_cloze_words(str(words))
    with pytest.raises(MlmtuneError, match="cannot read it"):
        read_cloze_words(str(tmp_path / "missing.txt"))


def test_train_reports_the_cloze_and_eval_reproduces_it(configs, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("object\nfunction\nclass\nvalue\nreturn\nmethod\n")
    out = tmp_path / "run"
    m = train(configs(out, cloze_words=str(words), report_to="tensorboard"), progress=False).metrics
    assert m["cloze"] == str(words)
    # the figures before and after are pipeline("fill-mask")'s on the run's held-out cases
    tok = load_model(str(out))[1]
    cfg = configs(out)
    cases = held_out_cases(str(words), cfg.data, cfg.seed, tok, max_length=64)[1]
    assert m["cloze_cases"] == len(cases) >= 3  # 4 held-out occurrences of the six words
    for folder, when in ((configs.base["model"], "before"), (out, "after")):
        right = pipeline_right(load_model(str(folder))[0], tok, cases)
        assert (m[f"cloze_top1_{when}"], m[f"cloze_top3_{when}"]) == (right[1] / len(cases), right[3] / len(cases))
    assert "## What it learned of the domain's words" in (out / "README.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["cloze_top3_after"] == m["cloze_top3_after"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs")).Reload()
    assert [e.step for e in events.Scalars("eval_cloze/top3")] == [0, m["train_steps"]]
    capsys.readouterr()
    flags = configs.flags(out)
    assert main(["eval", "--model", str(out), "--dataset", flags["dataset"], "--text-field", flags["text_field"],
                 "--block-size", "32", "--cloze-words", str(words)]) == 0
    printed = capsys.readouterr().out
    assert (f"top-1 {m['cloze_top1_after']:.1%}, top-3 {m['cloze_top3_after']:.1%} of {m['cloze_cases']} held-out "
            f"cases") in printed


def test_a_missing_word_file_is_one_line(configs, tmp_path, capsys):
    flags = configs.flags(tmp_path / "run")
    assert main(["eval", "--model", flags["model"], "--dataset", flags["dataset"], "--text-field",
                 flags["text_field"], "--block-size", "32", "--cloze-words", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlmtune: error: --cloze-words") and "no such file" in err and "\n" not in err
