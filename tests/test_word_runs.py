"""Runs that mask whole words or spans: scored on their own masks and on the token scheme's, resumed exactly,
refused on a resume with another scheme, reproduced by `eval`, previewed by `check --show-masks`."""

from __future__ import annotations

import json

import pytest
from compare import assert_same_weights

from mlmtune.cli import main
from mlmtune.errors import MlmtuneError
from mlmtune.training.train import train


@pytest.fixture(scope="module")
def span_run(configs, tmp_path_factory):
    out = tmp_path_factory.mktemp("span") / "run"
    return out, train(configs(out, masking="span"), progress=False).metrics


@pytest.mark.numerics
def test_a_span_run_is_scored_on_its_own_masks_and_on_token_masks(span_run, reference_run):
    out, m = span_run
    ref = reference_run.metrics  # the token run: the same model, data and seed
    assert m["masking"] == "span" and ref["masking"] == "token"
    # before training both runs hold the same model: on token masks they score exactly what the token run scored
    assert m["token_eval_loss_before"] == ref["eval_loss_before"]
    assert m["eval_loss_before"] != ref["eval_loss_before"]  # its own masks are others
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.05
    assert m["token_eval_loss_after"] < m["token_eval_loss_before"] - 0.05
    card = (out / "README.md").read_text()
    assert "| masking | span |" in card and "after, on token masks" in card
    saved = (out / "mlmtune_config.yaml").read_text()
    assert "masking: span" in saved


@pytest.mark.numerics
def test_a_whole_word_run_resumes_exactly_and_refuses_another_scheme(configs, tmp_path):
    full = train(configs(tmp_path / "full", masking="whole-word", max_steps=6), progress=False)

    def stop_at_3(step, _seconds):
        if step == 3:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(MlmtuneError, match="interrupted at step 3"):
        train(configs(part, masking="whole-word", max_steps=6), progress=False, on_step=stop_at_3)
    with pytest.raises(MlmtuneError, match=r"other settings \(masking: 'whole-word' -> 'span'\)"):
        train(configs(part, masking="span", max_steps=6, resume=True), progress=False)
    resumed = train(configs(part, masking="whole-word", max_steps=6, resume=True), progress=False)
    from safetensors.torch import load_file

    assert_same_weights(part, load_file(str(tmp_path / "full" / "model.safetensors")))
    assert resumed.metrics["eval_loss_after"] == pytest.approx(full.metrics["eval_loss_after"], rel=1e-6)
    assert resumed.metrics["token_eval_loss_after"] == pytest.approx(full.metrics["token_eval_loss_after"], rel=1e-6)


def test_eval_reproduces_a_span_run_on_its_own_data(span_run, eli5_like, configs):
    from mlmtune.config import EvalConfig
    from mlmtune.evaluation.evaluate import run_eval
    from mlmtune.options import resolve

    out, m = span_run
    ev = run_eval(resolve(EvalConfig, {}, {"model": str(out), "dataset": str(eli5_like), "text_field": "answers.text",
                                           "cache_dir": configs.base["cache_dir"]}), progress=False)
    assert ev["masking"] == "span" and "span masking" in ev["scored"]
    assert ev["eval_loss"] == pytest.approx(m["eval_loss_after"], rel=1e-6)


def test_streaming_with_whole_words_trains(configs, tmp_path, docs_texts):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(docs_texts[:300]))
    m = train(configs(tmp_path / "run", dataset=str(corpus), text_field="text", streaming=True, eval_records=40,
                      masking="whole-word", max_steps=4), progress=False).metrics
    # it trained on what it streamed: 4 steps of 4 blocks of 32, and both losses fell
    assert m["train_steps"] == 4 and m["train_tokens"] == 4 * 4 * 32
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["token_eval_loss_after"] < m["token_eval_loss_before"]


def test_show_masks_is_what_training_masks(configs, tmp_path, capsys, monkeypatch):
    """`check --show-masks N --json` prints the blocks and masks that the first optimizer step trains on."""
    import mlmtune.training.torch_engine as engine_mod

    flags = configs.flags(tmp_path / "run", masking="whole-word", max_steps=1)
    args = ["check", "--show-masks", "3", "--json"]
    for key, value in flags.items():
        if key != "output_dir":
            args += [f"--{key.replace('_', '-')}", str(value)]
    assert main(args) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(shown) == 3 and all(set(s) >= {"input_ids", "labels", "word_ids", "tokens"} for s in shown)

    seen = []
    real = engine_mod.TorchEngine.step

    def record(self, step, batches, *args, **kwargs):
        seen.append([(inputs.tolist(), labels.tolist()) for inputs, labels, *_ in batches])
        return real(self, step, batches, *args, **kwargs)

    monkeypatch.setattr(engine_mod.TorchEngine, "step", record)
    train(configs(tmp_path / "run", masking="whole-word", max_steps=1), progress=False)
    inputs, labels = seen[0][0]
    for row, s in enumerate(shown):
        assert s["input_ids"] == inputs[row] and s["labels"] == labels[row]
        # the words it names are the masks' words: every piece of a chosen word is chosen
        chosen = {w for w, y in zip(s["word_ids"], s["labels"]) if y != -100}
        assert all(y != -100 for w, y in zip(s["word_ids"], s["labels"]) if w in chosen)


def test_show_masks_prints_the_pieces_marked(configs, tmp_path, capsys):
    args = ["check", "--show-masks", "2", "--model", configs.base["model"], "--dataset", configs.base["dataset"],
            "--text-field", "answers.text", "--block-size", "32", "--masking", "span", "--cache-dir",
            configs.base["cache_dir"]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("block ") == 2 and "(step 0)" in out and "[" in out


def test_a_word_scheme_refuses_what_has_no_words(configs, tmp_path, _tiny_loaded):
    """A tokenizer without word ids (not a fast one), or blocks kept without their word starts (a folder prepared
    by an older mlmtune), is refused in one line before training."""
    from types import SimpleNamespace

    from datasets import Dataset

    from mlmtune.data.blocks import Blocks
    from mlmtune.training.run import check_words

    cfg = configs(tmp_path / "run", masking="whole-word")
    with pytest.raises(MlmtuneError, match="--masking whole-word needs the words of a fast tokenizer"):
        check_words(cfg, SimpleNamespace(is_fast=False), [])
    old = Blocks(Dataset.from_dict({"input_ids": [[0, 5, 6, 2]] * 3}))
    with pytest.raises(MlmtuneError, match="needs word boundaries, and the blocks of .* have none"):
        check_words(cfg, _tiny_loaded[1], [old])
    check_words(configs(tmp_path / "run"), SimpleNamespace(is_fast=False), [old])  # the token scheme needs none


def test_show_masks_needs_a_positive_count(configs, capsys):
    assert main(["check", "--show-masks", "0", "--model", configs.base["model"], "--dataset",
                 configs.base["dataset"]]) == 1
    assert capsys.readouterr().err.strip() == "mlmtune: error: --show-masks must be a positive number of blocks, got 0"
