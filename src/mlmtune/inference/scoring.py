"""Texts -> scores: the pseudo-log-likelihood of a text under a masked LM, by word and in all.

PLL (Salazar et al., 2020) scores a text by masking each of its tokens in turn and adding up the
log-probability the model gives the token back. `original` masks one token at a time; a word of many
pieces then scores too well, since its other pieces give it away. `within-word-l2r` (Kauf & Ivanova,
2023, minicons' `within_word_l2r`) masks, with each token, the pieces of its word to its right, so a word
is scored left to right as a whole. A word of one piece gets the same score under both.

Every masked copy of every text in a batch runs in one padded forward pass, the vocabulary head only at
the scored position of each copy; the scores come back to the host once per pass.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from mlmtune.device import WEIGHT_DTYPES, inference_precision, resolve_device
from mlmtune.errors import MlmtuneError
from mlmtune.model.forward import logits_at_positions, pad_rows
from mlmtune.model.load import max_positions
from mlmtune.model.onnx_runtime import load_for

METRICS = ("within-word-l2r", "original")  # config_use.SCORE_METRICS
NO_TURN = nullcontext()  # what a forward pass holds when nothing else shares the model


@dataclass(frozen=True)
class TextScore:
    """A text's pseudo-log-likelihood (natural log), and its words' shares of it."""

    text: str
    pll: float
    tokens: int
    words: list[dict] = field(default_factory=list)  # {"word", "pll", "pieces"}, in order

    def as_dict(self, per_word: bool = False) -> dict:
        out = {"text": self.text, "pll": self.pll, "words": len(self.words), "tokens": self.tokens}
        if per_word:
            out["per_word"] = self.words
        return out


def masked_copies(ids: list[int], word_ids: list[int | None], mask_id: int, metric: str) -> list[tuple[list[int], int]]:
    """The copies of one tokenized text that PLL scores: (ids with the masks, the position scored), one per
    token that is not special."""
    copies = []
    for j, word in enumerate(word_ids):
        if word is None:
            continue
        masked = list(ids)
        masked[j] = mask_id
        if metric == "within-word-l2r":  # the rest of the word is hidden too: no piece gives its word away
            k = j + 1
            while k < len(ids) and word_ids[k] == word:
                masked[k] = mask_id
                k += 1
        copies.append((masked, j))
    return copies


@torch.inference_mode()
def copy_log_probs(model, copies: list[tuple[list[int], int]], targets: list[int], pad_id: int,
                   batch_size: int, device: torch.device, vocab: int | None = None,
                   turn: AbstractContextManager = NO_TURN) -> list[float]:
    """log p(target | copy) at each copy's scored position, in order: the copies padded and batched by length,
    the vocabulary head at the scored positions only, one host copy per forward pass. `vocab`: the softmax over
    the first `vocab` rows only (a model whose vocabulary grew, scored as it was before). `turn` is held around
    each forward pass (the server's: its model lock, and the request's deadline checked)."""
    order = sorted(range(len(copies)), key=lambda i: len(copies[i][0]))
    out = [0.0] * len(copies)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, attention = pad_rows([copies[i][0] for i in idx], pad_id)
        width = ids.shape[1]
        positions = torch.tensor([row * width + copies[i][1] for row, i in enumerate(idx)])
        with turn:
            logits = logits_at_positions(model, ids.to(device), positions.to(device), attention.to(device))  # (P, V)
            logits = logits if vocab is None else logits[:, :vocab]
            chosen = torch.tensor([targets[i] for i in idx], device=device)
            logp = logits.float().log_softmax(-1).gather(1, chosen[:, None]).squeeze(1).cpu().tolist()
        for i, value in zip(idx, logp):
            out[i] = value
    return out


class Scorer:
    """A loaded masked-LM that scores texts.

    Example:
        >>> scorer = Scorer.from_pretrained("path/to/model")  # doctest: +SKIP
        >>> scorer.score(["The cat sat on the mat.", "The cat sat on the hat."])[0].pll  # doctest: +SKIP
        -23.4
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, device: str | torch.device | None = None,
                 vocab: int | None = None, precision: str | None = None):
        """`precision`: None scores the model in the dtype it has (the training run's model, the server's
        filler's); auto, fp32, bf16 or fp16 cast its weights (`device.inference_precision`)."""
        self.device = resolve_device(device)
        self.vocab = vocab  # score over the first `vocab` rows only: the model as it was before its vocabulary grew
        if precision is not None:
            model = model.to(dtype=WEIGHT_DTYPES[inference_precision(precision, self.device)])
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_positions(model, tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise MlmtuneError("scoring by words needs a fast tokenizer (its word_ids()); this one is not")

    @classmethod
    def from_pretrained(cls, name: str, batch_size: int = 64, device: str | torch.device | None = None,
                        safetensors_only: bool = False, precision: str = "auto", runtime: str = "torch",
                        quantized: bool = False) -> Scorer:
        """`runtime` onnx: the exported graphs of a folder made by `mlmtune export`, run by onnxruntime (in fp32,
        on the CPU)."""
        model, tokenizer = load_for(name, runtime, quantized, safetensors_only)
        if runtime == "onnx":
            return cls(model, tokenizer, batch_size=batch_size, device="cpu")
        return cls(model, tokenizer, batch_size=batch_size, device=device, precision=precision)

    def encode(self, texts: list[str], truncate: bool = False) -> list:
        """Tokenize and check each text: not empty, not longer than the model takes (or, with `truncate`, cut to
        it: the score is then the first part's)."""
        encodings = []
        for n, text in enumerate(texts, 1):
            where = f"text {n}" if len(texts) > 1 else "the text"
            if not text.strip():
                raise MlmtuneError(f"{where} is empty: there is nothing to score")
            enc = self.tokenizer(text, truncation=truncate, max_length=self.max_length if truncate else None)
            if len(enc["input_ids"]) > self.max_length:
                raise MlmtuneError(f"{where} is {len(enc['input_ids'])} tokens long; the model takes at most "
                                   f"{self.max_length}")
            encodings.append(enc)
        return encodings

    def score_encoded(self, texts: list[str], encodings: list, metric: str = "within-word-l2r",
                      turn: AbstractContextManager = NO_TURN) -> list[TextScore]:
        """The scores of texts already tokenized by `encode`, every masked copy of all of them batched together;
        `turn` held around each forward pass."""
        if metric not in METRICS:
            raise MlmtuneError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        copies, targets, owners = [], [], []
        for t, enc in enumerate(encodings):
            ids = enc["input_ids"]
            for masked, j in masked_copies(ids, enc.word_ids(), self.tokenizer.mask_token_id, metric):
                copies.append((masked, j))
                targets.append(ids[j])
                owners.append((t, j))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logp = copy_log_probs(self.model, copies, targets, pad, self.batch_size, self.device, self.vocab, turn)
        per_token: list[dict[int, float]] = [{} for _ in encodings]
        for (t, j), value in zip(owners, logp):
            per_token[t][j] = value
        return [self._text_score(text, enc, per_token[t]) for t, (text, enc) in enumerate(zip(texts, encodings))]

    def _text_score(self, text: str, enc, token_logp: dict[int, float]) -> TextScore:
        words: dict[int, dict] = {}
        for j, word in enumerate(enc.word_ids()):
            if word is None:
                continue
            entry = words.setdefault(word, {"word": "", "pll": 0.0, "pieces": 0, "first": j})
            entry["pll"] += token_logp[j]
            entry["pieces"] += 1
        for word, entry in words.items():
            span = enc.word_to_chars(word)
            entry["word"] = text[span.start : span.end] if span is not None else ""
            del entry["first"]
        return TextScore(text, sum(token_logp.values()), len(token_logp), list(words.values()))

    def score(self, texts: list[str], metric: str = "within-word-l2r") -> list[TextScore]:
        """Pseudo-log-likelihood of each text (natural log; higher is more likely), with its words' shares."""
        return self.score_encoded(texts, self.encode(texts), metric)


def score(model, texts: str | list[str], metric: str = "within-word-l2r", batch_size: int = 64,
          device: str | torch.device | None = None) -> list[TextScore]:
    """`mlmtune.score`: the pseudo-log-likelihood of texts under a masked LM.

    Args:
        model: a model folder, a Hub id, or a loaded `Scorer`.
        texts: one text or a list of them.
        metric: within-word-l2r (a word's later pieces masked too; the default) or original.

    Returns:
        One `TextScore` per text: `pll`, `tokens`, and `words` with each word's share.
    """
    scorer = model if isinstance(model, Scorer) else Scorer.from_pretrained(model, batch_size=batch_size,
                                                                            device=device)
    return scorer.score([texts] if isinstance(texts, str) else list(texts), metric)
