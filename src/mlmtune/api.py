"""The HTTP API's shapes: what a fill request may hold, checked by one pure function (`parse_fill`), and the
OpenAPI description of both request shapes.

Two shapes are accepted: mlmtune's `{"text": ..., "top_k": 5, "targets": [...]}` and the Inference
API's `{"inputs": ..., "parameters": {"top_k": 5, "targets": [...]}}`, which is what
`huggingface_hub.InferenceClient.fill_mask` sends. Every limit answers with a 4xx and a message that
says what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlmtune.errors import MlmtuneError
from mlmtune.fill import FillMask


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64_000
    max_texts: int = 64
    max_chars: int = 2_000
    max_masks: int = 8
    max_top_k: int = 100


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _check_fields(payload: dict, known: set[str], where: str = "") -> None:
    unknown = set(payload) - known
    if unknown:
        raise BadRequest(422, f"unknown field(s){where}: {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(known))}")


def _parse_body(body: bytes, limits: Limits) -> tuple[list[str], bool, int, list[str] | None]:
    """Validate a fill body: (texts, whether the texts came as a list, top_k, targets), or BadRequest.

    Two shapes are accepted: mlmtune's `{"text": ..., "top_k": 5, "targets": [...]}` and the
    Inference API's `{"inputs": ..., "parameters": {"top_k": 5, "targets": [...]}}`, which is what
    `huggingface_hub.InferenceClient.fill_mask` sends.
    """
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
        _check_fields(params, {"top_k", "targets"}, " in parameters")
    else:
        _check_fields(payload, {"text", "top_k", "targets"})
        field_name, text, params = "text", payload.get("text"), payload
    is_list = isinstance(text, list)
    texts = text if is_list else [text]
    if text is None or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest(422, f'"{field_name}" must be a string or a non-empty list of strings')
    if len(texts) > limits.max_texts:
        raise BadRequest(422, f'"{field_name}" holds {len(texts)} texts; the limit is {limits.max_texts}')
    top_k = params.get("top_k")
    top_k = 5 if top_k is None else top_k  # the client sends null for a parameter it was not given
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
        raise BadRequest(422, f'"top_k" must be an integer from 1 to {limits.max_top_k}, got {top_k!r}')
    targets = params.get("targets")
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise BadRequest(422, '"targets" must be a non-empty list of words')
    for n, t in enumerate(texts, 1):
        where = f"text {n}" if is_list else "the text"
        if len(t) > limits.max_chars:
            raise BadRequest(413, f"{where} is {len(t):,} characters; the limit is {limits.max_chars:,}")
    return texts, is_list, top_k, targets


@dataclass(frozen=True)
class FillRequest:
    """A valid fill request: its texts tokenized, its options checked against the model."""

    texts: list[str]
    is_list: bool  # the texts came as a list (the answer is then a list per text)
    top_k: int
    encoded: list  # token ids per text
    target_ids: Any  # vocabulary ids of the targets, or None


def parse_fill(body: bytes, limits: Limits, filler: FillMask) -> FillRequest:
    """A fill body checked against the limits and the model: the request, or BadRequest(status, message).

    Nothing here changes any state: the same body and model always give the same answer.
    """
    texts, is_list, top_k, targets = _parse_body(body, limits)
    try:
        encoded = filler.encode(texts)
        for n, ids in enumerate(encoded, 1):
            masks = int((ids == filler.tokenizer.mask_token_id).sum())
            if masks > limits.max_masks:
                where = f"text {n}" if is_list else "the text"
                raise BadRequest(422, f"{where} has {masks} masks; the limit is {limits.max_masks}")
        filler.check_top_k(top_k, targets)
        target_ids = filler.target_ids(targets) if targets else None
    except MlmtuneError as e:  # no mask, empty, too long, top_k over the vocabulary, targets not in it
        raise BadRequest(422, str(e)) from None
    return FillRequest(texts, is_list, top_k, encoded, target_ids)


_PREDICTION = {"type": "object", "properties": {
    "score": {"type": "number"}, "token": {"type": "integer"}, "token_str": {"type": "string"},
    "sequence": {"type": "string"}}}
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_PARAMS = {"top_k": {"type": "integer", "minimum": 1, "default": 5},
           "targets": {"type": "array", "items": {"type": "string"}, "description": "score only these words"}}
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
