"""The whole data stage, cached: from a `DataConfig` to blocks per split (`prepare_blocks`).

Tokenized and grouped blocks are cached on disk under a key made of the texts, the tokenizer and
the block size, so a second run on the same data skips tokenization; `mlmtune prepare` writes the
same folder where the user says, and a folder it wrote is read back as it is. Every write is
atomic, and replaces only what an earlier `prepare` wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
from datasets import DatasetDict, load_from_disk

from mlmtune.config import DataConfig
from mlmtune.data.blocks import BlockStats, build_blocks, count_duplicates
from mlmtune.data.text import load_records, select_text, split_texts
from mlmtune.errors import MlmtuneError, say, warn
from mlmtune.lock import FolderLock

PREPARED_META = "mlmtune_prepared.json"
BLOCKS_FORMAT = 2  # 2: blocks keep their word starts; a cache entry of another format is not reused


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / PREPARED_META).is_file()


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


def _stats_from_meta(meta: dict) -> BlockStats:
    return BlockStats(meta["tokens"], meta["blocks"], meta["dropped_tokens"], meta.get("records", 0),
                      meta.get("empty_texts", 0), meta.get("duplicate_texts", 0), meta.get("texts", {}))


def prepared_words(path: str | Path) -> list[str] | None:
    """The words `prepare --add-tokens` added to the tokenizer of a prepared folder (None: it added none)."""
    try:
        words = json.loads((Path(path) / PREPARED_META).read_text()).get("added_tokens")
    except (OSError, ValueError, AttributeError) as e:
        raise damaged_error(path, e) from None
    return list(words) if words else None


def _meta(stats: BlockStats, tokenizer, block_size: int, data: DataConfig, added: list[str] | None = None) -> dict:
    return {
        "added_tokens": added or [],
        "block_size": block_size,
        "format": BLOCKS_FORMAT,
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
        raise damaged_error(path, e) from None
    if made_with != tokenizer_fingerprint(tokenizer):
        if meta.get("added_tokens"):
            raise MlmtuneError(f"{path} was prepared with --add-tokens ({len(meta['added_tokens'])} words added to "
                               f"{meta.get('tokenizer_name') or 'its tokenizer'}): train with --add-tokens too")
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
        raise damaged_error(path, e) from None
    return blocks, stats


def damaged_error(path: str | Path, e: BaseException) -> MlmtuneError:
    detail = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
    return MlmtuneError(f"the prepared folder {path} is damaged ({detail}); run `mlmtune prepare` again")


def prepare_blocks(data: DataConfig, tokenizer, seed: int, save_to: str | Path | None = None,
                   added: list[str] | None = None) -> tuple[DatasetDict, BlockStats]:
    """The whole data stage: blocks of `data.block_size` tokens per split (`train`, maybe `test`).

    A folder made by `mlmtune prepare` is read as it is. Otherwise the blocks are written to
    `save_to` (what `mlmtune prepare` does) or to the cache under `cache_root(data)`, keyed by
    texts, tokenizer, block size and format, and returned memory-mapped from there. `added`: the words
    `--add-tokens` added to the tokenizer, recorded in a prepared folder so that `train` adds them too.
    """
    if data.dataset and is_prepared(data.dataset):
        return load_prepared(data.dataset, tokenizer, data.block_size)
    if save_to is not None:
        check_prepare_target(Path(save_to))  # before any work, and before anything is written
    records = load_records(data)
    selected = select_text(records, data.text_field)
    texts = split_texts(selected, data.held_out, seed)
    if save_to is None:
        key = hashlib.sha256(f"{texts_fingerprint(texts)}:{tokenizer_fingerprint(tokenizer)}:{data.block_size}:"
                             f"{BLOCKS_FORMAT}".encode()).hexdigest()[:24]
        folder = cache_root(data) / "blocks" / key
        if is_prepared(folder):
            try:
                cached = load_prepared(folder, tokenizer)
                say(f"Using cached blocks from {folder}")
                return cached
            except MlmtuneError as e:  # a damaged cache entry is rebuilt, never fatal
                warn(f"rebuilding the cache entry {folder}: {e}")
    else:
        folder = Path(save_to)
    lock = FolderLock.beside(folder, f"--output-dir {folder}" if save_to else f"the cache entry {folder}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # one writer per folder: prepare's output, and each cache entry
    except (MlmtuneError, OSError) as e:
        if save_to is not None:
            raise MlmtuneError(str(e) if isinstance(e, MlmtuneError) else f"cannot write {folder}: {e}") from None
        warn(f"tokenizing without the cache: {e}")  # another run writes this entry now; do not wait for it
        lock = None
    try:
        return _build(texts, len(records), len(selected), tokenizer, data, folder, save_to, added, cached=lock)
    finally:
        if lock is not None:
            lock.release()


def _build(texts: DatasetDict, records: int, selected: int, tokenizer, data: DataConfig, folder: Path, save_to,
           added: list[str] | None, cached) -> tuple[DatasetDict, BlockStats]:
    """Tokenize and group `texts`, write them to `folder` (unless `cached` is None: a cache entry another run
    holds), and return them memory-mapped."""
    workdir = Path(tempfile.mkdtemp(prefix="mlmtune-blocks-"))
    try:
        blocks, stats = build_blocks(texts, tokenizer, data.block_size, workdir)
        stats = dataclasses.replace(stats, records=records, empty_texts=records - selected,
                                    duplicate_texts=count_duplicates(texts))  # a cache hit has these in its meta
        if cached is None:
            return blocks, stats  # readable after the workdir goes: Linux keeps a mapped file's pages
        try:
            _save_atomic(blocks, _meta(stats, tokenizer, data.block_size, data, added), folder,
                         cache_entry=save_to is None)
        except OSError as e:
            if save_to is not None:
                raise MlmtuneError(f"cannot write {folder}: {e.strerror or e}") from None
            warn(f"could not cache blocks in {folder} ({e.strerror or e}); tokenizing again next time")
            return blocks, stats  # still readable: Linux keeps a mapped file's pages after it is deleted
        return load_prepared(folder, tokenizer)  # memory-mapped from disk from here on
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
