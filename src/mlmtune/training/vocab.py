"""The domain's own words in the tokenizer (`--add-tokens N|FILE`): mined from the training split or read from a
file, added as single tokens, their embeddings started from their pieces' (`grow_vocabulary`, a run's growth;
`grow_tokenizer`, the step that `mlmtune prepare --add-tokens` shares with it).

A general tokenizer cuts a domain's words into many pieces ("photosynthesis", "kubectl", "__init__"), which
costs context and makes them hard to predict. `mine_words` counts the words of the training texts as the
tokenizer itself splits them (its word ids) and keeps those that save the most tokens: count x (pieces - 1),
for words of at least `MIN_PIECES` pieces seen at least `MIN_COUNT` times, never special tokens, words with
a letter, numbers only if asked. `add_words` adds them the way the tokenizer spells a word inside running
text: with the leading space of byte-level BPE (" word", so "the word" and "a word," tokenize to the new
token and decode unchanged), as a whole word for WordPiece. SentencePiece tokenizers are refused: their
pre-tokenizer would put a word marker after every added token. `init_rows` starts each new embedding row
(and an untied output row, and the head's bias) from the mean of the word's old pieces; a tied projection
follows its embedding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken

from mlmtune.config import TrainConfig
from mlmtune.data.prepare import is_prepared, prepared_words
from mlmtune.data.stream import held_out_texts
from mlmtune.data.text import load_texts
from mlmtune.errors import MlmtuneError, say
from mlmtune.evaluation.forgetting import free_sample, tokenizer_free

MIN_PIECES, MIN_COUNT = 3, 5
TOKENS_PER_WORD_TEXTS = 20_000  # tokens per word is counted on at most this many training texts


@dataclass(frozen=True)
class Grown:
    """What `--add-tokens` did to a run's vocabulary."""

    words: list[str]
    tokens_per_word_before: float | None  # on the training split (None: no texts, e.g. a prepared folder)
    tokens_per_word_after: float | None
    free_texts: list[str]  # the held-out texts of the tokenizer-free figures
    free_before: dict | None  # those figures for the model as loaded, with its own tokenizer (`forgetting.py`)


def choose_words(value: str, numbers: bool, train_texts: list[str] | None, tokenizer) -> list[str]:
    """The words of `--add-tokens N|FILE`: the N that save the most tokens in `train_texts`, or a FILE's."""
    if not getattr(tokenizer, "is_fast", False):  # its normalizer and word spans are the fast tokenizer's
        raise MlmtuneError(f"--add-tokens {value} needs a fast tokenizer (a tokenizer.json: its normalizer and words "
                           f"say how a new word is spelled), and this one is slow ({type(tokenizer).__name__}): use a "
                           f"model folder with a tokenizer.json, or leave --add-tokens out")
    if not value.strip().isdigit():
        return read_words(value, tokenizer)
    if train_texts is None:
        raise MlmtuneError("--add-tokens N mines the training texts, and there are none here (a prepared folder or a "
                           "stream): give a FILE of words, or prepare with --add-tokens")
    mined = mine_words(train_texts, tokenizer, int(value), numbers)
    if not mined:
        raise MlmtuneError(f"--add-tokens {value}: no word of the training split is {MIN_PIECES} pieces or more and "
                           f"seen {MIN_COUNT} times or more; give a FILE of words instead")
    if len(mined) < int(value):
        say(f"note: --add-tokens {value}: only {len(mined)} words are {MIN_PIECES} pieces or more and seen "
            f"{MIN_COUNT} times or more; adding those")
    return [w for w, _, _ in mined]


def spelling(tokenizer) -> str:
    """How the tokenizer marks the start of a word inside text: "space" (byte-level BPE: Ġ), "metaspace"
    (SentencePiece: ▁) or "wordpiece" (no marker: continuations carry ##)."""
    piece = tokenizer.convert_ids_to_tokens(tokenizer(" x", add_special_tokens=False)["input_ids"])[0]
    if piece.startswith("Ġ"):
        return "space"
    if piece.startswith("▁"):
        return "metaspace"
    return "wordpiece"


def _in_context(tokenizer, word: str) -> list[int]:
    """The pieces of `word` inside running text (after a space)."""
    lead = "x " + word
    ids = tokenizer(lead, add_special_tokens=False)["input_ids"]
    head = tokenizer("x", add_special_tokens=False)["input_ids"]
    return ids[len(head):] if ids[: len(head)] == head else ids


def mine_words(texts, tokenizer, n: int, numbers: bool = False) -> list[tuple[str, int, int]]:
    """The `n` words of `texts` that save the most tokens as single tokens: (word, count, pieces), best first."""
    counts: Counter[str] = Counter()
    normal = tokenizer.backend_tokenizer.normalizer
    batch: list[str] = []

    def flush() -> None:
        enc = tokenizer(batch, add_special_tokens=False, verbose=False)
        for i, text in enumerate(batch):
            for w in {x for x in enc.word_ids(i) if x is not None}:
                span = enc.word_to_chars(i, w)
                word = text[span.start : span.end]
                counts[normal.normalize_str(word) if normal is not None else word] += 1
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == 1000:
            flush()
    if batch:
        flush()
    special = set(tokenizer.all_special_tokens)
    kept = []
    for word, count in counts.items():
        if count < MIN_COUNT or word in special or not any(ch.isalpha() for ch in word):
            continue
        if not numbers and any(ch.isdigit() for ch in word):
            continue
        pieces = len(_in_context(tokenizer, word))
        if pieces >= MIN_PIECES:
            kept.append((word, count, pieces))
    kept.sort(key=lambda x: (-x[1] * (x[2] - 1), x[0]))
    return kept[:n]


def read_words(path: str, tokenizer) -> list[str]:
    """The words of a FILE, one a line: blank lines, repeats and words that are one token already are skipped
    (and said)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MlmtuneError(f"--add-tokens {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    words, skipped = [], []
    normal = tokenizer.backend_tokenizer.normalizer  # an uncased tokenizer matches "Kubectl" as "kubectl"
    for line in lines:
        word = line.strip()
        if not word:
            continue
        word = normal.normalize_str(word) if normal is not None else word
        if word in words or len(_in_context(tokenizer, word)) < 2:
            skipped.append(word)
            continue
        words.append(word)
    if skipped:
        say(f"warning: --add-tokens {path}: skipped {len(skipped)} repeated word(s) or word(s) that are one token "
            f"already ({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})")
    if not words:
        raise MlmtuneError(f"--add-tokens {path} holds no word to add (one word a line, not one token already)")
    return words


def add_words(tokenizer, words: list[str]) -> dict[str, list[int]]:
    """Add `words` to `tokenizer` as single tokens, spelled as the tokenizer spells its own words; returns each new
    token's old pieces, by the token's content.

    Byte-level BPE gets two tokens a word, as it has two forms of its own words: " word" for the word inside
    text (after a space: it decodes back with its space) and "word" where a text begins or after punctuation
    (matched as a whole word only; left out when the vocabulary has it already). WordPiece gets the whole word,
    matched after the tokenizer's normalizer, so every position and casing the tokenizer folds together hits it.
    """
    kind = spelling(tokenizer)
    if kind == "metaspace":
        raise MlmtuneError("--add-tokens supports WordPiece and byte-level BPE tokenizers; this one is SentencePiece "
                           "(its pre-tokenizer would mark a new word after every added token)")
    vocab = tokenizer.get_vocab()
    old, tokens = {}, []
    for w in words:
        if len(_in_context(tokenizer, w)) < 2:  # one token already
            continue
        if kind == "space":  # inside text a word is " word"
            old[" " + w] = _in_context(tokenizer, w)
            tokens.append(AddedToken(" " + w, single_word=False, lstrip=False, rstrip=False, normalized=False))
            alone = tokenizer(w, add_special_tokens=False)["input_ids"]
            if w not in vocab and len(alone) > 1:
                old[w] = alone
                tokens.append(AddedToken(w, single_word=True, lstrip=False, rstrip=False, normalized=False))
        else:
            old[w] = _in_context(tokenizer, w)
            tokens.append(AddedToken(w, single_word=True, normalized=True))
    tokenizer.add_tokens(tokens)
    return old


@torch.no_grad()
def init_rows(model, tokenizer, old: dict[str, list[int]]) -> None:
    """Grow the embeddings to the tokenizer and start each new token's row from the mean of its old pieces' rows:
    the input embedding, an untied output projection, and the head's bias (a tied projection is the embedding)."""
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    bias = _head_bias(model)
    for content, pieces in old.items():
        new, rows = tokenizer.convert_tokens_to_ids(content), torch.tensor(pieces)
        emb[new] = emb[rows].mean(0)
        if out is not None and not tied:
            out.weight[new] = out.weight[rows].mean(0)
        if bias is not None:
            bias[new] = bias[rows].mean(0)


def _head_bias(model) -> torch.Tensor | None:
    """The masked-LM head's output bias (one per vocabulary row), wherever the family keeps it."""
    out = model.get_output_embeddings()
    if out is not None and getattr(out, "bias", None) is not None:
        return out.bias
    rows = model.get_input_embeddings().weight.shape[0]
    for name, p in model.named_parameters():
        if name.endswith("bias") and p.ndim == 1 and p.shape[0] == rows and "embed" not in name:
            return p
    return None


def tokens_per_word(texts: list[str], tokenizer) -> float | None:
    """Tokens per whitespace-separated word over `texts` (special tokens left out): the vocabulary's cost."""
    words = tokens = 0
    for start in range(0, len(texts), 1000):
        chunk = texts[start : start + 1000]
        words += sum(len(t.split()) for t in chunk)
        tokens += sum(len(ids) for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    return tokens / words if words else None


def grow_tokenizer(tokenizer, words: list[str], counted: list[str]) -> tuple[dict[str, list[int]], str, tuple]:
    """Add `words` to `tokenizer`. Returns each new token's old pieces (`add_words`), the line that says what was
    added, and the tokens per word of `counted` (the training texts, or none) before and after."""
    before = tokens_per_word(counted, tokenizer)
    old = add_words(tokenizer, words)
    after = tokens_per_word(counted, tokenizer)
    shown = ", ".join(words[:8]) + (", ..." if len(words) > 8 else "")
    per_word = f"; tokens per word {before:.3f} -> {after:.3f}" if before is not None else ""
    return old, f"Added {len(words)} words to the tokenizer ({shown}){per_word}", (before, after)


def grow_vocabulary(cfg: TrainConfig, model, tokenizer, device, main: bool) -> Grown:
    """A run's --add-tokens: choose the words (mined from the training split, read from a FILE, or those a prepared
    folder was made with), score the tokenizer-free figures of the model as loaded (rank 0), add the words and
    start their rows from their pieces'."""
    data, train_texts, held = cfg.data, None, []
    if data.dataset and is_prepared(data.dataset):
        words = prepared_words(data.dataset)
        if words is None:
            raise MlmtuneError(f"{data.dataset} was prepared without --add-tokens: prepare it again with "
                               f"--add-tokens {cfg.add_tokens}, or train without --add-tokens")
        say(f"--add-tokens: the {len(words)} words {data.dataset} was prepared with")
    else:
        if data.streaming:
            held = held_out_texts(data) if data.eval_records else []
        else:
            split = load_texts(data, cfg.seed)
            train_texts = list(split["train"]["text"])
            held = list(split["test"]["text"]) if "test" in split else []
        words = choose_words(cfg.add_tokens, cfg.add_numbers, train_texts, tokenizer)
    counted = (train_texts or held)[:TOKENS_PER_WORD_TEXTS]
    free_texts = free_sample(held)
    free_before = tokenizer_free(model, tokenizer, free_texts, device) if main and free_texts else None
    old, line, (before, after) = grow_tokenizer(tokenizer, words, counted)
    init_rows(model, tokenizer, old)
    if main:
        say(line)
    return Grown(words, before, after, free_texts, free_before)
