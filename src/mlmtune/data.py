"""Text: load a corpus from any source and select one text per record, then split it.

Sources: a Hub dataset id, local .jsonl/.json/.csv/.parquet/.txt files or folders of them, and
the built-in `builtin:python-docs`. `load_texts()` is the whole stage; `blocks.py` takes its
texts on to tokens and blocks.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Value, load_dataset
from datasets.utils.logging import disable_progress_bar, enable_progress_bar

from mlmtune import hub
from mlmtune.config import DataConfig
from mlmtune.errors import MlmtuneError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
DEFUNCT_DATASETS = {
    "eli5": "the `eli5` dataset was taken down from the Hugging Face Hub (datasets#6605)",
    "eli5_category": "the `eli5_category` dataset was taken down from the Hugging Face Hub (datasets#6605)",
}


# ---------------------------------------------------------------------------------------------
# Text: load a source and select one text per record


def python_docs_texts() -> list[str]:
    """The Python Language Reference topics that ship with CPython (`pydoc_data.topics`).

    One text per paragraph (blank-line separated), so a record is prose of a few sentences.
    Paragraphs that the topics repeat word for word are kept once, so no eval text is also a
    training text.
    """
    from pydoc_data.topics import topics

    texts: dict[str, None] = {}
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if para:
                texts.setdefault(para)
    return list(texts)


def _slice(ds: Dataset, split: str) -> Dataset:
    """Apply `train[:5000]`-style slicing to an in-memory dataset whose only split is `train`."""
    import datasets

    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(ds)})
    except (ValueError, AssertionError) as e:
        raise MlmtuneError(f"--split {split!r}: {e}") from None
    rows = [i for ins in instructions for i in range(ins.from_, ins.to)]
    return ds if rows == list(range(len(ds))) else ds.select(rows)


def _txt_lines(files: list[str], stamp: list):
    """One record per non-empty line; `stamp` (sizes, mtimes) keys datasets' cache to the files' state."""
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield {"text": line}


def _read_txt(files: list[Path]) -> Dataset:
    """Stream text files into an Arrow file (never a Python list of the whole corpus)."""
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return Dataset.from_generator(_txt_lines, gen_kwargs={"files": [str(f) for f in files], "stamp": stamp},
                                  features=Features({"text": Value("string")}))


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
    if name == "builtin:python-docs":
        return _slice(Dataset.from_dict({"text": python_docs_texts()}), data.split)
    if name.startswith("builtin:"):
        raise MlmtuneError(f"unknown built-in corpus {name!r}; the built-in corpus is builtin:python-docs")
    path = Path(name).expanduser()
    if path.exists():
        files, builder = local_source(path)
        if builder == "text":
            return _slice(_read_txt(files), data.split)
        try:
            return load_dataset(builder, data_files=[str(f) for f in files], split=data.split)
        except ValueError as e:
            raise MlmtuneError(f"cannot read {path} with split {data.split!r}: {str(e).splitlines()[0]}") from None
        except Exception as e:  # pyarrow/pandas parse errors: one line with the file
            raise MlmtuneError(f"cannot parse {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
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


def select_text(records: Dataset, text_field: str) -> Dataset:
    """One `text` column: `text_field` (a dotted path into nested records), lists joined with a space.

    Records whose text is empty or whitespace-only are dropped.
    """
    flat = records.flatten()
    if text_field not in flat.column_names:
        fields = ", ".join(flat.column_names)
        raise MlmtuneError(f"--text-field {text_field!r} is not in the dataset; its fields are: {fields}")

    def pick(batch):
        return {"text": [_as_text(v, text_field) for v in batch[text_field]]}

    disable_progress_bar()  # both passes are fast; the tokenizer's bar is the one that matters
    try:
        texts = flat.map(pick, batched=True, remove_columns=flat.column_names)
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
    return split_texts(select_text(load_records(data), data.text_field), data.test_size, seed)
