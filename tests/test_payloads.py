"""`api.parse_fill`, the server's one check of a fill request, without HTTP: what it accepts (checked against the
tokenizer and the pipeline's target rule), and the 4xx it gives for everything else."""

from __future__ import annotations

import json

import pytest

from mlmtune.inference.fill import FillMask
from mlmtune.serving.payloads import BadRequest, Limits, parse_fill

LIMITS = Limits(max_body_bytes=4000, max_texts=3, max_chars=300, max_masks=3, max_top_k=100, max_targets=10,
                max_work=400)


def _parse(body, filler, limits=LIMITS):
    return parse_fill(json.dumps(body).encode() if not isinstance(body, bytes) else body, limits, filler)


@pytest.mark.parametrize("body, texts, is_list, top_k", [
    ({"text": "The <mask> statement."}, ["The <mask> statement."], False, 5),
    ({"text": ["A <mask>.", "The [MASK] keyword."], "top_k": 2}, ["A <mask>.", "The [MASK] keyword."], True, 2),
    ({"inputs": "A <mask>.", "parameters": {"top_k": 3}}, ["A <mask>."], False, 3),
    ({"inputs": ["A <mask>."], "parameters": {"top_k": None, "targets": None}}, ["A <mask>."], True, 5),
    ({"inputs": "A <mask>.", "options": {"wait_for_model": True}}, ["A <mask>."], False, 5),
    ({"text": "The <|mask|> keyword."}, ["The <|mask|> keyword."], False, 5),  # EuroBERT's spelling
])
def test_valid_requests(filler, body, texts, is_list, top_k):
    req = _parse(body, filler)
    assert (req.texts, req.is_list, req.top_k, req.target_ids) == (texts, is_list, top_k, None)
    # the ids the model will see are the tokenizer's own, with either mask spelling made the model's
    tok = filler.tokenizer
    assert [ids.tolist() for ids in req.encoded] == \
        [tok(t.replace("[MASK]", tok.mask_token).replace("<|mask|>", tok.mask_token))["input_ids"] for t in texts]
    again = _parse(body, filler)  # a pure function: the same body gives the same request
    assert (again.texts, again.top_k) == (req.texts, req.top_k) and all(
        a.equal(b) for a, b in zip(again.encoded, req.encoded))


def test_targets_follow_the_pipelines_rule(filler, tiny_model_dir):
    from transformers import pipeline

    targets = ["Ġin", "Ġdef", "Ġthe"]  # vocabulary entries: ids as the pipeline maps them
    req = _parse({"inputs": "The <mask> statement.", "parameters": {"top_k": 2, "targets": targets}}, filler)
    pipe = pipeline("fill-mask", model=str(tiny_model_dir))
    assert not req.words and sorted(req.target_ids.tolist()) == sorted(pipe.get_target_ids(targets).tolist())
    # a target of several pieces makes it a request for words, scored whole (not cut to its first piece)
    req = _parse({"text": "The <mask> statement.", "targets": ["Ġin", "zzzz"]}, filler)
    assert req.words and req.target_ids is None and req.targets == ["Ġin", "zzzz"]


@pytest.mark.parametrize("body, status, message", [
    (b'{"text": "A <mask>.",', 400, "malformed JSON"),
    (b"[" * 3_000, 400, "nested too deeply"),
    (b'"A <mask>."', 400, "the body must be a JSON object"),
    (b"x" * 4001, 413, "request body is 4,001 bytes; the limit is 4,000"),
    ({"text": "<mask> " + "x" * 400}, 413, "the text is 407 characters; the limit is 300"),
    ({"text": ["A <mask>."] * 4}, 422, '"text" holds 4 texts; the limit is 3'),
    ({"text": "No mask at all."}, 422, "the text has no mask"),
    ({"text": ["A <mask>.", "none"]}, 422, "text 2 has no mask"),
    ({"text": "<mask> <mask> <mask> <mask>"}, 422, "the text has 4 masks; the limit is 3"),
    ({"text": "<mask> " + "word " * 58}, 422, "tokens long; the model takes at most 64"),
    ({"text": " "}, 422, "the text is empty"),
    ({"text": "A <mask>.", "top_k": 0}, 422, '"top_k" must be an integer from 1 to 100'),
    ({"text": "A <mask>.", "top_k": True}, 422, '"top_k" must be an integer'),
    ({"text": 42}, 422, '"text" must be a string or a non-empty list of strings'),
    ({"text": []}, 422, '"text" must be a string or a non-empty list of strings'),
    ({"txt": "A <mask>."}, 422, "unknown field(s): txt; known: beam_size, joint, max_pieces, targets, text, top_k"),
    ({"inputs": "A <mask>.", "parameters": {"topk": 3}}, 422, "unknown field(s) in parameters: topk"),
    ({"inputs": "A <mask>.", "parameters": [3]}, 422, '"parameters" must be an object'),
    ({"text": "A <mask>.", "targets": "loop"}, 422, '"targets" must be a non-empty list of words'),
    ({"text": "A <mask>.", "targets": [""]}, 422, '"targets" must be a non-empty list of words'),
    ({"text": "th<mask>", "targets": ["e ", "zzqq"]}, 422, "the target 'e ' does not stand as a word"),
    ({"text": "A <mask>.", "targets": [f"w{i}" for i in range(11)]}, 422,
     '"targets" holds 11 distinct words; the limit is 10'),
    ({"text": ["A <mask>."] * 3, "max_pieces": 5, "beam_size": 16}, 422,
     "this request runs 495 rows through the model (3 texts; a beam search of beam_size 16 for each length up to "
     "max_pieces 5); the limit is 400"),  # 3 x (1 + (1 + 16) + (1 + 2 x 16) + (1 + 3 x 16) + (1 + 4 x 16))
    ({"text": "<mask> <mask> <mask>" + " the" * 30, "joint": True, "beam_size": 16}, 422,
     "this request runs 561 rows through the model (1 texts; joint with beam_size 16"),  # 1 + 16 + 16 + 16 x 33 words
])
def test_bad_requests_are_named(filler, body, status, message):
    with pytest.raises(BadRequest) as bad:
        _parse(body, filler)
    assert bad.value.status == status and message in str(bad.value)


def test_top_k_over_the_vocabulary_is_refused_unless_targets_bound_it(filler):
    limits = Limits(max_top_k=1000)
    with pytest.raises(BadRequest, match="top_k 700 is larger than the vocabulary of this model"):
        _parse({"text": "A <mask>.", "top_k": 700}, filler, limits)
    assert _parse({"text": "A <mask>.", "top_k": 700, "targets": ["Ġin"]}, filler, limits).top_k == 700


def test_targets_are_deduplicated_and_the_vocabulary_read_once(tiny, monkeypatch):
    """9,000 targets, 300 of them distinct words of several pieces: the vocabulary is built once per model, never
    per target, and each distinct word is looked for once."""
    model, tokenizer = tiny
    calls = []
    real = tokenizer.get_vocab
    monkeypatch.setattr(tokenizer, "get_vocab", lambda: calls.append(1) or real())
    filler = FillMask(model, tokenizer)
    words = [f"zq{a}{b}vx" for a in "bcdfghjkmnpqvwxz" for b in "bcdfghjkmnpqvwxz0123"][:300]
    limits = Limits(max_body_bytes=200_000, max_work=100_000)
    req = _parse({"text": "The <mask> statement.", "targets": words * 30}, filler, limits)
    assert req.targets == words and len(req.pieces[0]) == 300
    _parse({"text": "The <mask> statement.", "targets": words}, filler, limits)
    assert len(calls) == 1


def _rows_run(monkeypatch) -> list[int]:
    """Rows of every forward pass the word fills run, as they run."""
    import mlmtune.inference.fill_words
    import mlmtune.inference.scoring

    rows: list[int] = []
    for module in (mlmtune.inference.fill_words, mlmtune.inference.scoring):
        real = module.logits_at_positions
        monkeypatch.setattr(module, "logits_at_positions",
                            lambda model, ids, *a, real=real, **k: rows.append(ids.shape[0]) or real(model, ids, *a,
                                                                                                       **k))
    return rows


@pytest.mark.parametrize("body", [
    {"text": "The <mask> statement.", "targets": ["Ġin", "zzqq", "photosynthesis", "zzqq"]},
    {"text": "The <mask> statement.", "max_pieces": 3, "beam_size": 4},
    {"text": "The <mask> is used in a <mask> loop.", "joint": True, "beam_size": 3},
    {"text": ["A <mask> here.", "The <mask> of <mask> and <mask>."], "joint": True},
])
def test_the_work_counted_is_the_rows_the_model_runs(filler, monkeypatch, body):
    """The bound is checked against a count made before anything runs: it must be what then runs."""
    req = _parse(body, filler, Limits(max_work=100_000, max_masks=8))
    rows = _rows_run(monkeypatch)
    for n, (text, ids) in enumerate(zip(req.texts, req.encoded)):
        filler.fill_words(text, ids, req.top_k, req.targets, req.max_pieces, req.joint, req.beam_size,
                          req.pieces[n] if req.pieces else None)
    assert sum(rows) == req.work
