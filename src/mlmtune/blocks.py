"""Tokens -> blocks: tokenize texts, concatenate each split once and cut it into blocks, cache them.

`prepare_blocks()` is the whole stage (from `DataConfig` to blocks per split). Tokenized and
grouped blocks are cached on disk under a key made of the texts, the tokenizer and the block
size, so a second run on the same data skips tokenization; `mlmtune prepare` writes the same
folder where the user says. `Blocks` reads a split's rows per batch from the memory map.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk

from mlmtune.config import DataConfig
from mlmtune.data import load_records, select_text, split_texts
from mlmtune.errors import MlmtuneError

PREPARED_META = "mlmtune_prepared.json"


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


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / PREPARED_META).is_file()


# ---------------------------------------------------------------------------------------------
# Tokens -> blocks


def tokenize(texts: Dataset, tokenizer) -> Dataset:
    """Batched fast tokenization with the model's special tokens around each text, as the guide does."""

    def encode(batch):
        ids = tokenizer(batch["text"], return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return {"input_ids": ids["input_ids"]}

    return texts.map(
        encode,
        batched=True,
        batch_size=1000,
        remove_columns=texts.column_names,
        features=Features({"input_ids": List(Value("int32"))}),
        desc="Tokenizing",
    )


def group_blocks(tokenized: Dataset, block_size: int, path: str | Path | None = None) -> tuple[Dataset, int]:
    """Concatenate every sequence of the split once and cut it into `block_size` blocks.

    Linear time, and at most `block_size - 1` tokens are dropped for the whole split, not per map
    batch. The split streams through chunk by chunk (Arrow record batches, a remainder of fewer
    than `block_size` tokens carried between them), so memory holds one chunk, not the corpus.

    Args:
        tokenized: a dataset with an `input_ids` list column.
        block_size: tokens per block.
        path: write the blocks to this Arrow file and memory-map it; None keeps them in memory.

    Returns:
        (blocks with a fixed-length `input_ids` column, number of tokens dropped)
    """
    if tokenized._indices is not None:
        tokenized = tokenized.flatten_indices()
    schema = pa.schema([("input_ids", pa.list_(pa.int32(), block_size))])
    sink = pa.ipc.new_stream(str(path), schema) if path is not None else None
    batches: list[pa.RecordBatch] = []
    carry = pa.array([], pa.int32())
    for chunk in tokenized.data.column("input_ids").chunks:
        values = pa.concat_arrays([carry, chunk.flatten().cast(pa.int32())])
        n = len(values) // block_size * block_size
        carry = values.slice(n)
        if n:
            blocks = pa.FixedSizeListArray.from_arrays(values.slice(0, n), block_size)
            batch = pa.record_batch([blocks], schema=schema)
            if sink is not None:
                sink.write_batch(batch)
            else:
                batches.append(batch)
    if sink is not None:
        sink.close()
        return Dataset.from_file(str(path)), len(carry)
    return Dataset(table_from_arrow(pa.Table.from_batches(batches, schema=schema))), len(carry)


def table_from_arrow(table: pa.Table):
    from datasets.table import InMemoryTable

    return InMemoryTable(table)


class Blocks:
    """The blocks of a split, read on demand from their (memory-mapped) Arrow table.

    Indexing with a tensor of row numbers gives a (B, T) int64 batch; nothing else is copied out
    of Arrow, so training on a corpus larger than memory holds one batch at a time.
    """

    def __init__(self, blocks: Dataset):
        if blocks._indices is not None:
            blocks = blocks.flatten_indices()
        self.chunks: list[np.ndarray] = []
        for chunk in blocks.data.column("input_ids").chunks:
            if not len(chunk):
                continue
            if isinstance(chunk.type, pa.FixedSizeListType):
                size = chunk.type.list_size
            else:  # a variable-length list column written by another tool: rows must be equal
                size = len(chunk[0].values)
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            if len(values) != size * len(chunk):
                raise MlmtuneError("the prepared blocks have rows of different lengths; prepare them again")
            self.chunks.append(values.reshape(len(chunk), size))
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])
        self.block_size = self.chunks[0].shape[1] if self.chunks else 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.block_size), dtype=np.int64)
        for i, (c, r) in enumerate(zip(which, rows)):
            out[i] = self.chunks[c][r - self.starts[c]]
        return torch.from_numpy(out)


def blocks_tensor(blocks: Dataset) -> torch.Tensor:
    """All `input_ids` of a blocks dataset as one (N, block_size) int64 tensor (for small splits)."""
    return Blocks(blocks)[slice(None)]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # truncation/padding are call-time settings that tokenizing itself changes
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted(tokenizer.all_special_ids)).encode())
    return h.hexdigest()[:16]


def texts_fingerprint(texts: DatasetDict) -> str:
    h = hashlib.sha256()
    for split in sorted(texts):
        h.update(f"\x00split={split}\x00".encode())
        for batch in texts[split].iter(batch_size=10_000):
            h.update("\x1e".join(batch["text"]).encode())
            h.update(b"\x1d")
    return h.hexdigest()[:16]


def cache_root(data: DataConfig) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    base = os.environ.get("MLMTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlmtune")
    return Path(base)


def check_prepare_target(folder: Path) -> None:
    """`prepare` writes into an empty or missing folder, or over an earlier `prepare` output; never
    over anything else (a corpus folder, `.`, a model)."""
    if folder.exists() and not folder.is_dir():
        raise MlmtuneError(f"--output-dir {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_prepared(folder):
        raise MlmtuneError(f"--output-dir {folder} is not empty and was not written by `mlmtune prepare`; "
                           f"choose a new or empty folder (nothing in it was changed)")


def _written_entries(folder: Path) -> list[str]:
    """The top-level names an earlier `prepare` wrote into `folder` (its meta lists them)."""
    try:
        meta = json.loads((folder / PREPARED_META).read_text())
    except (OSError, ValueError):
        return []
    names = meta.get("entries") or ["dataset_dict.json", *meta.get("blocks", {})]  # before entries were listed
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


def _save_atomic(blocks: DatasetDict, meta: dict, folder: Path, cache_entry: bool = False) -> None:
    """Write blocks and meta to `folder`, replacing only what an earlier `prepare` wrote there.

    Everything is written to a sibling temporary folder first. A missing or empty target is then
    renamed into place in one step; an earlier output has its own entries (listed in its meta)
    swapped one by one, the meta last, so that a crash leaves no folder that claims to be whole.
    Files of anyone else in the folder stay untouched. A `cache_entry` (a folder named by its key
    in mlmtune's own cache) is replaced whole even when it is damaged.
    """
    if not cache_entry:
        check_prepare_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        blocks.save_to_disk(str(tmp))
        entries = sorted(p.name for p in tmp.iterdir())
        (tmp / PREPARED_META).write_text(json.dumps({**meta, "entries": [*entries, PREPARED_META]}, indent=2))
        if cache_entry and folder.exists():
            shutil.rmtree(folder)
        if not folder.exists() or not any(folder.iterdir()):
            os.replace(tmp, folder)
            return
        old = _written_entries(folder)
        foreign = [n for n in entries if (folder / n).exists() and n not in old]
        if foreign:
            raise MlmtuneError(f"--output-dir {folder} holds {', '.join(foreign)}, which `mlmtune prepare` did not "
                               f"write there; choose a new or empty folder (nothing in it was changed)")
        (folder / PREPARED_META).unlink()  # from here on the folder is not a valid prepare output
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        try:
            for name in old:
                if name != PREPARED_META and (folder / name).exists():
                    os.replace(folder / name, trash / name)
            for name in entries:
                os.replace(tmp / name, folder / name)
            os.replace(tmp / PREPARED_META, folder / PREPARED_META)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def _stats_from_meta(meta: dict) -> BlockStats:
    return BlockStats(meta["tokens"], meta["blocks"], meta["dropped_tokens"], meta.get("records", 0),
                      meta.get("empty_texts", 0), meta.get("duplicate_texts", 0), meta.get("texts", {}))


def count_duplicates(texts: DatasetDict) -> int:
    """How many eval texts also stand, exactly, in the training split (by 64-bit hash, not by copy)."""
    if "test" not in texts:
        return 0

    def hashes(ds: Dataset) -> np.ndarray:  # 8 bytes a text, not a Python set of the corpus
        return np.fromiter((hash(t) for b in ds.iter(batch_size=10_000) for t in b["text"]), np.int64, len(ds))

    return int(np.isin(hashes(texts["test"]), hashes(texts["train"])).sum())


def _meta(stats: BlockStats, tokenizer, block_size: int, data: DataConfig) -> dict:
    return {
        "block_size": block_size,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": getattr(tokenizer, "name_or_path", ""),
        "dataset": data.dataset,
        "text_field": data.text_field,
        "split": data.split,
        "test_size": data.held_out,
        "tokens": stats.tokens,
        "blocks": stats.blocks,
        "dropped_tokens": stats.dropped_tokens,
        "records": stats.records,
        "empty_texts": stats.empty_texts,
        "duplicate_texts": stats.duplicate_texts,
        "texts": stats.texts,
    }


def load_prepared(path: str | Path, tokenizer, block_size: int | None = None) -> tuple[DatasetDict, BlockStats]:
    """Read a folder written by `mlmtune prepare`, checking it was made with this tokenizer.

    Raises:
        MlmtuneError: another tokenizer or block size, or a damaged folder (missing files, bad meta).
    """
    try:
        meta = json.loads((Path(path) / PREPARED_META).read_text())
        stats = _stats_from_meta(meta)
        made_with, made_size = meta["tokenizer"], meta["block_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise damaged(path, e) from None
    if made_with != tokenizer_fingerprint(tokenizer):
        raise MlmtuneError(
            f"{path} was prepared with a different tokenizer ({meta.get('tokenizer_name') or 'unknown'}); "
            f"run `mlmtune prepare` again with this --model"
        )
    if block_size is not None and made_size != block_size:
        raise MlmtuneError(
            f"{path} holds blocks of {made_size} tokens but --block-size is {block_size}; "
            f"pass --block-size {made_size} or prepare again"
        )
    try:
        blocks = load_from_disk(str(path))
        if set(blocks) != set(stats.blocks) or any(len(blocks[k]) != n for k, n in stats.blocks.items()):
            raise ValueError("its splits do not match its mlmtune_prepared.json")
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise damaged(path, e) from None
    return blocks, stats


def damaged(path: str | Path, e: BaseException) -> MlmtuneError:
    detail = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
    return MlmtuneError(f"the prepared folder {path} is damaged ({detail}); run `mlmtune prepare` again")


def prepare_blocks(data: DataConfig, tokenizer, seed: int, save_to: str | Path | None = None,
                   ) -> tuple[DatasetDict, BlockStats]:
    """The whole data stage: blocks of `data.block_size` tokens per split (`train`, maybe `test`).

    A folder made by `mlmtune prepare` is read as it is. Otherwise the blocks are written to
    `save_to` (what `mlmtune prepare` does) or to the cache under `cache_root(data)`, keyed by
    texts, tokenizer and block size, and returned memory-mapped from there.
    """
    if data.dataset and is_prepared(data.dataset):
        return load_prepared(data.dataset, tokenizer, data.block_size)
    if save_to is not None:
        check_prepare_target(Path(save_to))  # before any work, and before anything is written
    records = load_records(data)
    selected = select_text(records, data.text_field)
    texts = split_texts(selected, data.held_out, seed)
    if save_to is None:
        key = hashlib.sha256(
            f"{texts_fingerprint(texts)}:{tokenizer_fingerprint(tokenizer)}:{data.block_size}".encode()
        ).hexdigest()[:24]
        folder = cache_root(data) / "blocks" / key
        if is_prepared(folder):
            try:
                cached = load_prepared(folder, tokenizer)
                print(f"Using cached blocks from {folder}", file=sys.stderr)
                return cached
            except MlmtuneError as e:  # a damaged cache entry is rebuilt, never fatal
                print(f"warning: rebuilding the cache entry {folder}: {e}", file=sys.stderr)
    else:
        folder = Path(save_to)
    workdir = Path(tempfile.mkdtemp(prefix="mlmtune-blocks-"))
    try:
        blocks, stats = build_blocks(texts, tokenizer, data.block_size, workdir)
        stats = dataclasses.replace(stats, records=len(records), empty_texts=len(records) - len(selected),
                                    duplicate_texts=count_duplicates(texts))  # a cache hit has these in its meta
        try:
            _save_atomic(blocks, _meta(stats, tokenizer, data.block_size, data), folder, cache_entry=save_to is None)
        except OSError as e:
            if save_to is not None:
                raise MlmtuneError(f"cannot write {folder}: {e.strerror or e}") from None
            print(f"warning: could not cache blocks in {folder} ({e.strerror or e}); "
                  f"tokenizing again next time", file=sys.stderr)
            return blocks, stats  # still readable: Linux keeps a mapped file's pages after it is deleted
        return load_prepared(folder, tokenizer)  # memory-mapped from disk from here on
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
