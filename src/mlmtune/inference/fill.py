"""Logits -> predictions: fill-mask for the CLI, the Python API and the server alike.

`FillMask` returns, for each text, exactly the structure `pipeline("fill-mask")` returns
(`score`, `token`, `token_str`, `sequence`; one list per mask when a text has several), but
batches texts into one forward pass and accepts `<mask>`, `[MASK]` and `<|mask|>` whatever the
model's own mask token is.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

import numpy as np
import torch

from mlmtune.device import WEIGHT_DTYPES, inference_precision, resolve_device
from mlmtune.errors import MlmtuneError
from mlmtune.inference.fill_words import fill_candidates, fill_joint, fill_targets
from mlmtune.inference.scoring import NO_TURN
from mlmtune.inference_config import MAX_PIECES
from mlmtune.model.forward import logits_where, pad_rows
from mlmtune.model.load import max_positions
from mlmtune.model.onnx_runtime import load_for

MASK_SPELLINGS = ("<mask>", "[MASK]", "<|mask|>")  # RoBERTa and mmBERT; BERT and ModernBERT; EuroBERT

Prediction = dict[str, Any]  # {"score", "token", "token_str", "sequence"}


def format_predictions(tokenizer, ids: np.ndarray, values: list[list[float]], indices: list[list[int]],
                       target_ids: np.ndarray | None = None) -> list[Prediction] | list[list[Prediction]]:
    """The pipeline's postprocess for one text: its ids, and the top-k probabilities and vocabulary (or target)
    indices at each of its masks, in order."""
    positions = np.flatnonzero(ids == tokenizer.mask_token_id)
    single_mask = len(values) == 1
    result = []
    for i, (row_values, row_indices) in enumerate(zip(values, indices)):
        row = []
        for score, p in zip(row_values, row_indices):
            if target_ids is not None:
                p = target_ids[p].tolist()
            tokens = ids.copy()
            tokens[positions[i]] = p
            tokens = tokens[np.where(tokens != tokenizer.pad_token_id)]
            sequence = tokenizer.decode(tokens, skip_special_tokens=single_mask)
            row.append({"score": score, "token": p, "token_str": tokenizer.decode([p]), "sequence": sequence})
        result.append(row)
    return result[0] if single_mask else result


class FillMask:
    """A loaded masked-LM that fills masks.

    Example:
        >>> fill = FillMask.from_pretrained("path/to/model")  # doctest: +SKIP
        >>> fill("Paris is the <mask> of France.", top_k=2)  # doctest: +SKIP
        [{'score': 0.91, 'token': 812, 'token_str': ' capital', 'sequence': 'Paris is the capital of France.'}, ...]
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, device: str | torch.device | None = None,
                 precision: str = "auto"):
        """`precision`: fp32 gives the pipeline's scores (to float32 precision); bf16 or fp16 casts the weights
        (half the memory, faster on a GPU; softmax and top-k still run in fp32 on the cast logits); auto is bf16
        on a GPU that runs it fast, else fp32 (`device.inference_precision`)."""
        self.device = resolve_device(device)
        precision = inference_precision(precision, self.device)
        self.model = model.to(self.device, dtype=WEIGHT_DTYPES[precision]).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_positions(model, tokenizer)
        self.precision = precision
        self.load_seconds: float | None = None  # set by from_pretrained

    @classmethod
    def from_pretrained(cls, name: str, batch_size: int = 32, safetensors_only: bool = False,
                        device: str | torch.device | None = None, precision: str = "auto", runtime: str = "torch",
                        quantized: bool = False) -> FillMask:
        """`runtime` onnx: the exported graphs of a folder made by `mlmtune export` (the int8 one with
        `quantized`), run by onnxruntime on the CPU."""
        t0 = time.perf_counter()
        model, tokenizer = load_for(name, runtime, quantized, safetensors_only)
        filler = cls(model, tokenizer, batch_size=batch_size, device="cpu" if runtime == "onnx" else device,
                     precision=precision)
        filler.load_seconds = time.perf_counter() - t0
        return filler

    @property
    def runtime(self) -> str:
        """What runs the model: torch, onnx or onnx-int8 (`/health` names it)."""
        return getattr(self.model, "runtime", "torch")

    def normalize(self, text: str) -> str:
        """Spell every mask the way this model's tokenizer does."""
        for spelling in MASK_SPELLINGS:
            if spelling != self.tokenizer.mask_token:
                text = text.replace(spelling, self.tokenizer.mask_token)
        return text

    @cached_property
    def vocab(self) -> dict[str, int]:
        """The tokenizer's vocabulary, built once (`get_vocab()` builds a new dict each call: 30 ms for 50k
        entries)."""
        return self.tokenizer.get_vocab()

    def single_piece(self, target: str) -> int | None:
        """The vocabulary id of a target that is one piece (a vocabulary entry, or a word the tokenizer writes as
        one piece), or None for a word of several pieces (`fill_words` scores those whole)."""
        id_ = self.vocab.get(target)
        if id_ is not None:
            return id_
        pieces = self.tokenizer(target, add_special_tokens=False, return_attention_mask=False,
                                return_token_type_ids=False)["input_ids"]
        if not pieces:
            raise MlmtuneError(f"the target {target!r} tokenizes to nothing: give a word")
        return pieces[0] if len(pieces) == 1 else None

    def target_ids(self, targets: list[str]) -> np.ndarray:
        """Single-piece target words -> vocabulary ids (as the pipeline maps them)."""
        ids = list({self.single_piece(t) for t in targets})  # the pipeline's order, so ties break the same way
        return np.array(ids)

    def check_top_k(self, top_k: int, targets: list[str] | None = None) -> None:
        """top_k must be positive and, without targets, at most the vocabulary size."""
        if not 1 <= top_k:
            raise MlmtuneError(f"top_k must be a positive integer, got {top_k}")
        vocab = self.model.get_output_embeddings().out_features if self.model.get_output_embeddings() is not None \
            else len(self.tokenizer)
        if not targets and top_k > vocab:
            raise MlmtuneError(f"top_k {top_k} is larger than the vocabulary of this model ({vocab:,} tokens)")

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Tokenize and check each text: non-empty, has a mask, fits the model."""
        encoded = []
        for n, text in enumerate(texts, 1):
            where = f"text {n}" if len(texts) > 1 else "the text"
            if not text.strip():
                raise MlmtuneError(f"{where} is empty")
            ids = torch.tensor(self.tokenizer(self.normalize(text))["input_ids"])
            if not (ids == self.tokenizer.mask_token_id).any():
                raise MlmtuneError(f"{where} has no mask: write <mask> or [MASK] where a word is missing")
            if len(ids) > self.max_length:
                raise MlmtuneError(f"{where} is {len(ids)} tokens long; the model takes at most {self.max_length}")
            encoded.append(ids)
        return encoded

    @torch.inference_mode()
    def mask_logits(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """(M_i, V) logits at the mask positions of each text, batched by similar length; the vocabulary
        head runs at mask positions only."""
        pad = self.tokenizer.pad_token_id
        batch_size = self.batch_size if pad is not None else 1
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[torch.Tensor] = [None] * len(encoded)  # type: ignore[list-item]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, attention = pad_rows([encoded[i] for i in idx], pad if pad is not None else 0)
            where = (ids == self.tokenizer.mask_token_id) & attention.bool()
            # (masks in batch, V), left on the device: softmax and top-k run there too
            logits = logits_where(self.model, ids.to(self.device, non_blocking=True), where,
                                  attention.to(self.device, non_blocking=True)).float()
            counts = where.sum(1).tolist()
            for row, chunk in zip(idx, logits.split(counts)):
                out[row] = chunk
        return out

    @torch.inference_mode()
    def fill_batch(self, items: list[tuple[torch.Tensor, int, np.ndarray | None]]) -> list:
        """The pipeline's answer for each (token ids, top_k, target ids or None): one forward pass per batch of
        texts (`mask_logits`), then softmax and top-k over all their masks on the device and one copy of the
        (masks, k) results to the host, instead of one wait per text."""
        logits = self.mask_logits([ids for ids, _, _ in items])
        ks = [min(k, len(t)) if t is not None else k for _, k, t in items]
        width = max(ks)
        values, indices = [], []
        plain = [i for i, (_, _, t) in enumerate(items) if t is None]
        if plain:  # the texts without targets: one softmax and one top-k over all their masks
            probs = torch.cat([logits[i] for i in plain]).softmax(dim=-1)
            v, ix = probs.topk(width)
            values += list(v.split([len(logits[i]) for i in plain]))
            indices += list(ix.split([len(logits[i]) for i in plain]))
        for i in (i for i, (_, _, t) in enumerate(items) if t is not None):  # targets: their columns only
            probs = logits[i].softmax(dim=-1)[..., torch.as_tensor(items[i][2], device=logits[i].device)]
            v, ix = probs.topk(ks[i])
            values.append(torch.nn.functional.pad(v, (0, width - ks[i])))
            indices.append(torch.nn.functional.pad(ix, (0, width - ks[i])))
        order = plain + [i for i, (_, _, t) in enumerate(items) if t is not None]
        counts = [len(logits[i]) for i in order]
        host_values = torch.cat(values).cpu().split(counts)  # the one wait for the device
        host_indices = torch.cat(indices).cpu().split(counts)
        out: list = [None] * len(items)
        for i, v, ix in zip(order, host_values, host_indices):
            ids, _, target_ids = items[i]
            out[i] = format_predictions(self.tokenizer, ids.numpy(), v[:, : ks[i]].tolist(),
                                        ix[:, : ks[i]].tolist(), target_ids)
        return out

    def words_needed(self, targets: list[str] | None, max_pieces: int, joint: bool) -> bool:
        """Whether a fill goes beyond the pipeline's single pieces: joint, words of several pieces proposed, or a
        target of several pieces."""
        return joint or max_pieces > 1 or any(self.single_piece(t) is None for t in targets or [])

    def fill(self, texts: list[str], top_k: int = 5, targets: list[str] | None = None, max_pieces: int = 1,
             joint: bool = False, beam_size: int = 8) -> list:
        """Fill every text; one result per text, in input order: what `pipeline("fill-mask")` returns, unless asked
        for words of several pieces (`targets` of several pieces, `max_pieces` > 1) or a `joint` filling of all
        masks (`fill_words.py`).

        Raises:
            MlmtuneError: a text is empty, has no mask, or is longer than the model takes; words of several pieces
                asked for a text with more than one mask; `max_pieces` or `beam_size` below 1.
        """
        self.check_top_k(top_k, targets)
        if max_pieces < 1 or beam_size < 1:
            raise MlmtuneError(f"max_pieces and beam_size must be at least 1, got {max_pieces} and {beam_size}")
        if max_pieces > MAX_PIECES:
            raise MlmtuneError(f"max_pieces must be at most {MAX_PIECES}, got {max_pieces}")
        encoded = self.encode(texts)
        if self.words_needed(targets, max_pieces, joint):
            return [self.fill_words(text, ids, top_k, targets, max_pieces, joint, beam_size)
                    for text, ids in zip(texts, encoded)]
        target_ids = self.target_ids(targets) if targets else None
        chunk = self.batch_size * 8  # the logits of this many texts at most on the device at once
        return [p for start in range(0, len(encoded), chunk)
                for p in self.fill_batch([(ids, top_k, target_ids) for ids in encoded[start : start + chunk]])]

    def fill_words(self, text: str, ids: torch.Tensor, top_k: int, targets: list[str] | None, max_pieces: int,
                   joint: bool, beam_size: int, pieces: list[list[int]] | None = None, turn=NO_TURN) -> list[dict]:
        """One text filled with words (`fill_words.py`): joint, whole targets, or candidates of several pieces.
        `pieces`: the targets' pieces in this text (`fill_words.target_pieces`), when already found; `turn`: held
        around each forward pass."""
        if joint:
            return fill_joint(self, ids, top_k, beam_size, turn)
        masks = int((ids == self.tokenizer.mask_token_id).sum())
        if masks > 1:
            raise MlmtuneError(f"words of several pieces are filled into one mask, and this text has {masks}: "
                               f"fill them jointly (--joint), or one mask at a time")
        if targets:
            return fill_targets(self, text, ids, targets, top_k, pieces, turn)
        if len(ids) - 1 + max_pieces > self.max_length:  # the mask widens to max_pieces masks
            raise MlmtuneError(f"a text of {len(ids)} tokens with a word of up to {max_pieces} pieces in its mask "
                               f"passes the model's {self.max_length} positions: shorten the text or lower "
                               f"--max-pieces")
        return fill_candidates(self, text, ids, top_k, max_pieces, beam_size, turn)

    def __call__(self, text: str, top_k: int = 5, targets: list[str] | None = None, **words):
        """Fill one text; the result is what `pipeline("fill-mask")(text)` returns (see `fill` for `words`)."""
        return self.fill([text], top_k=top_k, targets=targets, **words)[0]
