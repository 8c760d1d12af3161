"""Writes the test suite's three tiny tokenizers (vocabulary 600) into tests/assets/tokenizers/, trained on the
Python Language Reference that ships with CPython (`builtin:python-docs`):

- `roberta-bpe`: byte-level BPE as roberta-base has it (`<mask>` swallows the space before it);
- `bert-wordpiece`: lower-cased WordPiece as bert-base-uncased has it (`[MASK]`);
- `eurobert-bpe`: byte-level BPE whose specials are EuroBERT's (`<|mask|>`, `<|begin_of_text|>` ...).

The suite loads the checked-in files instead of training them each session. The docs differ between Python
versions, so `MANIFEST.json` records the sha256 of the texts they were trained on; `tests/test_assets.py`
regenerates them and compares byte for byte where this Python's docs are those texts.

    python tests/assets/make_tokenizers.py          # rewrite tests/assets/tokenizers/
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "tokenizers"
VOCAB = 600
MAX_LENGTH = 64
EUROBERT_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|mask|>", "<|pad|>"]


def roberta_bpe(texts: list[str], folder: Path):
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    # like roberta-base: the mask token swallows the space before it
    tok = RobertaTokenizerFast.from_pretrained(folder, model_max_length=MAX_LENGTH,
                                               mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
    tok.save_pretrained(folder)
    return tok


def bert_wordpiece(texts: list[str], folder: Path):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2, show_progress=False,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    folder.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(folder))
    tok = BertTokenizerFast.from_pretrained(folder, model_max_length=MAX_LENGTH)  # reads vocab.txt
    tok.save_pretrained(folder)
    return tok


def eurobert_bpe(texts: list[str], folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2, special_tokens=EUROBERT_SPECIALS,
                            show_progress=False)
    bpe._tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>",
        special_tokens=[(t, bpe.token_to_id(t)) for t in EUROBERT_SPECIALS[:2]])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EUROBERT_SPECIALS[0],
                                  eos_token=EUROBERT_SPECIALS[1], mask_token=EUROBERT_SPECIALS[2],
                                  pad_token=EUROBERT_SPECIALS[3], model_max_length=MAX_LENGTH)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


BUILDERS = {"roberta-bpe": roberta_bpe, "bert-wordpiece": bert_wordpiece, "eurobert-bpe": eurobert_bpe}


def _drop_load_context(folder: Path) -> None:
    """transformers writes how the tokenizer was loaded (`is_local`, `local_files_only`, which HF_HUB_OFFLINE
    turns on) into tokenizer_config.json; it says nothing about the tokenizer."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def texts_digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def make(root: Path = HERE) -> dict:
    """Train the three tokenizers into `root` and write its MANIFEST.json; returns the manifest."""
    from mlmtune.data.corpora import python_docs_texts

    texts = python_docs_texts()
    for name, build in BUILDERS.items():
        build(texts, root / name)
        _drop_load_context(root / name)
    manifest = {"trained_on": "builtin:python-docs", "texts_sha256": texts_digest(texts), "texts": len(texts),
                "python": sys.version.split()[0], "vocab_size": VOCAB, "tokenizers": sorted(BUILDERS)}
    (root / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    print(json.dumps(make(), indent=2))
