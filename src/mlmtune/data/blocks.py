"""Tokens -> blocks: tokenize texts, concatenate each split once and cut it into blocks.

`build_blocks()` turns the texts of every split into fixed-length blocks (`group_blocks` streams a
split through in chunks, so memory holds one chunk); `Blocks` reads a split's rows per batch from
the memory map. `prepare.py` caches what this makes and reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets.table import InMemoryTable

from mlmtune.errors import MlmtuneError


class TooFewTokens(MlmtuneError):
    """A split holds fewer tokens than one block."""


@dataclass(frozen=True)
class BlockStats:
    """What grouping did to each split."""

    tokens: dict[str, int]
    blocks: dict[str, int]
    dropped_tokens: dict[str, int]
    records: int = 0
    """Records read, before empty texts were dropped."""
    empty_texts: int = 0
    """Records whose text was empty or whitespace-only (dropped)."""
    duplicate_texts: int = 0
    """Eval texts that also stand, exactly, in the training split."""
    texts: dict[str, int] = dataclasses.field(default_factory=dict)
    """Non-empty texts per split (the records that went into its blocks)."""

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped_tokens.values())


# ---------------------------------------------------------------------------------------------
# Tokens -> blocks


def word_starts(word_ids: list[int | None]) -> list[int]:
    """1 where a token begins a word, from a fast tokenizer's `word_ids()` (a special token is a word of its own)."""
    out, previous = [], None
    for w in word_ids:
        out.append(int(w is None or w != previous))
        previous = w
    return out


def tokenize(texts: Dataset, tokenizer) -> Dataset:
    """Batched fast tokenization with the model's special tokens around each text, as the guide does; with a fast
    tokenizer, each token's word boundary too (`word_starts`), as the tokenizer itself splits words."""
    fast = getattr(tokenizer, "is_fast", False)

    def encode(batch):
        enc = tokenizer(batch["text"], return_attention_mask=False, return_token_type_ids=False, verbose=False)
        out = {"input_ids": enc["input_ids"]}
        if fast:
            out["word_starts"] = [word_starts(e.word_ids) for e in enc.encodings]
        return out

    columns = {"input_ids": List(Value("int32")), **({"word_starts": List(Value("uint8"))} if fast else {})}
    return texts.map(encode, batched=True, batch_size=1000, remove_columns=texts.column_names,
                     features=Features(columns), desc="Tokenizing")


def group_blocks(tokenized: Dataset, block_size: int, path: str | Path | None = None) -> tuple[Dataset, int]:
    """Concatenate every sequence of the split once and cut it into `block_size` blocks.

    Linear time, and at most `block_size - 1` tokens are dropped for the whole split, not per map
    batch. The split streams through chunk by chunk (Arrow record batches, a remainder of fewer
    than `block_size` tokens carried between them), so memory holds one chunk, not the corpus.
    Word boundaries (`word_starts`), when the tokens have them, are cut the same way, and each block
    begins a word: a word never spans two blocks.

    Args:
        tokenized: a dataset with an `input_ids` list column (and maybe `word_starts`).
        block_size: tokens per block.
        path: write the blocks to this Arrow file and memory-map it; None keeps them in memory.

    Returns:
        (blocks with fixed-length `input_ids` (and `word_starts`) columns, number of tokens dropped)
    """
    if tokenized._indices is not None:
        tokenized = tokenized.flatten_indices()
    names = [c for c in ("input_ids", "word_starts") if c in tokenized.column_names]
    types = {"input_ids": pa.int32(), "word_starts": pa.uint8()}
    schema = pa.schema([(c, pa.list_(types[c], block_size)) for c in names])
    sink = pa.ipc.new_stream(str(path), schema) if path is not None else None
    batches: list[pa.RecordBatch] = []
    carry = {c: pa.array([], types[c]) for c in names}
    for record_batch in tokenized.data.table.select(names).to_batches():
        values = {c: pa.concat_arrays([carry[c], record_batch.column(c).flatten().cast(types[c])]) for c in names}
        n = len(values["input_ids"]) // block_size * block_size
        carry = {c: values[c].slice(n) for c in names}
        if n:
            columns = [_cut(values[c].slice(0, n), block_size, c == "word_starts") for c in names]
            batch = pa.record_batch(columns, schema=schema)
            if sink is not None:
                sink.write_batch(batch)
            else:
                batches.append(batch)
    if sink is not None:
        sink.close()
        return Dataset.from_file(str(path)), len(carry["input_ids"])
    return Dataset(InMemoryTable(pa.Table.from_batches(batches, schema=schema))), len(carry["input_ids"])


def _cut(values: pa.Array, block_size: int, starts: bool) -> pa.FixedSizeListArray:
    """Values -> rows of `block_size`; word starts get a 1 at each row's first token."""
    if starts:
        array = values.to_numpy(zero_copy_only=False).reshape(-1, block_size).copy()
        array[:, 0] = 1
        values = pa.array(array.reshape(-1), pa.uint8())
    return pa.FixedSizeListArray.from_arrays(values, block_size)


def _rows(chunks) -> list[np.ndarray]:
    """The non-empty chunks of a fixed-length list column as (rows, size) arrays."""
    out = []
    for chunk in chunks:
        if not len(chunk):
            continue
        if isinstance(chunk.type, pa.FixedSizeListType):
            size = chunk.type.list_size
        else:  # a variable-length list column written by another tool: rows must be equal
            size = len(chunk[0].values)
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        if len(values) != size * len(chunk):
            raise MlmtuneError("the prepared blocks have rows of different lengths; prepare them again")
        out.append(values.reshape(len(chunk), size))
    return out


class Blocks:
    """The blocks of a split, read on demand from their (memory-mapped) Arrow table.

    Indexing with a tensor of row numbers gives a (B, T) int64 batch, and `word_starts` the same rows'
    word boundaries; nothing else is copied out of Arrow, so training on a corpus larger than memory holds
    one batch at a time.
    """

    def __init__(self, blocks: Dataset):
        if blocks._indices is not None:
            blocks = blocks.flatten_indices()
        self.chunks = _rows(blocks.data.column("input_ids").chunks)
        self.start_chunks = (_rows(blocks.data.column("word_starts").chunks) if "word_starts" in blocks.column_names
                             else None)
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])
        self.block_size = self.chunks[0].shape[1] if self.chunks else 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def has_words(self) -> bool:
        return self.start_chunks is not None

    def _read(self, chunks: list[np.ndarray], rows: torch.Tensor | slice, dtype) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.block_size), dtype=dtype)
        for i, (c, r) in enumerate(zip(which, rows)):
            out[i] = chunks[c][r - self.starts[c]]
        return torch.from_numpy(out)

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        return self._read(self.chunks, rows, np.int64)

    def word_starts(self, rows: torch.Tensor | slice) -> torch.Tensor | None:
        """(B, T) bool: where the words of these rows begin; None when the blocks were made without them."""
        if self.start_chunks is None:
            return None
        return self._read(self.start_chunks, rows, np.bool_)


def blocks_tensor(blocks: Dataset) -> torch.Tensor:
    """All `input_ids` of a blocks dataset as one (N, block_size) int64 tensor (for small splits)."""
    return Blocks(blocks)[slice(None)]


def build_blocks(texts: DatasetDict, tokenizer, block_size: int,
                 workdir: Path | None = None) -> tuple[DatasetDict, BlockStats]:
    """Tokenize and group every split; no cache.

    Args:
        workdir: where the grouped blocks are streamed to (one Arrow file per split); None keeps
            them in memory.

    Raises:
        MlmtuneError: a split holds fewer tokens than one block.
    """
    out, tokens, n_blocks, dropped, n_texts = {}, {}, {}, {}, {}
    for split, ds in texts.items():
        n_texts[split] = len(ds)
        tokenized = tokenize(ds, tokenizer)
        path = workdir / f"{split}.arrow" if workdir is not None else None
        blocks, lost = group_blocks(tokenized, block_size, path)
        out[split], dropped[split] = blocks, lost
        n_blocks[split] = len(blocks)
        tokens[split] = len(blocks) * block_size + lost
        if not len(blocks):
            hint = ("raise --test-size, lower --block-size, or pass --test-size 0 to skip evaluation"
                    if split == "test" else "use more text or a smaller --block-size")
            raise TooFewTokens(f"the {split} split has {lost} tokens, fewer than one block of {block_size}; {hint}")
    return DatasetDict(out), BlockStats(tokens, n_blocks, dropped, texts=n_texts)


def count_duplicates(texts: DatasetDict) -> int:
    """How many eval texts also stand, exactly, in the training split (by 64-bit hash, not by copy)."""
    if "test" not in texts:
        return 0

    def hashes(ds: Dataset) -> np.ndarray:  # 8 bytes a text, not a Python set of the corpus
        return np.fromiter((hash(t) for b in ds.iter(batch_size=10_000) for t in b["text"]), np.int64, len(ds))

    return int(np.isin(hashes(texts["test"]), hashes(texts["train"])).sum())


