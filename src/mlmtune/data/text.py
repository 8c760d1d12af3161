"""Text: load a corpus from any source and select one text per record, then split it.

Sources: a Hub dataset id, local .jsonl/.json/.csv/.parquet/.txt files or folders of them, and
the built-in corpora (`corpora.py`: `builtin:python-docs`, `builtin:wikipedia`). `load_texts()` is
the whole stage; `blocks.py` takes its texts on to tokens and blocks.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, ReadInstruction, Value, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.utils.logging import disable_progress_bar, enable_progress_bar

from mlmtune import hub
from mlmtune.config import DataConfig
from mlmtune.data.corpora import builtin_texts
from mlmtune.errors import MlmtuneError, warn

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
INVALID_UTF8 = "invalid_utf8"
DEFUNCT_DATASETS = {
    "eli5": "the `eli5` dataset was taken down from the Hugging Face Hub (datasets#6605)",
    "eli5_category": "the `eli5_category` dataset was taken down from the Hugging Face Hub (datasets#6605)",
}


# ---------------------------------------------------------------------------------------------
# Text: load a source and select one text per record


def _slice(ds: Dataset, split: str) -> Dataset:
    """Apply `train[:5000]`-style slicing to an in-memory dataset whose only split is `train`."""
    try:
        instructions = ReadInstruction.from_spec(split).to_absolute({"train": len(ds)})
    except (ValueError, AssertionError) as e:
        raise MlmtuneError(f"--split {split!r}: {e}") from None
    rows = [i for ins in instructions for i in range(ins.from_, ins.to)]
    return ds if rows == list(range(len(ds))) else ds.select(rows)


def decode_line(raw: bytes) -> tuple[str, bool]:
    """A line of bytes as text, and whether it was valid UTF-8 (invalid bytes become U+FFFD)."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def _txt_lines(files: list[str], stamp: list):
    """One record per non-empty line; `stamp` (sizes, mtimes) keys datasets' cache to the files' state.

    A line that is not valid UTF-8 is kept with its bad bytes replaced, and flagged in `invalid_utf8`
    so that the loader can say how many there were.
    """
    for f in files:
        with open(f, "rb") as fh:
            for raw in fh:
                line, valid = decode_line(raw)
                line = line.strip()
                if line:
                    yield {"text": line, INVALID_UTF8: not valid}


def _read_txt(files: list[Path]) -> Dataset:
    """Stream text files into an Arrow file (never a Python list of the whole corpus)."""
    if next(_txt_lines([str(f) for f in files], []), None) is None:  # datasets cannot build an empty table
        where = files[0] if len(files) == 1 else f"the {len(files)} files"
        raise MlmtuneError(f"{where} holds no text: every line is empty; give one text per line")
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    ds = Dataset.from_generator(_txt_lines, gen_kwargs={"files": [str(f) for f in files], "stamp": stamp},
                                features=Features({"text": Value("string"), INVALID_UTF8: Value("bool")}))
    bad = sum(sum(b[INVALID_UTF8]) for b in ds.select_columns([INVALID_UTF8]).iter(batch_size=100_000))
    if bad:
        warn(f"{bad:,} of {len(ds):,} lines of {files[0] if len(files) == 1 else f'{len(files)} files'} are not "
             f"valid UTF-8; their bad bytes were replaced with U+FFFD")
    return ds.remove_columns([INVALID_UTF8])


def _blank(path: Path) -> bool:
    """Whether a text file holds nothing but white space (read until its first other byte)."""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS)
        if not files:
            kinds = ", ".join(FILE_BUILDERS)
            raise MlmtuneError(f"folder {path} holds no data files ({kinds})")
    kinds = {FILE_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        raise MlmtuneError(f"{path}: unsupported file type; use one of {', '.join(FILE_BUILDERS)}")
    if len(kinds) > 1:
        raise MlmtuneError(f"folder {path} mixes file types ({', '.join(sorted(kinds))}); keep one type per folder")
    return files


def local_source(path: Path) -> tuple[list[Path], str]:
    """The data files of a local file or folder, and the `datasets` builder that reads them."""
    files = _local_files(path)
    return files, FILE_BUILDERS[files[0].suffix.lower()]


def load_records(data: DataConfig) -> Dataset:
    """Load the raw records of `data.dataset` (any source except a prepared folder).

    Raises:
        MlmtuneError: unknown source, defunct dataset, unreachable Hub, bad split.
    """
    name = data.dataset or ""
    if name.startswith("builtin:"):
        return _slice(Dataset.from_dict({"text": builtin_texts(name)}), data.split)
    path = Path(name).expanduser()
    if path.exists():
        files, builder = local_source(path)
        if builder in ("json", "csv") and all(_blank(f) for f in files):  # datasets fails on these with a traceback
            raise MlmtuneError(f"{path} holds no records: {'it is' if len(files) == 1 else 'its files are'} empty")
        if builder == "text":
            return _slice(_read_txt(files), data.split)
        try:
            with _json_objects_only(files) if builder == "json" else contextlib.nullcontext(files) as readable:
                records = load_dataset(builder, data_files=[str(f) for f in readable], split=data.split)
        except DatasetGenerationError as e:  # the file does not parse: the cause names the line or column
            cause = e.__cause__ or e
            raise MlmtuneError(f"cannot parse {path}: {type(cause).__name__}: {_first_line(cause)}") from None
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:
            raise MlmtuneError(f"cannot parse {path}: {type(e).__name__}: {_first_line(e)}") from None
        except ValueError as e:
            raise MlmtuneError(f"cannot read {path} with split {data.split!r}: {_first_line(e)}") from None
        if not len(records):
            raise MlmtuneError(f"{path} holds no records")
        return records
    if name.lower() in DEFUNCT_DATASETS:
        raise defunct_error(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix.lower() in FILE_BUILDERS:
        raise MlmtuneError(f"dataset path {name} does not exist")
    online = hub.prepare_hub_access()
    try:
        return load_dataset(name, data.dataset_config, split=data.split)
    except Exception as e:
        if not online:
            raise hub.unreachable_error("Dataset", name) from None
        raise MlmtuneError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _json_objects_only(files: list[Path]):
    """JSON Lines files whose every line is an object (or blank), skipping the lines that are not.

    pyarrow's JSON reader crashes the process (SIGSEGV) on a line that is `null`, so lines that do
    not open with `{` are dropped, into a filtered copy, with one warning that counts them.
    """
    jsonl = [f for f in files if f.suffix.lower() == ".jsonl"]
    bad = {f: n for f in jsonl if (n := sum(1 for line in f.open("rb") if line.strip() and not line.lstrip()
                                            .startswith(b"{")))}
    if not bad:
        yield files
        return
    with tempfile.TemporaryDirectory(prefix="mlmtune-jsonl-") as tmp:
        out = []
        for i, f in enumerate(files):
            if f not in bad:
                out.append(f)
                continue
            copy = Path(tmp) / f"{i}-{f.name}"
            with f.open("rb") as src, copy.open("wb") as dst:
                dst.writelines(line for line in src if line.lstrip().startswith(b"{"))
            out.append(copy)
        total = sum(bad.values())
        warn(f"{total:,} line(s) of {', '.join(str(f) for f in bad)} are not JSON objects (null, a list or a "
             f"number); skipped")
        yield out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def defunct_error(name: str) -> MlmtuneError:
    return MlmtuneError(
        f"{DEFUNCT_DATASETS[name.lower()]}: download an ELI5-shaped copy (records with a nested "
        f"`answers.text` list) and pass it as --dataset FILE.jsonl --text-field answers.text, "
        f"or pass another Hub id that hosts a copy"
    )


def _as_text(value, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) or v is None for v in value):
        return " ".join(v for v in value if v)  # the guide's " ".join(x) over answers.text
    raise MlmtuneError(f"--text-field {field} holds {type(value).__name__} values, not text or a list of text")


def _decoded(values: list) -> tuple[list, list[bool]]:
    """Arrow binary values (or lists of them) as text, bad UTF-8 replaced; and which were valid."""
    out, valid = [], []
    for v in values:
        if isinstance(v, bytes):
            text, ok = decode_line(v)
        elif isinstance(v, list):
            pairs = [decode_line(x) if isinstance(x, bytes) else (x, True) for x in v]
            text, ok = [t for t, _ in pairs], all(o for _, o in pairs)
        else:
            text, ok = v, True
        out.append(text)
        valid.append(ok)
    return out, valid


def _as_binary(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings (or lists of strings) read as bytes, so that invalid UTF-8 is ours to decode, not a crash."""
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return column.cast(pa.binary())
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_string(t.value_type):
        return column.cast(pa.list_(pa.binary()))
    return column


def text_values(column: pa.ChunkedArray, text_field: str) -> list[str]:
    """A column's values as text, one per record (lists joined, bad UTF-8 replaced, None as ""), none dropped."""
    values, _ = _decoded(_as_binary(column).to_pylist())
    return [_as_text(v, text_field) for v in values]


def select_text(records: Dataset, text_field: str) -> Dataset:
    """One `text` column: `text_field` (a dotted path into nested records), lists joined with a space.

    Records whose text is empty or whitespace-only are dropped (`check` counts them). Text that is
    not valid UTF-8 (JSON and Parquet files can hold such bytes) is kept with U+FFFD in place of the
    bad bytes, and counted in one warning.
    """
    flat = records.flatten()
    if text_field not in flat.column_names:
        fields = ", ".join(flat.column_names)
        raise MlmtuneError(f"--text-field {text_field!r} is not in the dataset; its fields are: {fields}")

    def pick(batch: pa.Table):
        values, valid = _decoded(_as_binary(batch.column(text_field)).to_pylist())
        return {"text": [_as_text(v, text_field) for v in values], INVALID_UTF8: [not ok for ok in valid]}

    disable_progress_bar()  # both passes are fast; the tokenizer's bar is the one that matters
    try:
        texts = flat.select_columns([text_field]).with_format("arrow").map(
            pick, batched=True, remove_columns=[text_field],
            features=Features({"text": Value("string"), INVALID_UTF8: Value("bool")})).with_format(None)
        bad = sum(sum(b[INVALID_UTF8]) for b in texts.select_columns([INVALID_UTF8]).iter(batch_size=100_000))
        if bad:
            warn(f"{bad:,} of {len(texts):,} records hold text that is not valid UTF-8; the bad bytes were "
                 f"replaced with U+FFFD")
        texts = texts.remove_columns([INVALID_UTF8])
        return texts.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
    finally:
        enable_progress_bar()


def split_texts(texts: Dataset, test_size: float, seed: int) -> DatasetDict:
    """The guide's `train_test_split`: shuffled by `seed`; with test_size 0, one split in corpus order."""
    if test_size == 0:
        return DatasetDict(train=texts)
    if len(texts) < 2:
        raise MlmtuneError(f"the corpus has {len(texts)} non-empty text(s); --test-size needs at least 2")
    parts = texts.train_test_split(test_size=test_size, seed=seed)
    if len(parts["test"]) == 0:
        raise MlmtuneError(f"--test-size {test_size} leaves no eval texts out of {len(texts)}")
    return DatasetDict(train=parts["train"], test=parts["test"])


def load_texts(data: DataConfig, seed: int) -> DatasetDict:
    """Load, select text and split: the `text` column per split."""
    return split_texts(select_text(load_records(data), data.text_field), data.held_out, seed)
