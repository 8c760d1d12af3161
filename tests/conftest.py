"""Shared fixtures: tiny models (2 layers, hidden 32: RoBERTa, BERT, ModernBERT, EuroBERT) built once per
session on the tokenizers checked in under tests/assets/ (trained on the Python docs that ship with CPython, by
tests/assets/make_tokenizers.py); a small JSONL corpus; `filler` and `pipe`, mlmtune's fill and the
transformers pipeline it is compared with; the suite's one factory of training configs (`configs`); and the
reference run that several tests read (`reference_run`: tests that change a run copy it first)."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# pytest-xdist's workers (pyproject's -n) share the cores: each gets its share of threads, and so do the processes its
# tests start; every worker spinning on every core would slow tiny-model steps many times over
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests never touch the network: an unreachable Hub must already be handled, not waited for.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# the block cache of the test session lives in its own folder, never in the user's ~/.cache
os.environ["MLMTUNE_CACHE"] = tempfile.mkdtemp(prefix="mlmtune-test-cache-")
# and trackio's store (`--report-to trackio`) too: trackio reads the variable once, when it is first imported
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="mlmtune-test-trackio-")

TINY_BLOCK = 32


TOKENIZERS = Path(__file__).parent / "assets" / "tokenizers"  # checked in: tests/assets/make_tokenizers.py


def asset_tokenizer(name: str):
    """One of the checked-in tiny tokenizers (vocabulary 600, 64 positions): roberta-bpe, bert-wordpiece,
    eurobert-bpe."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    assert len(tok) == 600
    return tok


def save_asset_tokenizer(name: str, tok, folder: Path) -> None:
    """`tok.save_pretrained(folder)` plus the checked-in vocabulary files (vocab.txt, vocab.json, merges.txt) that a
    fast tokenizer loaded from tokenizer.json does not write again, and that slow tokenizers and keras-hub read."""
    for path in (TOKENIZERS / name).iterdir():
        if path.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(path, folder / path.name)
    tok.save_pretrained(folder)


@pytest.fixture(scope="session")
def docs_texts() -> list[str]:
    from mlmtune.data.corpora import python_docs_texts

    return python_docs_texts()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny RoBERTa masked-LM folder (random weights, the checked-in byte-level BPE tokenizer)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    folder = tmp_path_factory.mktemp("tiny-roberta")
    tok = asset_tokenizer("roberta-bpe")
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64 + 2, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1)
    model = RobertaForMaskedLM(config)
    model.save_pretrained(folder)
    save_asset_tokenizer("roberta-bpe", tok, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT masked-LM folder: WordPiece tokenizer whose mask token is `[MASK]`."""
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = asset_tokenizer("bert-wordpiece")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(folder)
    save_asset_tokenizer("bert-wordpiece", tok, folder)
    return folder


def sentence_folder(source: Path, folder: Path, pooling: str = "mean", normalize: bool = True) -> Path:
    """A copy of a model folder made a sentence-transformers model, as all-MiniLM-L6-v2 is on the Hub: the
    encoder at the root (the Transformer module), `1_Pooling/config.json` in sentence-transformers' older format,
    Normalize (without a folder, as the built-in model ships it), `sentence_bert_config.json` and
    `config_sentence_transformers.json`."""
    shutil.copytree(source, folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
         "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"__version__": {"sentence_transformers": "2.0.0"}, "prompts": {}, "default_prompt_name": None}))
    return folder


@pytest.fixture(scope="session")
def sentence_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT as a sentence encoder (mean pooling, normalised): `sentence_folder` of it."""
    return sentence_folder(tiny_bert_dir, tmp_path_factory.mktemp("tiny-sentence") / "encoder")


@pytest.fixture(scope="session")
def _tiny_loaded(tiny_model_dir):
    from mlmtune.model.load import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture()
def tiny(_tiny_loaded):
    """(model, tokenizer), deep-copied per test so no test can leak state into another."""
    model, tokenizer = _tiny_loaded
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def filler(tiny_model_dir):
    """The tiny RoBERTa as a `FillMask` (batch size 32), loaded once: tests that change it use monkeypatch."""
    from mlmtune.inference.fill import FillMask

    return FillMask.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def pipe(tiny_model_dir):
    """The independent reference for every fill: transformers' `pipeline("fill-mask")` on the tiny RoBERTa."""
    from transformers import pipeline

    return pipeline("fill-mask", model=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def inductor_agrees() -> bool:
    """Whether inductor compiles a RoBERTa layer right on this machine: the layer's output, compiled, equal to its
    eager output (fp32, 1e-4). Under ATen's AVX2 kernels (CI's third run) torch 2.13 compiles it wrong: the slow
    --compile tests then expect mlmtune's refusal."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    layer = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)).eval().encoder.layer[0]
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="inductor")(x)
    eager, compiled = (o[0] if isinstance(o, tuple) else o for o in (eager, compiled))
    torch._dynamo.reset()
    return bool((eager - compiled).abs().max() < 1e-4)


@pytest.fixture(scope="session")
def eli5_like(tmp_path_factory, docs_texts) -> Path:
    """An ELI5-shaped JSONL file: nested `answers.text` lists of strings, plus a title."""
    path = tmp_path_factory.mktemp("eli5") / "eli5_like.jsonl"
    with path.open("w") as f:
        for i in range(0, 600, 3):
            f.write(json.dumps({"q_id": str(i), "title": docs_texts[i][:40],
                                "answers": {"a_id": [f"a{i}", f"b{i}"], "text": docs_texts[i + 1 : i + 3],
                                            "score": [1, 2]}}) + "\n")
    return path


@pytest.fixture()
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> str:
    """One block cache for the training runs of the session (tests of the cache itself use `cache_dir`)."""
    return str(tmp_path_factory.mktemp("blocks-cache"))


class Configs:
    """Training configs on the tiny model and the ELI5-shaped corpus: 8 steps of 4 blocks of 32 tokens at
    lr 1e-2 in fp32, a checkpoint every 2 steps, a log line every step, no general check, no cloze. Any field can be
    overridden."""

    def __init__(self, model: Path, dataset: Path, cache: str):
        self.base = {"model": str(model), "dataset": str(dataset), "text_field": "answers.text", "block_size": 32,
                     "batch_size": 4, "max_steps": 8, "learning_rate": 1e-2, "save_steps": 2, "save_total_limit": 10,
                     "logging_steps": 1, "precision": "fp32", "cache_dir": cache, "general_eval": "none",
                     "cloze_words": "none"}

    def flags(self, out: Path | str, **over: Any) -> dict[str, Any]:
        """The options as a flat dict (what a child process resolves again)."""
        return {**self.base, "output_dir": str(out), **over}

    def __call__(self, out: Path | str, **over: Any):
        from mlmtune.config import TrainConfig
        from mlmtune.options import resolve

        return resolve(TrainConfig, {}, self.flags(out, **over))


@pytest.fixture(scope="session")
def configs(tiny_model_dir, eli5_like, session_cache) -> Configs:
    return Configs(tiny_model_dir, eli5_like, session_cache)


@dataclass(frozen=True)
class Reference:
    """A finished, uninterrupted run: what every interrupted, resumed or otherwise changed run must reach."""

    folder: Path
    metrics: dict[str, Any]
    weights: dict[str, torch.Tensor]

    def checkpoint(self, step: int) -> Path:
        return self.folder / "checkpoints" / f"step-{step:07d}"

    def copy_up_to(self, step: int, out: Path) -> Path:
        """A run folder holding only this run's checkpoint of `step`, as if it had stopped there."""
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(self.checkpoint(step), out / "checkpoints" / f"step-{step:07d}")
        return out


@pytest.fixture(scope="session")
def reference_run(configs, tmp_path_factory) -> Reference:
    """`configs`' run, trained once for the session (checkpoints at steps 2, 4, 6 and 8). Read it; copy it
    to change it."""
    from safetensors.torch import load_file

    from mlmtune.training.train import train

    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(configs(out), progress=False)
    m = result.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.05  # it moved, so "ends equal" means something
    return Reference(out, m, load_file(str(out / "model.safetensors")))


@pytest.fixture(scope="session")
def modernbert_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """A tiny random ModernBERT (2 layers, hidden 32; layer 0 global attention, layer 1 local with a 16-token window,
    shorter than a 32-token block), on the tiny BERT's WordPiece tokenizer ([MASK])."""
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

    folder = tmp_path_factory.mktemp("tiny-modernbert")
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=64, global_attn_every_n_layers=2,
                              local_attention=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                              eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
                              sep_token_id=tok.sep_token_id)
    ModernBertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def eurobert_dir(tmp_path_factory) -> Path:
    """A tiny random EuroBERT (2 layers, hidden 32) with a byte-level BPE tokenizer whose mask is `<|mask|>`, as
    EuroBERT's own is."""
    from transformers import EuroBertConfig, EuroBertForMaskedLM

    folder = tmp_path_factory.mktemp("tiny-eurobert")
    tok = asset_tokenizer("eurobert-bpe")
    torch.manual_seed(0)
    config = EuroBertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            mask_token_id=tok.mask_token_id)
    EuroBertForMaskedLM(config).save_pretrained(folder)
    save_asset_tokenizer("eurobert-bpe", tok, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# a tiny model trained in the test on sentences whose masked words it can learn


@dataclass(frozen=True)
class Cities:
    folder: Path  # the trained model
    corpus: Path  # the text file it was trained on (10% held out, seed 42)


def _vocab() -> list[str]:
    words = ("the city of new york los angeles is big and old i live in we went to plants use make food from light "
             "need water a an people there many streets . , photo ##syn ##thesis").split()
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]


def _corpus(n: int = 1200) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        city = rng.choice(["new york", "los angeles"])
        out.append(rng.choice([f"i live in the city of {city} .", f"we went to the city of {city} .",
                               f"the city of {city} is big and old .", f"many people live in {city} .",
                               "plants use photosynthesis to make food from light .",
                               "photosynthesis needs light and water ."]))
    return out


@pytest.fixture(scope="session")
def cities_run(tmp_path_factory, configs) -> Cities:
    """A tiny BERT trained (whole-word masks) on sentences where only "new york" and "los angeles" follow "city of",
    and "photosynthesis" (photo ##syn ##thesis) is what plants use."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from mlmtune.training.train import train

    root = tmp_path_factory.mktemp("cities")
    (root / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    tok = BertTokenizerFast.from_pretrained(root, model_max_length=32)  # reads vocab.txt (v5 ignores vocab_file=)
    model_dir = root / "start"
    torch.manual_seed(0)
    # no dropout: 1200 steps on a toy corpus learn these words reliably only without it
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0,
                               pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus()))
    out = root / "trained"
    train(configs(out, model=str(model_dir), dataset=str(corpus), text_field="text", block_size=16,
                  batch_size=16, max_steps=1200, learning_rate=3e-3, warmup_steps=20, masking="whole-word",
                  mlm_probability=0.25, save_steps=1000, logging_steps=50, test_size=0.1), progress=False)
    return Cities(out, corpus)
