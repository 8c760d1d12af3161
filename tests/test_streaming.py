"""--streaming: blocks made on the fly equal the in-memory grouping, training runs and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from compare import assert_same_weights
from safetensors.torch import load_file

from mlmtune.config import DataConfig, TrainConfig
from mlmtune.data.blocks import Blocks, blocks_tensor, group_blocks, tokenize
from mlmtune.data.stream import stream_blocks, stream_records, stream_texts
from mlmtune.errors import MlmtuneError
from mlmtune.options import resolve
from mlmtune.training.train import train


def test_stream_blocks_equal_the_whole_split_grouping(tiny, docs_texts):
    _, tok = tiny
    from datasets import Dataset

    texts = docs_texts[:1500]
    expected = blocks_tensor(group_blocks(tokenize(Dataset.from_dict({"text": texts}), tok), 32)[0])
    streamed = list(stream_blocks(iter(texts), tok, 32, batch=100))
    assert torch.stack([ids for ids, _ in streamed]).equal(expected)
    # the word starts are grouped's too
    grouped = Blocks(group_blocks(tokenize(Dataset.from_dict({"text": texts}), tok), 32)[0])
    assert torch.stack([s for _, s in streamed]).equal(grouped.word_starts(slice(None)))


def test_stream_reads_nested_fields_and_names_missing_ones(eli5_like):
    records = stream_records(DataConfig(dataset=str(eli5_like), streaming=True))
    raw = [json.loads(line) for line in eli5_like.read_text().splitlines()]
    assert list(stream_texts(records, "answers.text", take=5)) == [" ".join(r["answers"]["text"]) for r in raw[:5]]
    with pytest.raises(MlmtuneError, match="'answer.text' is not in the records; their fields are: q_id, title"):
        list(stream_texts(records, "answer.text", take=1))


STREAM = {"streaming": True, "eval_records": 60, "text_field": "text"}


@pytest.fixture()
def corpus(tmp_path, docs_texts):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(docs_texts[:400]))
    return path


@pytest.mark.numerics
def test_streaming_trains_and_resumes_to_the_same_weights(configs, tmp_path, corpus):
    full = train(configs(tmp_path / "full", dataset=str(corpus), **STREAM), progress=False)
    m = full.metrics
    assert m["streaming"] and m["train_blocks"] is None and m["train_steps"] == 8
    assert m["eval_masked_tokens"] > 0 and m["eval_loss_after"] < m["eval_loss_before"] - 0.05
    assert [e["step"] for e in m["epochs"]] == [2, 4, 6, 8]  # evaluated at each checkpoint

    def ctrl_c_at_step_5(step, _seconds):
        if step == 5:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(MlmtuneError, match="interrupted at step 5"):
        train(configs(part, dataset=str(corpus), **STREAM), progress=False, on_step=ctrl_c_at_step_5)
    resumed = train(configs(part, dataset=str(corpus), resume=True, **STREAM), progress=False)
    assert_same_weights(part, load_file(str(tmp_path / "full" / "model.safetensors")))
    assert resumed.metrics["eval_loss_after"] == pytest.approx(m["eval_loss_after"], rel=1e-6)


def test_streaming_needs_max_steps(tiny_model_dir, tmp_path, corpus):
    with pytest.raises(MlmtuneError, match="--streaming needs --max-steps"):
        resolve(TrainConfig, {}, {"model": str(tiny_model_dir), "dataset": str(corpus), "streaming": True})


@pytest.mark.parametrize("files", [1, 2])  # one file: every other record; two: a file each (datasets' two ways)
def test_each_rank_tokenizes_only_its_own_share_of_the_stream(tiny, docs_texts, tmp_path, files):
    """Two ranks' streams: the texts each rank's tokenizer saw are disjoint, and together they are the corpus after
    the held-out records, each once (no rank tokenizes the other's records, as every rank did before)."""
    from mlmtune.data.stream import BlockStream

    _, tok = tiny
    texts = [t.replace("\n", " ") for t in docs_texts[:300] if t.strip()]
    per = -(-len(texts) // files)
    for f in range(files):
        (tmp_path / f"part{f}.txt").write_text("\n".join(texts[f * per : (f + 1) * per]) + "\n")
    data = DataConfig(dataset=str(tmp_path), streaming=True, eval_records=0, block_size=32)
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        calls = seen.setdefault(rank, [])

        def recording(batch, *args, _calls=calls, **kwargs):
            _calls.extend(batch)
            return tok(batch, *args, **kwargs)

        recording.is_fast = True
        stream = BlockStream(data, recording, seed=3, batch_size=2, rank=rank, world=2).batches()
        ids, _ = next(stream)  # fewer than 1000 records: the first batch tokenizes the rank's whole first epoch
        assert ids.shape == (2, 32)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(texts)
