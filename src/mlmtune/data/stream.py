"""Streaming: records -> texts -> blocks on the fly, for corpora larger than memory (--streaming).

Nothing is cached and nothing holds the corpus: records are read as a `datasets`
IterableDataset, texts tokenized a batch at a time and cut into blocks as they come, through a
shuffle buffer seeded by (seed, epoch) so that a resumed run can fast-forward to where it was.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm

from mlmtune import hub
from mlmtune.config import DataConfig
from mlmtune.data.blocks import word_starts
from mlmtune.data.corpora import builtin_texts
from mlmtune.data.prepare import is_prepared
from mlmtune.data.text import DEFUNCT_DATASETS, _as_text, _txt_lines, defunct_error, local_source
from mlmtune.errors import MlmtuneError


def stream_records(data: DataConfig):
    """The corpus as a `datasets.IterableDataset` of records (nothing is read until iterated)."""
    name = data.dataset or ""
    if name.startswith("builtin:"):
        return Dataset.from_dict({"text": builtin_texts(name)}).to_iterable_dataset()
    if is_prepared(name):
        raise MlmtuneError(f"{name} holds prepared blocks; --streaming reads raw text: drop --streaming")
    if "[" in data.split:
        raise MlmtuneError(f"--split {data.split!r}: slicing does not apply to a stream; use --max-steps")
    path = Path(name).expanduser()
    if path.exists():
        files, builder = local_source(path)
        if builder == "text":
            return IterableDataset.from_generator(_txt_lines, gen_kwargs={"files": [str(f) for f in files],
                                                                          "stamp": ()})
        return load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    if name.lower() in DEFUNCT_DATASETS:
        raise defunct_error(name)
    online = hub.prepare_hub_access()
    try:
        return load_dataset(name, data.dataset_config, split=data.split, streaming=True)
    except Exception as e:
        if not online:
            raise hub.unreachable_error("Dataset", name) from None
        raise MlmtuneError(f"cannot stream dataset {name!r}: {str(e).splitlines()[0]}") from None


def field_value(record: dict, dotted: str):
    """`record["answers"]["text"]` for `answers.text`, or MlmtuneError naming the fields there are."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            where = value if isinstance(value, dict) else record
            raise MlmtuneError(f"--text-field {dotted!r} is not in the records; their fields are: "
                               f"{', '.join(where)}")
        value = value[part]
    return value


def _records(records):
    """Iterate a record stream; a record that does not parse is one MlmtuneError, not a traceback."""
    try:
        yield from records
    except (DatasetGenerationError, pa.ArrowException, UnicodeDecodeError, ValueError) as e:
        cause = e.__cause__ if isinstance(e, DatasetGenerationError) and e.__cause__ else e
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise MlmtuneError(f"the stream cannot be read ({type(cause).__name__}: {detail}); "
                           f"fix the file or drop the bad records") from None


def stream_texts(records, text_field: str, skip: int = 0, take: int | None = None):
    """Non-empty texts of a record stream: records [skip, skip + take)."""
    for n, record in enumerate(_records(records)):
        if n < skip:
            continue
        if take is not None and n >= skip + take:
            return
        text = _as_text(field_value(record, text_field), text_field)
        if text.strip():
            yield text


def stream_blocks(texts, tokenizer, block_size: int, batch: int = 1000):
    """Tokenize texts in batches and cut the running concatenation into blocks, as they come.

    Yields ((block_size,) int64 ids, (block_size,) bool word starts, or None without a fast tokenizer), as
    `blocks.group_blocks` cuts them; holds at most one batch of tokens plus a remainder.
    """
    fast = getattr(tokenizer, "is_fast", False)
    ids: list[int] = []
    starts: list[int] = []
    pending: list[str] = []

    def flush():
        enc = tokenizer(pending, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        for n, seq in enumerate(enc["input_ids"]):
            ids.extend(seq)
            if fast:
                starts.extend(word_starts(enc.encodings[n].word_ids))
        pending.clear()

    def cut():
        while len(ids) >= block_size:
            block_starts = None
            if fast:
                block_starts = torch.tensor(starts[:block_size], dtype=torch.bool)
                block_starts[0] = True  # a block begins a word
                del starts[:block_size]
            yield torch.tensor(ids[:block_size], dtype=torch.long), block_starts
            del ids[:block_size]

    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            flush()
            yield from cut()
    if pending:
        flush()
    yield from cut()


class BlockStream:
    """Micro-batches of blocks from a record stream, epoch after epoch: one process's share of each.

    The first `data.eval_records` records are held out (see `held_out_texts`); the rest are
    shuffled through a buffer seeded by (seed, epoch), so the batches are reproducible and a
    resumed run can fast-forward to where it stopped. On several processes each rank reads only
    its share of the shuffled records (`datasets.distributed.split_dataset_by_node`: whole files when
    they split evenly over the ranks, else every world-th record) and tokenizes and cuts only those
    into blocks: no rank tokenizes the whole global batch. A block then holds records of one rank's
    share only, so which blocks a step sees depends on the number of processes (not on anything
    else): a stream resumes on as many processes as it started on.
    """

    def __init__(self, data: DataConfig, tokenizer, seed: int, batch_size: int, buffer_size: int = 10_000,
                 rank: int = 0, world: int = 1):
        self.data, self.tokenizer, self.batch_size = data, tokenizer, batch_size
        self.records = stream_records(data).skip(data.eval_records).shuffle(seed=seed, buffer_size=buffer_size)
        if world > 1:  # the same shuffle on every rank, then each keeps its own records
            self.records = split_dataset_by_node(self.records, rank=rank, world_size=world)
        self.world = world

    def batches(self, start: int = 0, progress: bool = True):
        """Yield ((batch_size, T) ids, their word starts or None), skipping the first `start` (what a resumed
        run did)."""
        produced, epoch = 0, 0
        bar = tqdm(total=start, desc="Fast-forwarding the stream", disable=not (progress and start), leave=False)
        while True:
            self.records.set_epoch(epoch)
            texts = stream_texts(self.records, self.data.text_field)
            batch: list[tuple[torch.Tensor, torch.Tensor | None]] = []
            any_block = False
            for block in stream_blocks(texts, self.tokenizer, self.data.block_size):
                any_block = True
                batch.append(block)
                if len(batch) == self.batch_size:
                    if produced >= start:
                        bar.close()
                        ids = torch.stack([b[0] for b in batch])
                        yield ids, (None if batch[0][1] is None else torch.stack([b[1] for b in batch]))
                    else:
                        bar.update(1)
                    produced += 1
                    batch = []
            if not any_block:
                share = f" in each of {self.world} processes' shares" if self.world > 1 else ""
                raise MlmtuneError(f"the stream holds fewer tokens than one block of {self.data.block_size} "
                                   f"after the {self.data.eval_records} held-out records{share}")
            epoch += 1  # the stream is read again, in another order; a partial last batch is dropped


def held_out_texts(data: DataConfig) -> list[str]:
    """The texts of the first `data.eval_records` records of the stream (the eval split)."""
    return list(stream_texts(stream_records(data), data.text_field, take=data.eval_records))
