"""The domain cloze: does the model know its domain's words? Top-1 and top-3 accuracy on held-out text.

Perplexity averages over every token, "the" and "of" included; it cannot say whether a model now fills
"The [MASK] statement exits a loop" with `break`. The cloze asks that directly:

- **Words** (`--cloze-words`): `python` is Python's keywords and built-in names (`keyword.kwlist`,
  `dir(builtins)`), less English function words; a FILE holds one word a line; `auto` is `python` on
  builtin:python-docs and otherwise the training split's most frequent content words.
- **Cases**: every whole-word occurrence of those words in the eval split's texts, in an order drawn from a
  seed, at most `PER_WORD` per word, `CASES` in all. A case is the word's text (up to `CONTEXT_WORDS` words
  either side) with the word masked whole: all of its pieces at once. A case whose text occurs in the
  training split (a paragraph the corpus repeats, a sentence two paragraphs share) is left out.
  The same texts, words, tokenizer and seed give the same cases, so figures compare across runs.
- **Scoring**: one forward pass per case; a case counts at k when every piece of the word is among the k
  most likely tokens at its position (for a one-piece word, what `pipeline("fill-mask", top_k=k)` lists).
"""

from __future__ import annotations

import builtins
import collections
import keyword
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mlmtune.config import DataConfig
from mlmtune.data.prepare import is_prepared
from mlmtune.data.stream import held_out_texts
from mlmtune.data.text import load_texts
from mlmtune.errors import MlmtuneError, say
from mlmtune.model.forward import MaskedLMLoss, pad_rows

CASES, PER_WORD, CONTEXT_WORDS, FREQUENT = 256, 8, 32, 100
CLOZE_SEED = 0
KS = (1, 3)
# English function words: not what a domain teaches, and the words a general model already fills.
STOPWORDS = frozenset("""
a about above after again against all also an and any are as at be because been before being below between
both but by can could did do does doing down during each either else every few for from further had has have
having he her here hers him his how however i if in into is it its itself just may me might more most much must
my neither no nor not now of off on once one only or other our ours out over own same she should so some such
than that the their theirs them then there these they this those though through to too under until up upon us
very was we were what when where whether which while who whom whose why will with within without would yet you
your
""".split())
WORD = re.compile(r"\S+")


def python_words() -> list[str]:
    """Python's keywords and built-in names that are not English function words (`try`, `None` and `list` stay;
    `else` and `while` go)."""
    names = set(keyword.kwlist) | {n for n in dir(builtins) if n.isidentifier() and not n.startswith("_")}
    return sorted(n for n in names if n.lower() not in STOPWORDS)


def frequent_words(texts: list[str], n: int = FREQUENT) -> list[str]:
    """The `n` most frequent content words of `texts`: alphabetic, at least 4 letters, not function words."""
    counts = collections.Counter(w for t in texts for w in re.findall(r"\b[^\W\d_]{4,}\b", t)
                                 if w.lower() not in STOPWORDS)
    return [w for w, _ in counts.most_common(n)]


def read_cloze_words(path: str) -> list[str]:
    """A FILE of words, one a line (blank lines and repeats skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MlmtuneError(f"--cloze-words {path}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                           f"give a file of words, one a line, or auto, python or none") from None
    words = list(dict.fromkeys(w.strip() for w in lines if w.strip()))
    spaced = [w for w in words if len(w.split()) > 1]
    if spaced:
        raise MlmtuneError(f"--cloze-words {path}: one word a line, without spaces ({spaced[0]!r})")
    if not words:
        raise MlmtuneError(f"--cloze-words {path} holds no word (one word a line)")
    return words


def cloze_words(spec: str, dataset: str | None, train_texts: list[str] | None) -> tuple[str, list[str]] | None:
    """The words of `--cloze-words` and a name for them; None for `none` (or `auto` with no training texts)."""
    if spec == "none":
        return None
    if spec == "python" or (spec == "auto" and dataset == "builtin:python-docs"):
        return "Python keywords and built-ins", python_words()
    if spec == "auto":
        if not train_texts:
            return None
        return "the training split's most frequent content words", frequent_words(train_texts)
    return spec, read_cloze_words(spec)


@dataclass(frozen=True)
class ClozeCase:
    """One held-out occurrence of a word: `text` with the word at text[start:end]; its pieces, masked, at
    `positions` of `input_ids` (the text tokenized), where `targets` are the word's own pieces."""

    word: str
    text: str
    start: int
    end: int
    input_ids: list[int]
    positions: list[int]
    targets: list[int]

    def masked(self, mask_token: str) -> str:
        """The text with the word replaced by one mask per piece."""
        return self.text[: self.start] + mask_token * len(self.positions) + self.text[self.end :]


def _context(text: str, start: int, end: int, words: int) -> tuple[str, int, int]:
    """At most `words` words either side of text[start:end]; the word's span in the window."""
    spans = [m.span() for m in WORD.finditer(text)]
    at = next(i for i, (s, e) in enumerate(spans) if e > start)
    lo, hi = spans[max(at - words, 0)][0], spans[min(at + words, len(spans) - 1)][1]
    return text[lo:hi], start - lo, end - lo


def _case(tokenizer, text: str, start: int, end: int, max_length: int,
          words: int = CONTEXT_WORDS) -> ClozeCase | None:
    """The case, or None where the tokenizer does not write the word as pieces of its own (a piece that runs on
    into the next word) or the text is too long for the model."""
    text, start, end = _context(text, start, end, words)
    enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) > max_length:
        return None
    special = set(tokenizer.all_special_ids)
    inside = [i for i, (s, e) in enumerate(offsets) if ids[i] not in special and s < end and e > start]
    # a piece may carry the space before the word (byte-level BPE, SentencePiece), never text of another word
    if not inside or offsets[inside[0]][0] < start - 1 or offsets[inside[-1]][1] != end or \
            inside != list(range(inside[0], inside[-1] + 1)):
        return None
    return ClozeCase(text[start:end], text, start, end, ids, inside, [ids[i] for i in inside])


def cloze_cases(texts: list[str], words: list[str], tokenizer, max_length: int, seed: int = CLOZE_SEED,
                trained: str = "", n: int = CASES) -> list[ClozeCase]:
    """The held-out cases: occurrences of `words` in `texts`, in an order drawn from `seed`, at most PER_WORD a
    word, `n` in all; a case whose text occurs in `trained` (the training texts, joined) is left out."""
    if not getattr(tokenizer, "is_fast", False):
        raise MlmtuneError("the cloze needs the character offsets of a fast tokenizer; use --cloze-words none")
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # the longest first
    pattern = re.compile(rf"(?<!\w)({alternatives})(?!\w)")
    found = [(t, m.start(), m.end()) for t, text in enumerate(texts) for m in pattern.finditer(text)]
    random.Random(seed).shuffle(found)
    cases, per_word = [], collections.Counter()
    for t, start, end in found:
        word = texts[t][start:end]
        if per_word[word] >= PER_WORD:
            continue
        case = _case(tokenizer, texts[t], start, end, max_length)
        if case is not None and case.text not in trained:
            cases.append(case)
            per_word[word] += 1
            if len(cases) == n:
                break
    return cases


def examples(cases: list[ClozeCase], n: int = 3, words: int = 25) -> list[ClozeCase]:
    """The first `n` cases (in their seeded order) of a one-piece word in a text of at most `words` words: short
    enough to print whole, and picked before any model has filled them."""
    return [c for c in cases if len(c.positions) == 1 and len(c.text.split()) <= words][:n]


MINED_TEXTS = 20_000  # the texts `auto` mines for frequent words
TRAINED_CHARS = 50_000_000  # the training text a case is checked against: its first 50 MB


def _trained_text(train) -> str:
    """The training split's texts joined (up to TRAINED_CHARS): a case whose text occurs in it is no test of what
    was learned (a paragraph the corpus repeats, a sentence two paragraphs share)."""
    if train is None:
        return ""
    parts, size = [], 0
    for batch in train.iter(batch_size=10_000):
        for t in batch["text"]:
            parts.append(t)
            size += len(t) + 1
            if size >= TRAINED_CHARS:
                return "\n".join(parts)
    return "\n".join(parts)


def held_out_cases(spec: str, data: DataConfig, seed: int, tokenizer, max_length: int, quiet: bool = False,
                   held: list[str] | None = None) -> tuple[str, list[ClozeCase]] | None:
    """`--cloze-words` on a run's data: the cases of the eval split that `seed` draws (`load_texts`), none of them
    in a text the training split holds too; None when off, or when the data has no texts to draw from (said).

    Args:
        held: with --streaming, the held-out records' texts, when the caller has read them already.
    """
    if spec == "none":
        return None
    if not getattr(tokenizer, "is_fast", False):  # a slow tokenizer gives no character offsets
        if spec != "auto":
            raise MlmtuneError(f"--cloze-words {spec} needs the character offsets of a fast tokenizer, and this one "
                               f"is slow ({type(tokenizer).__name__}): use --cloze-words none, or a model folder with "
                               f"a tokenizer.json")
        if not quiet:
            say(f"note: no cloze: it needs the character offsets of a fast tokenizer, and this one is slow "
                f"({type(tokenizer).__name__}); training goes on without it")
        return None
    if data.dataset and is_prepared(data.dataset):
        if not quiet:
            say(f"note: no cloze: {data.dataset} holds blocks, not texts (--cloze-words none hides this note)")
        return None
    if data.streaming:
        held, train = (held if held is not None else held_out_texts(data) if data.eval_records else []), None
    else:
        split = load_texts(data, seed)
        if "test" in split:
            held, train = list(split["test"]["text"]), split["train"]
        else:  # `mlmtune eval` of a whole dataset: every text is held out from this model's point of view
            held, train = list(split["train"]["text"]), None
    mined = held if train is None else train.select(range(min(MINED_TEXTS, len(train))))["text"]
    chosen = cloze_words(spec, data.dataset, mined)
    if chosen is None or not held:
        return None
    name, words = chosen
    cases = cloze_cases(held, words, tokenizer, max_length, seed, _trained_text(train))
    if not cases and not quiet:
        say(f"note: no cloze: no word of {name} occurs in the eval split")
    return (name, cases) if cases else None


@torch.no_grad()  # not inference_mode: an FSDP root keeps the weights it gathers, which must stay ordinary tensors
def cloze_ranks(model, tokenizer, cases: list[ClozeCase], device=None, k: int = max(KS),
                batch_size: int = 32) -> list[list[list[int]]]:
    """The `k` most likely tokens at each masked piece of each case: [case][piece] -> k token ids."""
    device = device or next(model.parameters()).device
    step = model if isinstance(model, MaskedLMLoss) else MaskedLMLoss(model)  # a sharded model runs through its root
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for lo in range(0, len(cases), batch_size):
        batch = cases[lo : lo + batch_size]
        ids, attention = pad_rows([c.input_ids for c in batch], pad)
        width, flat = ids.shape[1], []
        for i, c in enumerate(batch):
            ids[i, c.positions] = tokenizer.mask_token_id
            flat += [i * width + p for p in c.positions]
        top = step(ids.to(device), torch.tensor(flat, device=device), None, attention_mask=attention.to(device),
                   top_k=k).cpu().tolist()  # (P, k): one host copy per batch
        for c in batch:
            out.append(top[: len(c.positions)])
            top = top[len(c.positions) :]
    return out


def cloze_accuracy(model, tokenizer, cases: list[ClozeCase], device=None, batch_size: int = 32) -> dict:
    """Top-1 and top-3 accuracy of whole words over `cases` (a word counts only if every piece does). The model's
    mode is restored."""
    was_training = model.training
    model.eval()
    try:
        ranks = cloze_ranks(model, tokenizer, cases, device, batch_size=batch_size)
    finally:
        if hasattr(model, "reshard"):  # FSDP's root: free the gathered weights, put the shards back
            model.reshard()
        model.train(was_training)
    out = {"cloze_cases": len(cases), "cloze_words": len({c.word for c in cases})}
    for k in KS:
        right = sum(all(t in top[:k] for t, top in zip(c.targets, tops)) for c, tops in zip(cases, ranks))
        out[f"cloze_top{k}"] = right / len(cases) if cases else None
    return out
