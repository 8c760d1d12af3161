"""Whole-word and span masking on three tokenizer families (WordPiece, byte-level BPE, SentencePiece/Unigram),
against the rules they claim; and the token scheme against transformers' own collator, bit for bit."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from mlmtune.data.blocks import Blocks, build_blocks
from mlmtune.data.masking import IGNORE_INDEX, SPAN_MAX, SPAN_P, Masker, choose_spans, word_numbers
from mlmtune.training.feed import StepBatches

TEXTS = [
    "An e-mail, sent at 10:45 on 2024-03-01, said: re-run the well-known test (naïve Bayes, 3.14159).",
    "Tokyo is 東京 and Athens is Αθήνα; façade, coöperate and déjà vu keep their accents.",
    "The key-value store's write-ahead log holds 1,000,000 entries per second, give or take.",
]


def _sentencepiece_tokenizer(texts, folder):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts, vocab_size=400, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<mask>"],
                           unk_token="<unk>", show_progress=False)
    from tokenizers.processors import TemplateProcessing

    sp._tokenizer.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[
        ("<s>", sp.token_to_id("<s>")), ("</s>", sp.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def families(_tiny_loaded, tiny_bert_dir, docs_texts, tmp_path_factory):
    """name -> (tokenizer, (N, 32) blocks of the docs and the texts above, with their word starts)."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    texts = TEXTS * 40 + docs_texts[:400]
    sp = _sentencepiece_tokenizer(texts, tmp_path_factory.mktemp("unigram"))
    out = {}
    for name, tok in (("wordpiece", AutoTokenizer.from_pretrained(tiny_bert_dir)), ("byte-level BPE", _tiny_loaded[1]),
                      ("unigram", sp)):
        blocks, _ = build_blocks(DatasetDict(train=Dataset.from_dict({"text": texts})), tok, 32)
        out[name] = tok, Blocks(blocks["train"])
    return out


FAMILIES = ["wordpiece", "byte-level BPE", "unigram"]


def _many(blocks: Blocks, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(n) % len(blocks)
    return blocks[rows], blocks.word_starts(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_word_starts_are_the_tokenizers_own_words_and_each_block_begins_one(families, family):
    """The starts kept with the blocks are the fast tokenizer's word_ids(), text by text; cut into blocks, each
    block's first token begins a word (a word never spans two blocks), and a text's first token always does."""
    from datasets import Dataset

    from mlmtune.data.blocks import group_blocks, tokenize

    tok, _ = families[family]
    tokenized = tokenize(Dataset.from_dict({"text": TEXTS}), tok)
    expected = []
    for text, starts in zip(TEXTS, tokenized["word_starts"]):
        word_ids = tok(text).word_ids()
        assert starts == [int(w is None or j == 0 or w != word_ids[j - 1]) for j, w in enumerate(word_ids)]
        expected += starts
    assert sum(expected) < len(expected)  # some words are several pieces: the test means something
    blocks = Blocks(group_blocks(tokenized, 16)[0])
    got = blocks.word_starts(slice(None)).reshape(-1).tolist()
    for i, start in enumerate(expected[: len(got)]):
        assert got[i] == bool(start or i % 16 == 0), i


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["whole-word", "span"])
def test_whole_words_are_chosen_at_the_rate_asked_with_one_fate_each(families, family, scheme):
    tok, blocks = families[family]
    ids, starts = _many(blocks, 20_000)
    masker = Masker.from_tokenizer(tok, 0.15, scheme)
    inputs, labels = masker(ids, torch.Generator().manual_seed(3), starts)
    words = word_numbers(starts)
    special = torch.isin(ids, masker.special_ids)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any()
    assert (labels[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    # no word is ever partly chosen: per (row, word), the chosen pieces are all of its pieces or none
    key = torch.arange(len(ids))[:, None] * 32 + words
    pieces = torch.bincount(key[~special], minlength=len(ids) * 32)
    picked = torch.bincount(key[chosen], minlength=len(ids) * 32)
    assert ((picked == 0) | (picked == pieces)).all()
    share = int(chosen.sum()) / int((~special).sum())
    assert abs(share - 0.15) < 0.005, share
    # 80% of the chosen words are masked whole (a random piece may also draw the mask: 1 in the vocabulary)
    masked = torch.bincount(key[chosen & (inputs == masker.mask_token_id)], minlength=len(ids) * 32)
    words_chosen = int((picked > 0).sum())
    whole = int(((masked == pieces) & (picked > 0)).sum()) / words_chosen
    n = words_chosen / (1 if scheme == "whole-word" else 3.8)  # a span's words share one draw
    assert abs(whole - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n), whole
    # one fate per word or span: with fates of mask or keep only, every chosen word is all masked or all kept
    halves = Masker.from_tokenizer(tok, 0.15, scheme)
    halves = Masker(halves.mask_token_id, halves.vocab_size, halves.special_ids, 0.15, 0.5, 0.0, scheme)
    inputs, labels = halves(ids, torch.Generator().manual_seed(4), starts)
    chosen = labels != IGNORE_INDEX
    picked = torch.bincount(key[chosen], minlength=len(ids) * 32)
    masked = torch.bincount(key[chosen & (inputs == masker.mask_token_id)], minlength=len(ids) * 32)
    kept = torch.bincount(key[chosen & (inputs == ids)], minlength=len(ids) * 32)
    assert ((masked == picked) | (kept == picked)).all()
    assert int((masked == picked)[picked > 0].sum()) > 0 and int((kept == picked)[picked > 0].sum()) > 0


def test_span_lengths_follow_the_truncated_geometric_law():
    """SpanBERT: lengths in words from Geometric(0.2) truncated at 10, mean 3.8."""
    generator = torch.Generator().manual_seed(0)
    drawn = []
    for _ in range(300):
        _, lengths = choose_spans([1] * 2000, 300.0, torch.rand(6001, generator=generator).tolist())
        drawn += lengths
    law = [SPAN_P * (1 - SPAN_P) ** (k - 1) for k in range(1, SPAN_MAX + 1)]
    law = [p / sum(law) for p in law]
    mean = sum(k * p for k, p in zip(range(1, SPAN_MAX + 1), law))
    assert mean == pytest.approx(3.8, abs=0.01)
    assert sum(drawn) / len(drawn) == pytest.approx(mean, rel=0.05)
    counts = Counter(drawn)
    for k, p in zip(range(1, SPAN_MAX + 1), law):
        assert abs(counts[k] / len(drawn) - p) < 5 * math.sqrt(p * (1 - p) / len(drawn)), k
    assert max(drawn) == SPAN_MAX


def test_spans_are_runs_of_consecutive_whole_words_that_stop_at_special_tokens():
    sizes = [0, 1, 2, 1, 3, 1, 0, 2, 1, 1, 0]  # per word: pieces that can be chosen (0: a special token)
    generator = torch.Generator().manual_seed(5)
    for _ in range(200):
        picked, _ = choose_spans(sizes, 4.0, torch.rand(40, generator=generator).tolist())
        assert all(sizes[w] for w, _ in picked)
        by_fate = {}
        for w, fate in picked:
            by_fate.setdefault(fate, []).append(w)
        for words in by_fate.values():  # one span: consecutive words, within one text
            assert sorted(words) == list(range(min(words), max(words) + 1)) and 0 not in [sizes[w] for w in words]


@pytest.mark.parametrize("scheme", ["token", "whole-word", "span"])
def test_two_ranks_see_the_masks_of_one_process(families, scheme):
    tok, blocks = families["byte-level BPE"]
    masker = Masker.from_tokenizer(tok, 0.15, scheme)
    one = StepBatches(blocks, None, masker, seed=9, batch_size=8, accumulation=2)
    two = [StepBatches(blocks, None, masker, seed=9, batch_size=4, accumulation=2, rank=r, world=2) for r in (0, 1)]
    for step in (0, 3):
        whole, _, n_masked, _ = one(step)
        halves = [part(step) for part in two]
        assert sum(h[2] for h in halves) == n_masked  # the ranks' counts add up to the global one
        for m, (inputs, labels, *_) in enumerate(whole):
            assert torch.equal(torch.cat([h[0][m][0] for h in halves]), inputs)
            assert torch.equal(torch.cat([h[0][m][1] for h in halves]), labels)


def test_token_masking_is_transformers_collator_bit_for_bit(tiny):
    """--masking token is the guide's DataCollatorForLanguageModeling: the same generator gives the same masks."""
    from transformers import DataCollatorForLanguageModeling

    _, tok = tiny
    ids = torch.randint(5, len(tok), (64, 48), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = tok.bos_token_id, tok.eos_token_id
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    collator.generator = torch.Generator().manual_seed(11)
    theirs = collator.torch_mask_tokens(ids.clone())
    starts = torch.ones_like(ids, dtype=torch.bool)  # word starts change nothing in the token scheme
    ours = Masker.from_tokenizer(tok)(ids, torch.Generator().manual_seed(11), starts)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_word_schemes_refuse_blocks_without_words(tiny):
    from mlmtune.errors import MlmtuneError

    _, tok = tiny
    with pytest.raises(MlmtuneError, match="--masking span needs word boundaries"):
        Masker.from_tokenizer(tok, 0.15, "span")(torch.randint(5, 600, (2, 16)), torch.Generator())
