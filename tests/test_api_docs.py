"""docs/api.md runs: every ```python block of the page, in order, in one namespace, in a folder holding `notes.txt`,
with `MODEL` the tiny RoBERTa instead of a Hub id. What the blocks leave behind is then checked against
independent references: transformers' `pipeline("fill-mask")` and a position-by-position pseudo-log-likelihood."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from compare import assert_same_as_pipeline
from test_scoring import _reference_pll

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def ran(tiny_model_dir, docs_texts, tmp_path_factory, session_cache):
    """The namespace the page's blocks leave, run where `notes.txt` is (the docs' first 400 paragraphs)."""
    import os

    folder = tmp_path_factory.mktemp("api-docs")
    (folder / "notes.txt").write_text("\n".join(docs_texts[:400]))
    namespace = {"__name__": "api_docs"}
    here = os.getcwd()
    os.chdir(folder)
    try:
        for block in blocks():
            # the one line that names a Hub model: the tiny model instead (tests are offline)
            code = re.sub(r'^MODEL = ".*"', f"MODEL = {str(tiny_model_dir)!r}", block, flags=re.M)
            exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(here)
    namespace["folder"] = folder
    return namespace


def test_the_page_has_the_examples_it_promises():
    code = "\n".join(blocks())
    for call in ("train(cfg", "resolve(TrainConfig", "FillMask.from_pretrained", "mlmtune.score(", "run_eval("):
        assert call in code, call


def test_train_and_resolve(ran):
    m = ran["result"].metrics
    assert m["train_steps"] == 20 and m["perplexity_after"] < 0.9 * m["perplexity_before"]
    assert ran["flat"] == ran["cfg"]  # the flat options, strings and all, make the same config
    assert (ran["folder"] / "notes-model" / "model.safetensors").is_file()


def test_fills_are_the_pipelines(ran, capsys):
    from transformers import pipeline

    pipe = pipeline("fill-mask", model=str(ran["folder"] / "notes-model"), device="cpu")
    assert_same_as_pipeline(ran["one"], pipe("The <mask> statement leaves the loop.", top_k=3))
    assert_same_as_pipeline(ran["many"][0], pipe("A <mask> is called.", top_k=3))
    assert_same_as_pipeline(ran["many"][1], pipe("Use <mask> to define a function.", top_k=3))


def test_scores_are_the_hand_computed_likelihoods(ran):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = ran["folder"] / "notes-model"
    model, tok = AutoModelForMaskedLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    scores = list(ran["mlmtune"].score(str(folder), ["The loop ends here.", "The loop ends hear."]))
    for s in scores:
        assert s.pll == pytest.approx(_reference_pll(model, tok, s.text, "within-word-l2r"), abs=1e-4)


def test_eval_reproduces_the_run_and_the_error_is_one_message(ran):
    assert ran["report"]["perplexity"] == pytest.approx(ran["result"].metrics["perplexity_after"], rel=1e-6)
    assert ran["message"].startswith("the text has no mask")


def test_the_top_level_names_are_the_modules_own():
    """`from mlmtune import X` (what the page uses) hands out the object the module behind it defines, for every
    name it lists, and says which names it has when asked for another."""
    import importlib

    import mlmtune

    for name, module in mlmtune._API.items():
        assert getattr(mlmtune, name) is getattr(importlib.import_module(module), name), name
    assert set(mlmtune.__all__) == {"__version__", *mlmtune._API}
    with pytest.raises(AttributeError, match="no attribute 'fill'"):
        mlmtune.fill  # noqa: B018 (the module is mlmtune.inference.fill)
