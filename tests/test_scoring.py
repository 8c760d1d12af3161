"""`mlmtune score` and words in `fill`: pseudo-log-likelihood against a token-by-token computation through plain
transformers, whole-word targets against the hand computation, joint filling and multi-piece candidates on a
tiny model trained in the test on a corpus made for them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from compare import assert_same_as_pipeline

import mlmtune
from mlmtune.cli import main
from mlmtune.errors import MlmtuneError
from mlmtune.inference.fill import FillMask
from mlmtune.inference.scoring import Scorer

pytestmark = pytest.mark.numerics

TEXTS = ["The break statement exits the innermost loop.", "Photosynthesis needs light, water and carbon dioxide.",
         "A def statement defines a function; lambda makes one inline."]


def _reference_pll(model, tokenizer, text: str, metric: str) -> float:
    """PLL one copy at a time through the plain transformers model: each token masked (and, within-word-l2r, the
    rest of its word), log-softmax of the dense logits at its place."""
    enc = tokenizer(text)
    ids, words = enc["input_ids"], enc.word_ids()
    total = 0.0
    with torch.no_grad():
        for j, w in enumerate(words):
            if w is None:
                continue
            masked = list(ids)
            masked[j] = tokenizer.mask_token_id
            for k in range(j + 1, len(ids)):
                if metric != "within-word-l2r" or words[k] != w:
                    break
                masked[k] = tokenizer.mask_token_id
            logits = model(input_ids=torch.tensor([masked])).logits[0, j]
            total += float(logits.log_softmax(-1)[ids[j]])
    return total


@pytest.mark.parametrize("folder", ["tiny_bert_dir", "tiny_model_dir"])  # WordPiece, byte-level BPE
@pytest.mark.parametrize("metric", ["original", "within-word-l2r"])
def test_score_equals_a_token_by_token_computation(request, folder, metric):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = request.getfixturevalue(folder)
    model, tok = AutoModelForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    results = mlmtune.score(str(path), TEXTS, metric=metric, batch_size=7)  # copies of several texts per pass
    for text, result in zip(TEXTS, results):
        assert result.pll == pytest.approx(_reference_pll(model, tok, text, metric), abs=1e-5)
        assert result.tokens == sum(w is not None for w in tok(text).word_ids())
        assert sum(w["pll"] for w in result.words) == pytest.approx(result.pll, abs=1e-6)


def test_within_word_l2r_differs_only_on_words_of_several_pieces(tiny_bert_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir)
    with torch.no_grad():  # weights away from their near-uniform init, so that the context matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    scorer = Scorer(model, AutoTokenizer.from_pretrained(tiny_bert_dir))
    (l2r,), (orig,) = scorer.score([TEXTS[1]]), scorer.score([TEXTS[1]], metric="original")
    several = [(a, b) for a, b in zip(l2r.words, orig.words) if a["pieces"] > 1]
    single = [(a, b) for a, b in zip(l2r.words, orig.words) if a["pieces"] == 1]
    assert several and single  # the text has both, so the test means something
    assert all(a["pll"] == pytest.approx(b["pll"], abs=1e-6) for a, b in single)
    assert all(a["pll"] != pytest.approx(b["pll"], abs=1e-4) for a, b in several)
    assert [a["word"] for a, _ in several][0] in TEXTS[1]


def test_bad_score_input(tiny_bert_dir, capsys):
    with pytest.raises(MlmtuneError, match="the text is empty: there is nothing to score"):
        mlmtune.score(str(tiny_bert_dir), ["  "])
    with pytest.raises(MlmtuneError, match="text 2 is .* tokens long; the model takes at most 64"):
        mlmtune.score(str(tiny_bert_dir), ["fine", "word " * 80])
    assert main(["score", "--model", str(tiny_bert_dir), "--metric", "left-to-right", "a text"]) == 1
    assert "--metric must be one of within-word-l2r, original" in capsys.readouterr().err


def test_score_cli_prints_words_and_json(tiny_bert_dir, capsys):
    assert main(["score", "--model", str(tiny_bert_dir), "--json", "--per-word", *TEXTS[:2]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = mlmtune.score(str(tiny_bert_dir), TEXTS[:2])
    assert [line["pll"] for line in lines] == pytest.approx([r.pll for r in expected], abs=1e-6)
    assert [len(line["per_word"]) for line in lines] == [line["words"] for line in lines]
    assert main(["score", "--model", str(tiny_bert_dir), "--per-word", TEXTS[1]]) == 0
    out = capsys.readouterr().out
    assert "photosynthesis (3 pieces)" in out.lower() or "pieces)" in out


# ---------------------------------------------------------------------------------------------
# words in fill, on a model trained in the test


@pytest.fixture(scope="module")
def cities(cities_run):
    return FillMask.from_pretrained(str(cities_run.folder))


def _hand_word_log_prob(filler, text: str, pieces: list[int]) -> float:
    """log p(word): the mask widened to one mask per piece, piece i scored with the pieces before it in place."""
    tok, model = filler.tokenizer, filler.model
    ids = tok(text)["input_ids"]
    at = ids.index(tok.mask_token_id)
    total = 0.0
    with torch.no_grad():
        for i in range(len(pieces)):
            row = ids[:at] + pieces[:i] + [tok.mask_token_id] * (len(pieces) - i) + ids[at + 1 :]
            total += float(model(input_ids=torch.tensor([row])).logits[0, at + i].log_softmax(-1)[pieces[i]])
    return total


def test_a_target_of_several_pieces_is_scored_whole(cities):
    text = "plants use [MASK] to make food from light ."
    got = cities(text, top_k=3, targets=["photosynthesis", "water", "light"])
    assert [g["token_str"] for g in got][0] == "photosynthesis" and got[0]["pieces"] == 3
    photo = cities.tokenizer("photosynthesis", add_special_tokens=False)["input_ids"]
    assert got[0]["tokens"] == photo and len(photo) == 3
    assert math.log(got[0]["score"]) == pytest.approx(_hand_word_log_prob(cities, text, photo), abs=1e-5)
    water = [g for g in got if g["token_str"] == "water"][0]
    assert math.log(water["score"]) == pytest.approx(_hand_word_log_prob(cities, text, [water["token"]]), abs=1e-5)


def test_single_piece_targets_keep_the_pipelines_scores(cities, tmp_path):
    from transformers import pipeline

    folder = tmp_path / "cities"
    cities.model.save_pretrained(folder)
    cities.tokenizer.save_pretrained(folder)
    pipe = pipeline("fill-mask", model=str(folder))
    text = "i live in the city of [MASK] york ."
    targets = ["new", "los", "old"]
    assert_same_as_pipeline(cities(text, top_k=3, targets=targets), pipe(text, top_k=3, targets=targets))


def test_max_pieces_proposes_a_word_of_three_pieces(cities):
    got = cities("plants use [MASK] to make food from light .", top_k=3, max_pieces=3)
    assert ("photosynthesis", 3) in [(g["token_str"], g["pieces"]) for g in got]
    assert all(1 <= g["pieces"] <= 3 for g in got) and len({g["token_str"] for g in got}) == 3
    assert cities("plants use [MASK] to make food from light .", top_k=3)[0]["token_str"] != "photosynthesis"


def test_joint_fills_never_mix_the_pairs(cities):
    text = "i live in the city of [MASK] [MASK] ."
    joint = cities(text, top_k=4, joint=True)
    pairs = {tuple(j["token_strs"]) for j in joint[:2]}
    assert pairs == {("new", "york"), ("los", "angeles")}
    per_mask = cities(text, top_k=2)  # each mask on its own: both cities' words at both places
    assert {p["token_str"] for p in per_mask[0]} == {"new", "los"}
    assert {p["token_str"] for p in per_mask[1]} == {"york", "angeles"}
    # the best joint filling's score is its left-to-right probability, by hand
    tok, model = cities.tokenizer, cities.model
    ids = tok(text)["input_ids"]
    first, second = (i for i, t in enumerate(ids) if t == tok.mask_token_id)
    best = joint[0]["tokens"]
    with torch.no_grad():
        lp1 = model(input_ids=torch.tensor([ids])).logits[0, first].log_softmax(-1)[best[0]]
        filled = list(ids)
        filled[first] = best[0]
        lp2 = model(input_ids=torch.tensor([filled])).logits[0, second].log_softmax(-1)[best[1]]
    assert math.log(joint[0]["score"]) == pytest.approx(float(lp1 + lp2), abs=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"joint": True, "text": "no mask here ."}, "has no mask"),
    ({"joint": True, "text": "city " + "[MASK] " * 9}, "a joint fill takes at most 8 masks; this text has 9"),
    ({"max_pieces": 0}, "max_pieces and beam_size must be at least 1"),
    ({"targets": ["\u200b"]}, "tokenizes to nothing"),
    ({"max_pieces": 2, "text": "the [MASK] of [MASK] ."}, "words of several pieces are filled into one mask"),
])
def test_bad_word_fills_are_one_line(cities, kwargs, message):
    text = kwargs.pop("text", "the city of [MASK] .")
    with pytest.raises(MlmtuneError, match=message):
        cities(text, **kwargs)


def test_fill_cli_takes_the_word_flags(cities, tmp_path, capsys):
    folder = tmp_path / "cities"
    cities.model.save_pretrained(folder)
    cities.tokenizer.save_pretrained(folder)
    assert main(["fill", "--model", str(folder), "--joint", "--top-k", "2", "--json",
                 "i live in the city of [MASK] [MASK] ."]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {tuple(g["token_strs"]) for g in got} == {("new", "york"), ("los", "angeles")}
    for bad in ("0", "100"):  # 100: minutes of beam search, then past the model's positions; capped as the server
        assert main(["fill", "--model", str(folder), "--max-pieces", bad, "a [MASK] ."]) == 1
        assert capsys.readouterr().err.strip() == (f"mlmtune: error: --max-pieces must be 1 to 5 (words of more pieces "
                                                   f"than that are rare, and their search takes minutes), got {bad}")


def test_a_word_of_several_pieces_that_would_pass_the_positions_is_one_line(cities, tmp_path, capsys):
    """The mask widens to max_pieces masks: a text that fits the model, but not with its mask widened, is refused
    before any search (not a traceback from the position embeddings)."""
    tok = cities.tokenizer
    base = len(tok("the city of [MASK] .")["input_ids"])
    text = "city " * (cities.max_length - base) + "the city of [MASK] ."
    n = len(tok(text)["input_ids"])
    assert n == cities.max_length  # fits as it is: the pipeline's single pieces fill it
    assert cities(text, top_k=1)
    with pytest.raises(MlmtuneError, match=rf"^a text of {n} tokens with a word of up to 2 pieces in its mask passes "
                                           rf"the model's {n} positions: shorten the text or lower --max-pieces$"):
        cities(text, top_k=1, max_pieces=2)
    folder = tmp_path / "cities"
    cities.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert main(["fill", "--model", str(folder), "--max-pieces", "5", text]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlmtune: error: a text of ") and "\n" not in err and "Traceback" not in err
