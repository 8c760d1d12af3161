"""The Keras backend: weights ported both ways match PyTorch's logits, `--backend keras` trains like
`--backend torch` on the same masks, resumes after an interruption, and its folder fills in the pipeline."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("keras_hub", reason="the [keras] extra is not installed")
pytest.importorskip("tensorflow", reason="the [keras] extra is not installed")
from transformers import (  # noqa: E402
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    pipeline,
)

import mlmtune.keras as mk  # noqa: E402
from mlmtune.cli import main  # noqa: E402
from mlmtune.data.masking import IGNORE_INDEX, Masker, fixed_eval_masks  # noqa: E402
from mlmtune.errors import MlmtuneError  # noqa: E402
from mlmtune.evaluation.perplexity import perplexity  # noqa: E402
from mlmtune.keras.data import keras_batch  # noqa: E402
from mlmtune.model.load import load_model  # noqa: E402
from mlmtune.training.train import train  # noqa: E402

mk.require()
ATOL = 1e-4


def _randomize(model, seed: int):
    """Every weight away from its init (LayerNorms at 1/0 and zero biases would hide a weight ported to the
    wrong place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def _tiny(family: str, tokenizer, seed: int = 0):
    """A tiny random masked-LM of a family, sized to the test tokenizer."""
    torch.manual_seed(seed)
    v, pad = len(tokenizer), tokenizer.pad_token_id
    if family == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64, pad_token_id=pad))
    elif family == "roberta":  # type_vocab_size 1, as roberta-base: its one token-type row is folded
        model = RobertaForMaskedLM(RobertaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64, type_vocab_size=1,
                                                 max_position_embeddings=66, pad_token_id=pad, layer_norm_eps=1e-5))
    else:
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                       max_position_embeddings=64, pad_token_id=pad))
    return _randomize(model, seed)


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir, tiny_bert_dir):
    _, roberta = load_model(str(tiny_model_dir))
    _, bert = load_model(str(tiny_bert_dir))
    distil = DistilBertTokenizerFast(vocab=str(tiny_bert_dir / "vocab.txt"), model_max_length=64)
    return {"bert": bert, "roberta": roberta, "distilbert": distil}


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["The with statement is used to wrap the execution of a block.",
         "A function definition is an executable statement.", "Names refer to objects."]


def _keras_logits(model, tokenizer, ids, attention, positions):
    x = {"token_ids": ids.numpy().astype(np.int32), "padding_mask": attention.numpy().astype(np.int32),
         "mask_positions": positions.astype(np.int32)}
    if "token_type_ids" in tokenizer.model_input_names:
        x["segment_ids"] = np.zeros_like(x["token_ids"])
    return np.asarray(model(x, training=False))


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_hf_to_keras_gives_pytorchs_logits_and_back_after_a_keras_step(family, tokenizers):
    tokenizer = tokenizers[family]
    hf = _tiny(family, tokenizer)
    model = mk.from_hf(hf)
    ids, attention = _batch(tokenizer, TEXTS)  # rows of different lengths: padding on the right
    positions = np.stack([np.arange(1, 6), np.arange(2, 7), np.arange(0, 5)])  # real tokens of each row
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=attention).logits.numpy()
    want = np.take_along_axis(reference, positions[:, :, None], axis=1)
    np.testing.assert_allclose(_keras_logits(model, tokenizer, ids, attention, positions), want, atol=ATOL, rtol=0)

    # one Keras training step moves every weight; a fresh Hugging Face model of other weights takes them all
    mk.compile(model, learning_rate=1e-2)
    masker = Masker.from_tokenizer(tokenizer)
    blocks = torch.randint(5, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    model.train_on_batch(*keras_batch(*masker(blocks, torch.Generator().manual_seed(2)), "token_type_ids" in
                                      tokenizer.model_input_names)[:2])
    back = _tiny(family, tokenizer, seed=5)
    from mlmtune.keras.convert import keras_to_hf

    keras_to_hf(model, back)
    with torch.no_grad():
        reference = back(input_ids=ids, attention_mask=attention).logits.numpy()
    after = _keras_logits(model, tokenizer, ids, attention, positions)
    assert np.abs(after - want).max() > 1e-2  # the step changed the model
    np.testing.assert_allclose(after, np.take_along_axis(reference, positions[:, :, None], axis=1), atol=ATOL, rtol=0)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_head_warmup_gradients_are_pytorchs_head_only_gradients(family, tokenizers):
    """In the head warm-up the tied token embedding learns from the head's gradient alone, not through the
    encoder's backward pass: the Keras gradients equal PyTorch's head-only ones."""
    import keras
    import tensorflow as tf

    from mlmtune.keras.engine import freeze_backbone, head_model
    from mlmtune.model.forward import MaskedLMLoss, freeze_encoder, positions_and_targets

    tokenizer = tokenizers[family]
    hf = _tiny(family, tokenizer).eval()  # no dropout on either side
    model = mk.from_hf(hf)
    freeze_backbone(model, True)
    trainer = head_model(model)
    blocks = torch.randint(5, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    inputs, labels = Masker.from_tokenizer(tokenizer)(blocks, torch.Generator().manual_seed(2))
    x, y, w = keras_batch(inputs, labels, "token_type_ids" in tokenizer.model_input_names)
    with tf.GradientTape() as tape:
        nll = keras.losses.sparse_categorical_crossentropy(y, trainer(x, training=False), from_logits=True)
        total = tf.reduce_sum(nll * w)
    grads = {v.path: tf.convert_to_tensor(g).numpy()
             for v, g in zip(trainer.trainable_variables, tape.gradient(total, trainer.trainable_variables))}
    embedding = model.backbone.token_embedding.embeddings.path
    assert all(path == embedding or path.startswith("mlm_head/") for path in grads)  # the encoder is frozen

    freeze_encoder(hf, True)
    positions, targets = positions_and_targets(labels)
    reference = MaskedLMLoss(hf)(inputs, positions, targets, head_only=True)
    reference.backward()
    assert float(total) == pytest.approx(float(reference), rel=1e-5)
    np.testing.assert_allclose(grads[embedding], hf.get_output_embeddings().weight.grad.numpy(), atol=1e-5, rtol=0)
    assert hf.get_input_embeddings().weight is hf.get_output_embeddings().weight  # one tied matrix, as in Keras


def test_save_pretrained_fills_like_keras_in_the_pipeline(tiny_bert_dir, tmp_path):
    model, tokenizer = mk.load_masked_lm(str(tiny_bert_dir)), mk.load_tokenizer(str(tiny_bert_dir))
    mk.compile(model, learning_rate=1e-2)
    masker = Masker.from_tokenizer(tokenizer)
    blocks = torch.randint(5, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(3))
    x, y, w = keras_batch(*masker(blocks, torch.Generator().manual_seed(4)), True)
    model.train_on_batch(x, y, sample_weight=w)
    out = mk.save_pretrained(model, tokenizer, tmp_path / "saved")
    with pytest.raises(MlmtuneError, match="not empty"):
        mk.save_pretrained(model, tokenizer, out)  # never over files it may not have written

    fill = pipeline("fill-mask", model=str(out))
    for text in ["a function is defined with the [MASK] keyword.", "[MASK] statements exit a loop."]:
        theirs, ours = fill(text, top_k=5), mk.fill(model, tokenizer, text, top_k=5)
        assert [p["token"] for p in ours] == [p["token"] for p in theirs]
        assert [p["sequence"] for p in ours] == [p["sequence"] for p in theirs]
        np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in theirs], atol=1e-5)


def test_keras_batch_is_the_masks_in_keras_hubs_shape():
    inputs = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    labels = torch.tensor([[IGNORE_INDEX, 60, IGNORE_INDEX, 80], [IGNORE_INDEX] * 4])
    x, y, w = keras_batch(inputs, labels, segments=False)
    assert x["mask_positions"].tolist() == [[1, 3], [0, 0]]
    assert y.tolist() == [[60, 80], [0, 0]] and w.tolist() == [[1, 1], [0, 0]]
    assert x["padding_mask"].all() and x["token_ids"].tolist() == inputs.tolist() and "segment_ids" not in x


# the comparison run: 6 head-only steps, then the whole model, 24 steps in all, on both backends
KERAS_RUN = {"batch_size": 8, "max_steps": 24, "learning_rate": 2e-3, "warmup_steps": 4, "save_steps": 8,
             "head_warmup_steps": 6, "head_learning_rate": 5e-3, "logging_steps": 4}


@pytest.fixture(scope="module")
def keras_run(configs, tmp_path_factory):
    cfg = configs(tmp_path_factory.mktemp("keras-run") / "keras", backend="keras", **KERAS_RUN)
    return cfg, train(cfg, progress=False)


@pytest.mark.slow  # the Keras run and its comparison (~10 s); the conversions and the step stay in the default suite
def test_keras_backend_learns_like_the_torch_backend(keras_run, configs, tmp_path):
    cfg, result = keras_run
    k = result.metrics
    t = train(configs(tmp_path / "torch", **KERAS_RUN), progress=False).metrics
    assert k["backend"] == "keras" and t["backend"] == "torch"
    # the same model, eval blocks and masks (RoBERTa's token-type row folded into its positions: rounding only)
    assert k["eval_loss_before"] == pytest.approx(t["eval_loss_before"], abs=1e-6)
    assert k["eval_loss_after"] < k["eval_loss_before"] - 0.3  # it learned
    # measured apart on the same masks, head warm-up included: eval 0.12%, 4-step loss windows at most 0.57%
    # (dropout draws differ), against a drop of 7% in eval loss
    assert k["eval_loss_after"] == pytest.approx(t["eval_loss_after"], rel=0.004)
    for a, b in zip(k["train_loss"], t["train_loss"]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=0.015)

    # the folder is an ordinary Hugging Face one, and it scores what the run reported
    out = result.output_dir
    model = AutoModelForMaskedLM.from_pretrained(out)
    _, tokenizer = load_model(str(out))
    from mlmtune.data.blocks import Blocks
    from mlmtune.data.prepare import prepare_blocks

    blocks, _ = prepare_blocks(cfg.data, tokenizer, cfg.seed)
    inputs, labels = fixed_eval_masks(Blocks(blocks["test"]), Masker.from_tokenizer(tokenizer), cfg.seed)
    assert perplexity(model, inputs, labels, progress=False).loss == pytest.approx(k["eval_loss_after"], abs=1e-5)
    assert main(["fill", "--model", str(out), "--json", "The <mask> statement."]) == 0


@pytest.mark.slow  # ~11 s: two more Keras runs
def test_keras_resume_after_ctrl_c_ends_like_an_uninterrupted_run(keras_run, tmp_path):
    cfg, full = keras_run
    out = tmp_path / "interrupted"

    def ctrl_c(step, seconds):
        if step == 11:
            signal.raise_signal(signal.SIGINT)  # what the terminal sends

    first = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, output_dir=str(out)))
    with pytest.raises(MlmtuneError, match="interrupted at step 11; checkpoint saved in .*step-0000011"):
        train(first, progress=False, on_step=ctrl_c)
    resumed = train(dataclasses.replace(first, output=dataclasses.replace(first.output, resume=True)),
                    progress=False).metrics
    assert resumed["train_steps"] == 24
    # measured: identical to the last digit on a 2-core AVX2 EPYC; 1e-6 leaves room for threaded CPU kernels
    assert resumed["eval_loss_after"] == pytest.approx(full.metrics["eval_loss_after"], abs=1e-6)


@pytest.mark.slow  # a child process that imports TensorFlow
def test_keras_resume_after_a_kill_ends_like_an_uninterrupted_run(keras_run, configs, tmp_path):
    """SIGKILL at step 11 leaves the step-8 checkpoint (no save on the way out); --resume goes on from it."""
    cfg, full = keras_run
    out = tmp_path / "killed"
    flags = configs.flags(out, backend="keras", **KERAS_RUN)
    code = ("import json, os, signal, sys\n"
            "from mlmtune.config import TrainConfig\n"
            "from mlmtune.options import resolve\n"
            "from mlmtune.training.train import train\n"
            "def on_step(step, seconds):\n"
            "    if step == 11:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "train(resolve(TrainConfig, {}, json.loads(sys.argv[1])), progress=False, on_step=on_step)\n")
    killed = subprocess.run([sys.executable, "-c", code, json.dumps(flags)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000008"]
    assert not (out / "metrics.json").exists()
    resumed = train(configs(out, backend="keras", resume=True, **KERAS_RUN), progress=False).metrics
    assert resumed["train_steps"] == 24
    assert resumed["eval_loss_after"] == pytest.approx(full.metrics["eval_loss_after"], abs=1e-6)


def test_keras_refuses_what_it_cannot_train(tmp_path, eli5_like, cache_dir, capsys, monkeypatch, tokenizers):
    from transformers import ElectraConfig, ElectraForMaskedLM

    folder = tmp_path / "electra"
    ElectraForMaskedLM(ElectraConfig(vocab_size=600, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tokenizers["bert"].save_pretrained(folder)
    args = ["train", "--backend", "keras", "--model", str(folder), "--dataset", str(eli5_like), "--text-field",
            "answers.text", "--cache-dir", cache_dir, "--max-steps", "2", "--output-dir", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "cache").exists()  # refused before any data was read
    refusal = ("--backend keras supports the bert, distilbert, roberta families; this model is 'electra': use "
               "--backend torch")
    assert err[-1] == f"mlmtune: error: {refusal}"
    check = ["check", *args[1:-2], "--no-probe"]  # `mlmtune check` names the same refusal
    assert main(check) == 1
    assert f"error  {refusal}" in capsys.readouterr().out

    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if never installed
    assert main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'mlmtune: error: --backend keras needs keras-hub, which is not installed: pip install "mlmtune[keras]"')


@pytest.mark.slow  # ~10 s: two Keras epochs through the docs' code
def test_docs_keras_code_runs_on_a_tiny_model(tiny_model_dir, eli5_like, tmp_path, monkeypatch, capsys):
    """docs/keras.md's rewrite of the guide's Keras code, with a tiny model, a tiny corpus and two epochs."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "keras.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    (code,) = [block for block in blocks if "mk.load_masked_lm" in block]
    out = tmp_path / "my_awesome_eli5_mlm_model"
    for old, new in [("distilbert/distilroberta-base", str(tiny_model_dir)),
                     ("path/to/eli5_copy.jsonl", str(eli5_like)), ("epochs=3", "epochs=2"),
                     ("block_size=128", "block_size=32"), ('"my_awesome_eli5_mlm_model"', repr(str(out)))]:
        assert old in code
        code = code.replace(old, new)
    monkeypatch.setenv("MLMTUNE_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "docs/keras.md", "exec"), scope)
    assert not [w for w in caught if "ran out of data" in str(w.message)]  # the datasets know their length

    history = scope["history"].history
    assert len(history["loss"]) == len(history["val_loss"]) == 2  # every epoch ran
    assert capsys.readouterr().out.strip().endswith(f"Perplexity: {np.exp(history['val_loss'][-1]):.2f}")
    # the validation set is masked the same way each pass: its loss is the model's, one evaluation of it
    test_set, model = scope["test_set"], scope["model"]
    again = model.evaluate(test_set, verbose=0)
    assert again == pytest.approx(history["val_loss"][-1], rel=1e-5)
    assert model.evaluate(test_set, verbose=0) == pytest.approx(again, rel=1e-6)
    # the trained weights went into the folder: the pipeline on it fills as mk.fill did on the Keras model
    fills = scope["fills"]
    ref = pipeline("fill-mask", model=str(out), top_k=3)("The Milky Way is a <mask> galaxy.")
    assert [f["token"] for f in fills] == [r["token"] for r in ref]
    assert [f["sequence"] for f in fills] == [r["sequence"] for r in ref]
    np.testing.assert_allclose([f["score"] for f in fills], [r["score"] for r in ref], atol=1e-5)
    start = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).state_dict()
    trained = AutoModelForMaskedLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)


def test_keras_time_budget_is_planned_from_the_keras_probe(configs, tmp_path, monkeypatch):
    """--time-budget with --backend keras counts steps from Keras' own step time, not PyTorch's."""
    from mlmtune.keras.engine import KerasEngine

    asked = []

    def fake_probe(cfg, hf_model, tokenizer, train_blocks, device):
        assert len(train_blocks) > 0 and cfg.backend == "keras"
        return lambda head_only: asked.append(head_only) or 2.0  # seconds per step

    monkeypatch.setattr(KerasEngine, "probe", staticmethod(fake_probe))
    metrics = train(configs(tmp_path / "out", backend="keras", time_budget="20s", max_steps=None, batch_size=8),
                    progress=False).metrics
    assert asked == [False]  # the folder has a head: no head-only probe
    assert metrics["train_steps"] == 9  # (20 s less the probe's own time) / 2 s a step, rounded down


def test_check_estimates_a_keras_run_with_the_keras_probe(tiny_model_dir, eli5_like, tmp_path, monkeypatch, capsys):
    from mlmtune.keras.engine import KerasEngine

    monkeypatch.setattr(KerasEngine, "probe", staticmethod(lambda *args: lambda head_only: 7.0))  # s per Keras step
    code = main(["check", "--backend", "keras", "--model", str(tiny_model_dir), "--dataset", str(eli5_like),
                 "--text-field", "answers.text", "--block-size", "32", "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--backend keras: the roberta family, on keras-hub" in out
    est = dict(kv.split(": ") for kv in out.split("estimate ")[1].strip().split(", "))
    assert float(est["seconds_per_step"]) == 7.0 and "peak_memory_gb" not in est  # TensorFlow's memory: not measured
    minutes, seconds = est["run_time"].rstrip("s").split("m")
    assert 60 * int(minutes) + int(seconds) >= 7 * int(est["total_steps"])


@pytest.mark.slow
def test_keras_trains_on_whole_word_masks(configs, tmp_path):
    """The Keras engine takes the same masks as PyTorch's: a whole-word run starts from the same eval, on its own
    masks and on the token scheme's, and learns."""
    k = train(configs(tmp_path / "keras", backend="keras", masking="whole-word", max_steps=6), progress=False).metrics
    t = train(configs(tmp_path / "torch", masking="whole-word", max_steps=6), progress=False).metrics
    assert k["masking"] == "whole-word"
    assert k["eval_loss_before"] == pytest.approx(t["eval_loss_before"], abs=1e-6)
    assert k["token_eval_loss_before"] == pytest.approx(t["token_eval_loss_before"], abs=1e-6)
    assert k["eval_loss_after"] < k["eval_loss_before"] - 0.05


@pytest.mark.slow
def test_keras_trains_a_grown_vocabulary(configs, tmp_path):
    """--add-tokens with the Keras engine: the grown model converts, starts where PyTorch's starts, and learns."""
    words = tmp_path / "words.txt"
    words.write_text("interpreter\nidentifier\ncoroutine\n")
    k = train(configs(tmp_path / "keras", backend="keras", add_tokens=str(words), max_steps=4), progress=False).metrics
    t = train(configs(tmp_path / "torch", add_tokens=str(words), max_steps=4), progress=False).metrics
    assert k["added_tokens"] == t["added_tokens"] == 3
    assert k["eval_loss_before"] == pytest.approx(t["eval_loss_before"], abs=1e-6)
    assert k["eval_loss_after"] < k["eval_loss_before"] - 0.05
    assert (tmp_path / "keras" / "added_tokens.txt").read_text() == "interpreter\nidentifier\ncoroutine\n"


def test_keras_output_of_a_sentence_encoder_keeps_its_modules(configs, sentence_dir, tmp_path):
    """The Keras engine writes its output through the same `write_output`: SentenceTransformer loads it with the
    start's modules and the weights Keras trained."""
    st = pytest.importorskip("sentence_transformers", reason="the [test] extra brings sentence-transformers")
    from safetensors.torch import load_file

    out = tmp_path / "keras"
    m = train(configs(out, backend="keras", model=str(sentence_dir), max_steps=2), progress=False).metrics
    model = st.SentenceTransformer(str(out), device="cpu")
    assert [type(x).__name__ for x in model] == ["Transformer", "Pooling", "Normalize"]
    trained = load_file(str(out / "model.safetensors"))["bert.encoder.layer.1.output.dense.weight"]
    start = load_file(str(sentence_dir / "model.safetensors"))["bert.encoder.layer.1.output.dense.weight"]
    assert torch.equal(model[0].auto_model.encoder.layer[1].output.dense.weight, trained)
    assert not torch.equal(trained, start)
    from test_sentence import assert_within, st_retrieval  # sentence-transformers' evaluator on Keras' folder

    assert_within(m["embedding_mrr10_after"], st_retrieval(out, configs)["mrr10"])
