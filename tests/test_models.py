"""Today's encoders, ModernBERT (and mmBERT, a ModernBERT with another vocabulary) and EuroBERT, on every path the
older families take: the sparse head against the dense model, training, resume after a kill, fill against the
pipeline with their mask spellings, `check`, and the Keras refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from compare import assert_same_as_pipeline, assert_same_weights
from test_check import assert_measured, timed_check

from mlmtune.cli import main
from mlmtune.training.train import train

FAMILIES = ["modernbert_dir", "eurobert_dir"]


@pytest.fixture(scope="module")
def runs(request, configs, tmp_path_factory):
    """family -> an uninterrupted 6-step run of it (checkpoints at 2, 4, 6)."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family) / "run"
        model = request.getfixturevalue(family)
        result = train(configs(folder, model=str(model), max_steps=6), progress=False)
        out[family] = folder, result.metrics
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_head_loss_equals_the_dense_models(request, family):
    """The head at the masked positions only gives the dense model's own loss (its `labels` path)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmtune.data.masking import Masker
    from mlmtune.model.forward import has_sparse_head, masked_nll_sum

    folder = request.getfixturevalue(family)
    model, tok = AutoModelForMaskedLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    assert has_sparse_head(model)
    ids = torch.randint(len(tok.all_special_ids) + 5, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    inputs, labels = Masker.from_tokenizer(tok)(ids, torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll, count = masked_nll_sum(model, inputs, labels)
        dense = model(input_ids=inputs, labels=labels).loss
    torch.testing.assert_close(nll / count, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_fixed_mask_loss(runs, family):
    folder, m = runs[family]
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.05
    assert m["train_steps"] == 6 and (folder / "model.safetensors").is_file()


DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from mlmtune.config import TrainConfig
    from mlmtune.options import resolve
    from mlmtune.training.train import train
    kill_after = int(sys.argv[2])
    train(resolve(TrainConfig, {}, json.loads(sys.argv[1])), progress=False,
          on_step=lambda s, _: os.kill(os.getpid(), signal.SIGKILL) if s == kill_after else None)
""")


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_a_kill_ends_like_an_uninterrupted_run(request, runs, configs, tmp_path, family):
    full, _ = runs[family]
    out = tmp_path / "killed"
    flags = configs.flags(out, model=str(request.getfixturevalue(family)), max_steps=6)
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(flags), "3"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    train(configs(out, model=flags["model"], max_steps=6, resume=True), progress=False)
    from safetensors.torch import load_file

    assert_same_weights(out, load_file(str(full / "model.safetensors")))


@pytest.mark.numerics
@pytest.mark.parametrize("family, spelling", [("modernbert_dir", "<|mask|>"), ("eurobert_dir", "[MASK]"),
                                              ("eurobert_dir", "<mask>")])
def test_fill_equals_the_pipeline_in_any_mask_spelling(request, runs, family, spelling):
    from transformers import AutoTokenizer, pipeline

    from mlmtune.inference.fill import FillMask

    folder, _ = runs[family]
    own = AutoTokenizer.from_pretrained(folder).mask_token  # the only spelling the pipeline takes
    pipe, fill = pipeline("fill-mask", model=str(folder)), FillMask.from_pretrained(str(folder))
    for text in ("The {} statement is used in a loop.", "A function is {} with {} keyword."):
        assert_same_as_pipeline(fill(text.replace("{}", spelling), top_k=4), pipe(text.replace("{}", own), top_k=4))


def test_check_names_the_head_and_estimates_long_blocks(modernbert_dir, tmp_path, docs_texts, capsys):
    """ModernBERT takes the sparse head; a 1024-token block fits its 2,048 positions, and check measures it."""
    from transformers import AutoModelForMaskedLM

    long = tmp_path / "long-modernbert"
    model = AutoModelForMaskedLM.from_pretrained(modernbert_dir)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(long)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(modernbert_dir)
    tok.model_max_length = 2048
    tok.save_pretrained(long)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(docs_texts[:1200]))
    code, before, after, wall = timed_check(["check", "--model", str(long), "--dataset", str(corpus),
                                             "--block-size", "1024", "--batch-size", "2", "--cache-dir",
                                             str(tmp_path / "c")])
    assert code == 0
    out = capsys.readouterr().out
    assert "head: sparse (the vocabulary projection at the masked positions only; ModernBertForMaskedLM" in out
    assert "blocks of 1024 tokens" in out
    est = dict(kv.split(": ") for kv in out.split("estimate ")[1].strip().split(", "))
    assert_measured(est, before, after, wall)


def test_check_names_a_dense_head(tmp_path, tiny_bert_dir, eli5_like, capsys):
    from transformers import AutoTokenizer, ElectraConfig, ElectraForMaskedLM

    folder = tmp_path / "electra"
    ElectraForMaskedLM(ElectraConfig(vocab_size=600, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    assert main(["check", "--model", str(folder), "--dataset", str(eli5_like), "--text-field", "answers.text",
                 "--block-size", "32", "--no-probe", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "head: dense (the vocabulary projection at every position" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_keras_refuses_them_in_one_line(request, family, eli5_like, tmp_path, capsys):
    pytest.importorskip("keras_hub")
    folder = request.getfixturevalue(family)
    assert main(["train", "--backend", "keras", "--model", str(folder), "--dataset", str(eli5_like),
                 "--text-field", "answers.text", "--block-size", "32", "--output-dir", str(tmp_path / "o")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mlmtune: error: --backend keras supports the bert, distilbert, roberta families")
