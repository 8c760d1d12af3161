"""text -> tokens -> blocks, checked against the guide's own formulas and hand-built expectations."""

from __future__ import annotations

import json
import time
from itertools import chain

import pytest
import torch

from mlmtune import hub
from mlmtune.config import DataConfig
from mlmtune.data import blocks as blocks_mod
from mlmtune.data.blocks import blocks_tensor, group_blocks, tokenize
from mlmtune.data.prepare import prepare_blocks
from mlmtune.data.text import load_texts, select_text
from mlmtune.errors import MlmtuneError


def guide_group_texts(examples, block_size):
    """The guide's group_texts, verbatim apart from the block size argument."""
    concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    if total_length >= block_size:
        total_length = (total_length // block_size) * block_size
    result = {
        k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    return result


def test_grouping_matches_guide_formula_on_whole_split(tiny, docs_texts):
    _, tok = tiny
    texts = docs_texts[:1500]
    assert len(texts) > 1000
    from datasets import Dataset

    tokenized = tokenize(Dataset.from_dict({"text": texts}), tok)
    blocks, dropped = group_blocks(tokenized, 32)

    ids = [tok(t)["input_ids"] for t in texts]  # the guide's tokenization, one text at a time
    expected = guide_group_texts({"input_ids": ids}, 32)["input_ids"]
    got = blocks_tensor(blocks).tolist()
    assert got == expected
    total = sum(len(x) for x in ids)
    assert dropped == total - 32 * len(expected)
    assert 0 <= dropped < 32


def test_grouping_drops_less_than_one_block_per_split_not_per_batch(tiny, docs_texts):
    """The guide's batched map drops up to block_size-1 tokens per 1000 texts; we drop < block_size overall."""
    _, tok = tiny
    from datasets import Dataset

    texts = docs_texts[:2500]
    tokenized = tokenize(Dataset.from_dict({"text": texts}), tok)
    _, dropped = group_blocks(tokenized, 48)
    per_batch_dropped = 0
    for start in range(0, len(texts), 1000):
        ids = [tok(t)["input_ids"] for t in texts[start : start + 1000]]
        n = sum(len(x) for x in ids)
        per_batch_dropped += n - 48 * (n // 48)
    assert dropped < 48
    assert dropped <= per_batch_dropped


def test_nested_text_field_is_joined_like_the_guide(eli5_like):
    from datasets import load_dataset

    records = load_dataset("json", data_files=str(eli5_like), split="train")
    texts = select_text(records, "answers.text")
    raw = [json.loads(line) for line in eli5_like.read_text().splitlines()]
    expected = [" ".join(r["answers"]["text"]) for r in raw if " ".join(r["answers"]["text"]).strip()]
    assert texts["text"] == expected


def test_missing_text_field_lists_the_fields(eli5_like):
    from datasets import load_dataset

    records = load_dataset("json", data_files=str(eli5_like), split="train")
    with pytest.raises(MlmtuneError, match=r"'answer\.text' is not in the dataset; its fields are: .*answers\.text"):
        select_text(records, "answer.text")


def test_non_text_field_is_an_error(eli5_like):
    from datasets import load_dataset

    records = load_dataset("json", data_files=str(eli5_like), split="train")
    with pytest.raises(MlmtuneError, match="answers.score holds list values, not text"):
        select_text(records, "answers.score")


def test_txt_file_one_text_per_non_empty_line_and_split_slicing(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("first line\n\n   \nsecond line\nthird line\n")
    texts = load_texts(DataConfig(dataset=str(f), test_size=0), seed=0)
    assert texts["train"]["text"] == ["first line", "second line", "third line"]
    sliced = load_texts(DataConfig(dataset=str(f), test_size=0, split="train[:2]"), seed=0)
    assert sliced["train"]["text"] == ["first line", "second line"]


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_local_formats_and_folders(tmp_path, kind):
    import pandas as pd

    frame = pd.DataFrame({"body": [f"text number {i}" for i in range(10)], "n": range(10)})
    folder = tmp_path / "corpus"
    folder.mkdir()
    for part in range(2):
        chunk = frame.iloc[part * 5 : (part + 1) * 5]
        path = folder / f"part{part}.{kind}"
        if kind == "csv":
            chunk.to_csv(path, index=False)
        elif kind == "parquet":
            chunk.to_parquet(path)
        else:
            chunk.to_json(path, orient="records", lines=True)
    texts = load_texts(DataConfig(dataset=str(folder), text_field="body", test_size=0), seed=0)
    assert texts["train"]["text"] == list(frame["body"])
    sliced = load_texts(DataConfig(dataset=str(folder), text_field="body", test_size=0, split="train[:3]"), 0)
    assert len(sliced["train"]) == 3


def test_split_is_the_guides_train_test_split(tmp_path):
    f = tmp_path / "c.txt"
    lines = [f"line {i}" for i in range(100)]
    f.write_text("\n".join(lines))
    texts = load_texts(DataConfig(dataset=str(f), test_size=0.2), seed=7)
    from datasets import Dataset

    ref = Dataset.from_dict({"text": lines}).train_test_split(test_size=0.2, seed=7)
    assert texts["train"]["text"] == ref["train"]["text"]
    assert texts["test"]["text"] == ref["test"]["text"]


def test_test_size_zero_keeps_corpus_order(tiny, tmp_path, docs_texts, cache_dir):
    _, tok = tiny
    f = tmp_path / "c.txt"
    f.write_text("\n".join(docs_texts[:200]))
    blocks, stats = prepare_blocks(DataConfig(dataset=str(f), test_size=0, block_size=32, cache_dir=cache_dir), tok, 0)
    assert list(blocks) == ["train"]
    flat = list(chain.from_iterable(tok(t)["input_ids"] for t in docs_texts[:200]))
    assert list(chain.from_iterable(blocks_tensor(blocks["train"]).tolist())) == flat[: len(flat) // 32 * 32]
    assert stats.total_dropped == len(flat) % 32


def test_second_run_uses_the_cache_and_skips_tokenization(tiny, monkeypatch, cache_dir):
    _, tok = tiny
    cfg = DataConfig(dataset="builtin:python-docs", block_size=32, cache_dir=cache_dir)
    first, stats1 = prepare_blocks(cfg, tok, 0)

    def fail(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(blocks_mod, "tokenize", fail)
    second, stats2 = prepare_blocks(cfg, tok, 0)
    assert blocks_tensor(second["train"]).equal(blocks_tensor(first["train"]))
    assert stats2 == stats1
    # another seed is another split, so another cache entry
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_blocks(cfg, tok, 1)


def test_builtin_corpus_reads_cpython_docs():
    texts = load_texts(DataConfig(dataset="builtin:python-docs", test_size=0), 0)["train"]["text"]
    from pydoc_data.topics import topics

    assert len(texts) > 1000
    assert len(set(texts)) == len(texts)  # repeated paragraphs kept once: no eval text is a training text
    assert any("break" in t and "loop" in t for t in texts)
    assert sum(map(len, texts)) > 0.7 * sum(len(v) for v in topics.values())


def test_eli5_fails_at_once_with_what_to_do():
    t0 = time.perf_counter()
    with pytest.raises(MlmtuneError, match=r"taken down.*datasets#6605.*--dataset FILE\.jsonl --text-field answers"):
        load_texts(DataConfig(dataset="eli5", split="train_asks[:5000]"), 0)
    assert time.perf_counter() - t0 < 2


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", hc.HF_HUB_OFFLINE)
    hub.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MlmtuneError, match=r"cannot be reached.*local path.*mlmtune quickstart") as e:
            load_texts(DataConfig(dataset="someone/some-corpus-that-is-not-cached"), 0)
    finally:
        hub.hub_reachable.cache_clear()
    assert time.perf_counter() - t0 < 10
    assert "\n" not in str(e.value)


def test_missing_local_path_is_not_sent_to_the_hub():
    with pytest.raises(MlmtuneError, match="does not exist"):
        load_texts(DataConfig(dataset="./no/such/corpus.jsonl"), 0)


def test_streamed_grouping_and_block_reads_match_the_in_memory_result(tiny, docs_texts, tmp_path):
    """Grouping streamed to an Arrow file, chunk by chunk, equals grouping in memory; Blocks reads rows back."""
    _, tok = tiny
    from datasets import Dataset

    from mlmtune.data.blocks import Blocks

    tokenized = tokenize(Dataset.from_dict({"text": docs_texts[:2500]}), tok)
    assert tokenized.data.column("input_ids").num_chunks > 1  # the carry between chunks is exercised
    in_memory, dropped = group_blocks(tokenized, 40)
    on_disk, dropped_disk = group_blocks(tokenized, 40, tmp_path / "blocks.arrow")
    assert dropped == dropped_disk
    expected = blocks_tensor(in_memory)
    assert blocks_tensor(on_disk).equal(expected)
    rows = torch.tensor([5, 0, len(expected) - 1, 5, 77])
    assert Blocks(on_disk)[rows].equal(expected[rows])
