"""The tokenizers checked in under tests/assets/ are what tests/assets/make_tokenizers.py makes, and behave as the
tokenizers of the model families they stand in for."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import TOKENIZERS, asset_tokenizer

from mlmtune.data.corpora import python_docs_texts


def _script():
    spec = importlib.util.spec_from_file_location("make_tokenizers", TOKENIZERS.parent / "make_tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_tokenizers_are_what_the_script_makes(tmp_path):
    """Byte for byte, where this Python ships the docs they were trained on (the docs change between versions).
    WordPiece's trainer picks the same pieces every time but numbers the single characters in another order (so
    a session that trained its own had other ids each time): its vocabulary is compared as a set."""
    make = _script()
    manifest = json.loads((TOKENIZERS / "MANIFEST.json").read_text())
    if make.texts_digest(python_docs_texts()) != manifest["texts_sha256"]:
        pytest.skip(f"this Python's docs are not the ones the assets were trained on (Python {manifest['python']})")
    made = make.make(tmp_path)
    assert made == {**manifest, "python": made["python"]}
    files = sorted(p.relative_to(TOKENIZERS) for p in TOKENIZERS.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        ours, theirs = (TOKENIZERS / rel).read_text(), (tmp_path / rel).read_text()
        if rel.parts[0] == "bert-wordpiece" and rel.name == "vocab.txt":
            assert sorted(ours.splitlines()) == sorted(theirs.splitlines()), rel
        elif rel.parts[0] == "bert-wordpiece" and rel.name == "tokenizer.json":
            ours, theirs = json.loads(ours), json.loads(theirs)
            assert set(ours["model"].pop("vocab")) == set(theirs["model"].pop("vocab"))
            assert ours == theirs
        elif rel.name != "MANIFEST.json":
            assert ours == theirs, rel


@pytest.mark.parametrize(("name", "mask", "ids"), [
    ("roberta-bpe", "<mask>", ("<s>", "</s>")),
    ("bert-wordpiece", "[MASK]", ("[CLS]", "[SEP]")),
    ("eurobert-bpe", "<|mask|>", ("<|begin_of_text|>", "<|end_of_text|>"))])
def test_each_tokenizer_loads_and_behaves(name, mask, ids):
    """600 pieces; the family's mask token and the special tokens around a text; the docs' text comes back from its
    pieces (lower-cased by WordPiece); a word of the docs is one piece, a made-up one several."""
    tok = asset_tokenizer(name)
    assert tok.is_fast and len(tok) == 600 and tok.mask_token == mask and tok.model_max_length == 64
    text = "The return statement leaves the current function call."
    enc = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens([enc[0], enc[-1]]) == list(ids)
    decoded = tok.decode(enc, skip_special_tokens=True).strip()
    assert decoded == (text.lower() if name == "bert-wordpiece" else text)
    assert len(tok.tokenize(" return")) == 1 and len(tok.tokenize(" zqxjv")) > 1
    masked = tok(f"The {mask} statement.")["input_ids"]
    assert masked.count(tok.mask_token_id) == 1
