"""The HTTP API's shapes: what a fill or score request may hold, each checked by one pure function
(`parse_fill`, `parse_score`), and the OpenAPI description of both request shapes.

Two shapes are accepted: mlmtune's `{"text": ..., "top_k": 5, "targets": [...]}` and the Inference
API's `{"inputs": ..., "parameters": {"top_k": 5, "targets": [...]}}`, which is what
`huggingface_hub.InferenceClient.fill_mask` sends. Every limit answers with a 4xx and a message that
says what is wrong. Besides the sizes of a body, the work a request asks of the model is bounded: the rows
(copies of a text) it runs through the model, counted before any runs (`fill_words.work_rows`).

The parse functions tokenize and may take tens of milliseconds for a large body: the server calls them in a
worker thread, never on the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlmtune.errors import MlmtuneError
from mlmtune.inference.fill import FillMask
from mlmtune.inference.fill_words import JOINT_MAX_MASKS, target_pieces, work_rows
from mlmtune.inference.scoring import METRICS, Scorer
from mlmtune.inference_config import MAX_PIECES  # a beam search over more pieces than this is not a request's work


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64_000
    max_texts: int = 64
    max_chars: int = 2_000
    max_masks: int = 8
    max_top_k: int = 100
    max_targets: int = 1_000  # distinct target words
    max_work: int = 4_096  # rows (copies of a text) a request runs through the model: word fills and scores


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _check_fields(payload: dict, known: set[str], where: str = "") -> None:
    unknown = set(payload) - known
    if unknown:
        raise BadRequest(422, f"unknown field(s){where}: {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(known))}")


MAX_BEAM = 16


def _payload(body: bytes, limits: Limits, known: set[str]) -> tuple[str, list[str], bool, dict]:
    """A body in either shape: (the texts' field, the texts, whether they came as a list, the parameters), or
    BadRequest. `known`: the parameters this route takes."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"request body is {len(body):,} bytes; the limit is {limits.max_body_bytes:,}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    except RecursionError:  # `[[[[...` deeper than the parser's stack
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, 'the body must be a JSON object like {"text": "Paris is the <mask> of France."} '
                              'or {"inputs": "Paris is the <mask> of France."}')
    if "inputs" in payload:  # the Inference API shape
        _check_fields(payload, {"inputs", "parameters", "options"})
        field_name, text = "inputs", payload["inputs"]
        params = payload.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(422, '"parameters" must be an object like {"top_k": 5}')
        _check_fields(params, known, " in parameters")
    else:
        _check_fields(payload, {"text", *known})
        field_name, text, params = "text", payload.get("text"), payload
    is_list = isinstance(text, list)
    texts = text if is_list else [text]
    if text is None or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest(422, f'"{field_name}" must be a string or a non-empty list of strings')
    if len(texts) > limits.max_texts:
        raise BadRequest(422, f'"{field_name}" holds {len(texts)} texts; the limit is {limits.max_texts}')
    for n, t in enumerate(texts, 1):
        if len(t) > limits.max_chars:
            where = f"text {n}" if is_list else "the text"
            raise BadRequest(413, f"{where} is {len(t):,} characters; the limit is {limits.max_chars:,}")
    return field_name, texts, is_list, params


def _integer(params: dict, name: str, default: int, top: int) -> int:
    value = params.get(name)
    value = default if value is None else value  # the client sends null for a parameter it was not given
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise BadRequest(422, f'"{name}" must be an integer from 1 to {top}, got {value!r}')
    return value


def _flag(params: dict, name: str) -> bool:
    value = params.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(422, f'"{name}" must be true or false, got {value!r}')
    return bool(value)


@dataclass(frozen=True)
class FillRequest:
    """A valid fill request: its texts tokenized, its options checked against the model."""

    texts: list[str]
    is_list: bool  # the texts came as a list (the answer is then a list per text)
    top_k: int
    encoded: list  # token ids per text
    target_ids: Any  # vocabulary ids of single-piece targets, or None
    targets: list[str] | None = None
    max_pieces: int = 1
    joint: bool = False
    beam_size: int = 8
    words: bool = False  # beyond the pipeline's single pieces: filled with `FillMask.fill_words`
    pieces: list | None = None  # words with targets: each text's targets' pieces (`fill_words.target_pieces`)
    work: int = 0  # rows the fill runs through the model


def _check_work(work: int, what: str, limits: Limits) -> None:
    if work > limits.max_work:
        raise BadRequest(422, f"this request runs {work:,} rows through the model ({what}); the limit is "
                              f"{limits.max_work:,}: send fewer texts, targets or masks, or a smaller beam_size")


def parse_fill(body: bytes, limits: Limits, filler: FillMask) -> FillRequest:
    """A fill body checked against the limits and the model: the request, or BadRequest(status, message).

    Nothing here changes any state: the same body and model always give the same answer.
    """
    _, texts, is_list, params = _payload(body, limits, {"top_k", "targets", "joint", "max_pieces", "beam_size"})
    top_k = _integer(params, "top_k", 5, limits.max_top_k)
    targets = params.get("targets")
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise BadRequest(422, '"targets" must be a non-empty list of words')
    if targets is not None:
        targets = list(dict.fromkeys(targets))  # a word asked twice is scored once, as the pipeline does
        if len(targets) > limits.max_targets:
            raise BadRequest(422, f'"targets" holds {len(targets):,} distinct words; the limit is '
                                  f'{limits.max_targets:,}')
    max_pieces, beam_size = _integer(params, "max_pieces", 1, MAX_PIECES), _integer(params, "beam_size", 8, MAX_BEAM)
    joint = _flag(params, "joint")
    try:
        encoded = filler.encode(texts)
        for n, ids in enumerate(encoded, 1):
            masks = int((ids == filler.tokenizer.mask_token_id).sum())
            if masks > limits.max_masks:
                where = f"text {n}" if is_list else "the text"
                raise BadRequest(422, f"{where} has {masks} masks; the limit is {limits.max_masks}")
        filler.check_top_k(top_k, targets)
        words = filler.words_needed(targets, max_pieces, joint)
        masks = [int((ids == filler.tokenizer.mask_token_id).sum()) for ids in encoded]
        if words and not joint and max(masks) > 1:
            raise BadRequest(422, "words of several pieces are filled into one mask: send one mask per text, "
                                  'or "joint": true')
        if joint and max(masks) > JOINT_MAX_MASKS:
            raise BadRequest(422, f"a joint fill takes at most {JOINT_MAX_MASKS} masks; a text has {max(masks)}")
        target_ids = filler.target_ids(targets) if targets and not words else None
        pieces = None
        if words and targets and not joint:
            several = sum(filler.single_piece(t) is None for t in targets)
            # at least a row per text and target of several pieces; bounded before each is tokenized in each text
            _check_work(len(texts) * several, f"{len(texts)} texts x {several} targets of several pieces", limits)
            pieces = [target_pieces(filler, t, targets) for t in texts]
        work = len(texts) if not words else sum(
            work_rows(filler, ids, pieces[n] if pieces else None, max_pieces, joint, beam_size)
            for n, ids in enumerate(encoded))
        what = (f"joint with beam_size {beam_size}: each mask's beams, then each finished beam once per piece"
                if joint else "each target of several pieces once per piece" if pieces else
                f"a beam search of beam_size {beam_size} for each length up to max_pieces {max_pieces}" if words
                else "one per text")
        _check_work(work, f"{len(texts)} texts; {what}", limits)
    except MlmtuneError as e:  # no mask, empty, too long, top_k over the vocabulary, a target of no pieces
        raise BadRequest(422, str(e)) from None
    return FillRequest(texts, is_list, top_k, encoded, target_ids, targets, max_pieces, joint, beam_size, words,
                       pieces, work)


@dataclass(frozen=True)
class ScoreRequest:
    """A valid score request: its texts tokenized and checked against the model."""

    texts: list[str]
    is_list: bool
    encodings: list
    metric: str
    per_word: bool
    work: int = 0  # masked copies the model scores


def parse_score(body: bytes, limits: Limits, scorer: Scorer) -> ScoreRequest:
    """A score body (`{"text": ..., "metric": ..., "per_word": ...}` or the `inputs` / `parameters` shape) checked
    against the limits and the model: the request, or BadRequest(status, message)."""
    _, texts, is_list, params = _payload(body, limits, {"metric", "per_word"})
    metric = params.get("metric") or "within-word-l2r"
    if metric not in METRICS:
        raise BadRequest(422, f'"metric" must be one of {", ".join(METRICS)}, got {metric!r}')
    per_word = _flag(params, "per_word")
    try:
        encodings = scorer.encode(texts)
    except MlmtuneError as e:  # empty, too long
        raise BadRequest(422, str(e)) from None
    work = sum(sum(w is not None for w in enc.word_ids()) for enc in encodings)  # a copy per token, as scoring makes
    _check_work(work, f"{len(texts)} texts; one copy per token", limits)
    return ScoreRequest(texts, is_list, encodings, metric, per_word, work)


_PREDICTION = {"type": "object", "properties": {
    "score": {"type": "number"}, "token": {"type": "integer"}, "token_str": {"type": "string"},
    "sequence": {"type": "string"}}}
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_PARAMS = {"top_k": {"type": "integer", "minimum": 1, "default": 5},
           "targets": {"type": "array", "items": {"type": "string"},
                       "description": "score only these words (a word of several pieces is scored whole)"},
           "max_pieces": {"type": "integer", "minimum": 1, "maximum": MAX_PIECES, "default": 1,
                          "description": "also propose words of up to this many pieces"},
           "joint": {"type": "boolean", "default": False, "description": "fill all the masks of a text together"},
           "beam_size": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM, "default": 8}}
FILL_OPENAPI = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"oneOf": [
            {"title": "mlmtune", "type": "object", "required": ["text"],
             "properties": {"text": _TEXTS, **_PARAMS}},
            {"title": "Inference API", "type": "object", "required": ["inputs"],
             "properties": {"inputs": _TEXTS, "parameters": {"type": "object", "properties": _PARAMS}}},
        ]},
        "examples": {
            "mlmtune": {"value": {"text": "Paris is the <mask> of France.", "top_k": 3}},
            "inference_api": {"summary": "Inference API (huggingface_hub.InferenceClient.fill_mask)",
                              "value": {"inputs": "Paris is the <mask> of France.",
                                        "parameters": {"top_k": 3, "targets": ["capital", "city"]}}},
            "batch": {"value": {"text": ["A <mask> is defined.", "The <mask> keyword."], "top_k": 2}},
        }}}},
    "responses": {
        "200": {"description": "What pipeline('fill-mask') returns: a list of predictions for a text with one mask, "
                               "a list of such lists for several masks, and a list per text when the input is a list.",
                "content": {"application/json": {"schema": {"type": "array", "items": {
                    "oneOf": [_PREDICTION, {"type": "array", "items": _PREDICTION}, {"type": "array"}]}},
                    "example": [{"score": 0.91, "token": 812, "token_str": " capital",
                                 "sequence": "Paris is the capital of France."}]}}},
        "4XX": {"description": "Bad input: {\"error\": \"what is wrong\"}",
                "content": {"application/json": {"schema": {"type": "object",
                                                            "properties": {"error": {"type": "string"}}}}}},
        "503": {"description": "Loading, or the queue is full: retry"},
    },
}

_SCORE_PARAMS = {"metric": {"type": "string", "enum": list(METRICS), "default": "within-word-l2r"},
                 "per_word": {"type": "boolean", "default": False}}
SCORE_OPENAPI = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"oneOf": [
            {"title": "mlmtune", "type": "object", "required": ["text"],
             "properties": {"text": _TEXTS, **_SCORE_PARAMS}},
            {"title": "inputs", "type": "object", "required": ["inputs"],
             "properties": {"inputs": _TEXTS, "parameters": {"type": "object", "properties": _SCORE_PARAMS}}},
        ]},
        "examples": {"rank": {"value": {"text": ["The cat sat on the mat.", "The cat sat on the hat."],
                                        "per_word": True}}}}}},
    "responses": {
        "200": {"description": "One object per text (a list when the input is a list): text, pll (the natural-log "
                               "pseudo-log-likelihood), words, tokens, and per_word when asked."},
        "4XX": {"description": "Bad input: {\"error\": \"what is wrong\"}"},
        "503": {"description": "Loading, or the queue is full: retry"},
    },
}
