"""A downstream task: labelled texts loaded from any source, labels made classes, and a train and a test split
(the task's own, or drawn by the seed, stratified), with what cannot be learned refused in one line.

Sources are those `train` reads (`data.text.load_records`): local .jsonl/.json/.csv/.parquet files, a folder holding
`train.*` and `test.*` (or `validation.*`) files, a Hub dataset (its train and test or validation splits), and
`builtin:python-docs-chapters`, which labels each paragraph of the Python Language Reference that ships with
CPython by the part of the reference its topic belongs to.
"""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

import torch
from datasets import Dataset
from datasets.utils.logging import disable_progress_bar, enable_progress_bar

from mlmtune.config import DataConfig
from mlmtune.data.text import load_records, text_values
from mlmtune.errors import MlmtuneError, warn
from mlmtune.probe_config import TaskConfig

# builtin:python-docs-chapters: each pydoc topic by the part of the Python docs it comes from. The debugger's
# commands (pdb) belong to none of these and are left out, as are topics a later Python adds (until named here).
CHAPTERS = {
    "lexical analysis": ("floating", "formatstrings", "id-classes", "identifiers", "imaginary", "integers",
                         "numbers", "strings"),
    "data model": ("attribute-access", "callable-types", "context-managers", "customization", "numeric-types",
                   "objects", "sequence-types", "specialattrs", "specialnames", "types"),
    "execution model": ("dynamic-features", "exceptions", "execmodel", "naming"),
    "expressions": ("atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
                    "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "in", "lambda", "lists",
                    "operator-summary", "power", "shifting", "slicings", "subscriptions", "unary"),
    "statements": ("assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del",
                   "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try",
                   "while", "with", "yield"),
    "built-in types": ("bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
                       "string-methods", "truth", "typesfunctions", "typesmapping", "typesmethods", "typesmodules",
                       "typesseq", "typesseq-mutable"),
}
BUILTIN_TASKS = ("builtin:python-docs-chapters",)
_SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation", "valid", "dev")}


def python_docs_chapters() -> tuple[list[str], list[str]]:
    """The Python docs' paragraphs (as `builtin:python-docs` makes them) and the part of the docs each comes from.
    A paragraph that topics of two parts share word for word is left out: it has no one answer."""
    chapter_of = {topic: chapter for chapter, names in CHAPTERS.items() for topic in names}
    seen: dict[str, str | None] = {}
    for key in sorted(topics):
        chapter = chapter_of.get(key)
        if chapter is None:
            continue
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if para:
                seen[para] = chapter if seen.get(para, chapter) == chapter else None
    kept = [(t, c) for t, c in seen.items() if c is not None]
    return [t for t, _ in kept], [c for _, c in kept]


def _column(records: Dataset, name: str, what: str) -> list:
    flat = records.flatten()
    if name not in flat.column_names:
        raise MlmtuneError(f"the task's records have no field {name!r} (its {what} field); their fields are: "
                           f"{', '.join(flat.column_names)}")
    return flat.select_columns([name]).with_format("arrow")[:][name]


def _pairs(records: Dataset, cfg: TaskConfig, where: str) -> tuple[list[str], list]:
    """(texts, labels) of a split; records with no text or no label are left out, with a count."""
    texts_col, labels_col = _column(records, cfg.text_field, "text"), _column(records, cfg.label_field, "label")
    texts = text_values(texts_col, cfg.text_field)
    labels = labels_col.to_pylist()
    if any(isinstance(y, list | dict) for y in labels):
        raise MlmtuneError(f"the task's label field {cfg.label_field} holds lists or records, not one label per text: "
                           f"the probe learns one class per text")
    kept = [(t, y) for t, y in zip(texts, labels) if t.strip() and y is not None]
    if len(kept) < len(texts):
        warn(f"{len(texts) - len(kept):,} of {len(texts):,} records of {where} have no text or no label; left out")
    if not kept:
        raise MlmtuneError(f"{where} holds no record with both a text ({cfg.text_field}) and a label "
                           f"({cfg.label_field})")
    return [t for t, _ in kept], [y for _, y in kept]


def _split_files(folder: Path) -> dict[str, Path] | None:
    """A folder's train.* and test.* (or validation.*) files, when it has them."""
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        for split, names in _SPLIT_NAMES.items():
            if f.is_file() and f.stem.lower() in names and split not in found:
                found[split] = f
    return found if "train" in found and "test" in found else None


def _hub_split(cfg: TaskConfig, names: tuple[str, ...]) -> Dataset | None:
    for name in names:
        try:
            return load_records(DataConfig(dataset=cfg.task, split=name))
        except MlmtuneError as e:
            if "split" not in str(e).lower():
                raise
    return None


def _raw_splits(cfg: TaskConfig) -> tuple[tuple[list[str], list], tuple[list[str], list] | None]:
    """(train texts, labels) and the task's own test split, or None."""
    name = cfg.task or ""
    if name in BUILTIN_TASKS:
        return python_docs_chapters(), None
    if name.startswith("builtin:"):
        raise MlmtuneError(f"unknown built-in task {name!r}; the built-in task is {', '.join(BUILTIN_TASKS)}")
    path = Path(name).expanduser()
    if path.is_dir() and (files := _split_files(path)):
        return (_pairs(load_records(DataConfig(dataset=str(files["train"]))), cfg, str(files["train"])),
                _pairs(load_records(DataConfig(dataset=str(files["test"]))), cfg, str(files["test"])))
    if path.exists():
        return _pairs(load_records(DataConfig(dataset=name)), cfg, name), None
    train = load_records(DataConfig(dataset=name, split="train"))  # a Hub dataset (or the path error)
    test = _hub_split(cfg, _SPLIT_NAMES["test"])
    return _pairs(train, cfg, f"{name} (train)"), None if test is None else _pairs(test, cfg, f"{name} (test)")


def _classes(labels: list) -> list:
    """The distinct labels in a stable order: numbers by value, anything else by its text."""
    distinct = set(labels)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return sorted(distinct, key=lambda v: (type(v).__name__, str(v)))


def _stratified(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, second) with about `share` of each class in the second, drawn by `seed`; a class of one
    example stays in the first."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = min(max(round(share * len(idx)), 1), len(idx) - 1) if len(idx) > 1 else 0
        second.append(idx[:n])
        first.append(idx[n:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def _sample(labels: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """At most `limit` indices, a stratified sample drawn by `seed` (all of them, in order, without a limit)."""
    if limit is None or len(labels) <= limit:
        return torch.arange(len(labels))
    _, kept = _stratified(labels, limit / len(labels), seed)
    return kept


class TaskData:
    """The task's labelled texts, read once: `texts` holds the train pool and then the task's own test split (if
    any); `split(seed)` says which of them each seed trains and tests on."""

    def __init__(self, cfg: TaskConfig, seed: int):
        self.cfg = cfg
        disable_progress_bar()  # a task is small: datasets' bars would only crowd the output
        try:
            (train_texts, train_labels), test = _raw_splits(cfg)
        finally:
            enable_progress_bar()
        values = _classes(train_labels)
        if len(values) < 2:
            raise MlmtuneError(f"the task {cfg.task} has one class ({values[0]!r} in its label field "
                               f"{cfg.label_field}): a classifier needs at least two")
        if test is not None:
            unseen = sorted({str(v) for v in set(test[1]) - set(values)})
            if unseen:
                raise MlmtuneError(f"the task's test split has labels its train split lacks ({', '.join(unseen[:5])}"
                                   f"{', ...' if len(unseen) > 5 else ''}): no classifier can learn them")
        index = {v: i for i, v in enumerate(values)}
        self.name = str(cfg.task)
        self.classes = [str(v) for v in values]
        parts = [(train_texts, torch.tensor([index[y] for y in train_labels]))]
        if test is not None:
            parts.append((test[0], torch.tensor([index[y] for y in test[1]])))
        # --max-examples: one stratified sample of each part, drawn by the first seed, shared by every run
        kept = [(texts, labels, _sample(labels, cfg.max_examples, seed)) for texts, labels in parts]
        self.texts = [texts[i] for texts, _, idx in kept for i in idx.tolist()]
        self.labels = torch.cat([labels[idx] for _, labels, idx in kept])
        self.n_train = len(kept[0][2])
        self.own_split = test is not None

    def split(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into `texts` of the seed's train and test examples: the task's own test split, or one drawn by
        the seed (stratified)."""
        pool = torch.arange(self.n_train)
        if self.own_split:
            train, test = pool, torch.arange(self.n_train, len(self.texts))
        else:
            tr, te = _stratified(self.labels[pool], self.cfg.test_size, seed)
            train, test = pool[tr], pool[te]
        if len(test) == 0:
            raise MlmtuneError(f"the task {self.name} has too few texts for a test split ({self.n_train} in all)")
        return train, test

    def describe(self, seeds: list[int]) -> str:
        train, test = self.split(seeds[0])
        split = "its own test split" if self.own_split else "a test split drawn by each seed, stratified"
        return (f"{self.name}: {len(train):,} train and {len(test):,} test texts, {len(self.classes)} classes "
                f"({split})")
