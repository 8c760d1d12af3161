"""Sentence encoders: a run from a sentence-transformers folder leaves one that `SentenceTransformer` loads with the
same modules, whose embeddings equal a pooling computed by hand from `AutoModel`; the embedding check equals
sentence-transformers' own `InformationRetrievalEvaluator`, scores 1.0 when the halves are the same texts and
chance when the partners are shuffled; `eval` reproduces it; a broken modules.json is one line, and the run goes
on without the check."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import sentence_folder
from transformers import AutoModel, AutoTokenizer

from mlmtune.cli import main
from mlmtune.config import DataConfig
from mlmtune.data.text import load_texts
from mlmtune.evaluation.embedding import chance_mrr10, embed, halves, retrieval
from mlmtune.model.load import load_model
from mlmtune.model.sentence import read_encoder
from mlmtune.training.train import train

st = pytest.importorskip("sentence_transformers", reason="the [test] extra brings sentence-transformers")

ST_FILES = ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _by_hand(folder: Path, texts: list[str], pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """Each text on its own through plain `AutoModel` (no padding), pooled and normalised here."""
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    rows = []
    with torch.no_grad():
        for text in texts:
            hidden = model(**tokenizer(text, truncation=True, max_length=64, return_tensors="pt")).last_hidden_state[0]
            rows.append({"mean": hidden.mean(0), "cls": hidden[0], "max": hidden.max(0).values}[pooling])
    out = torch.stack(rows)
    return F.normalize(out, dim=1) if normalize else out


def _modules(folder: Path) -> list[str]:
    return [type(m).__name__ for m in st.SentenceTransformer(str(folder), device="cpu")]


@pytest.fixture(scope="module")
def sentence_run(configs, sentence_dir, tmp_path_factory):
    """One run from the tiny sentence encoder (8 steps), and the start folder's files before it."""
    before = _digests(sentence_dir)
    out = tmp_path_factory.mktemp("sentence-run") / "run"
    metrics = train(configs(out, model=str(sentence_dir)), progress=False).metrics
    return out, metrics, before


def _held_halves(configs) -> tuple[list[str], list[str]]:
    flags = configs.flags("unused")
    split = load_texts(DataConfig(dataset=flags["dataset"], text_field=flags["text_field"]), 42)
    firsts, seconds, _ = halves(list(split["test"]["text"]), 42)
    return firsts, seconds


def test_a_run_from_a_sentence_encoder_leaves_one_with_the_same_modules(sentence_run, sentence_dir, docs_texts):
    out, m, start_files = sentence_run
    assert _digests(sentence_dir) == start_files  # the start folder is never written to
    for name in ST_FILES:  # kept as they were: the Transformer module is the folder itself
        assert (out / name).read_bytes() == (sentence_dir / name).read_bytes()
    assert _modules(out) == _modules(sentence_dir) == ["Transformer", "Pooling", "Normalize"]
    texts = docs_texts[:12]
    encoded = st.SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(encoded, _by_hand(out, texts), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(encoded.norm(dim=1), torch.ones(len(texts)))
    start = st.SentenceTransformer(str(sentence_dir), device="cpu").encode(texts, convert_to_tensor=True)
    assert (encoded - start).abs().max() > 1e-3  # with the trained encoder, not the start's
    assert m["sentence_modules"] == ["Transformer", "Pooling", "Normalize"]
    card = (out / "README.md").read_text()
    assert "## What it did to the sentence embeddings" in card and "- sentence-transformers" in card


def st_retrieval(folder, configs, eps: float = 1e-5) -> dict[str, tuple[float, float]]:
    """MRR@10 and recall@1 of the run's held-out halves by sentence-transformers' InformationRetrievalEvaluator, the
    independent reference for the embedding check, as (low, high) bounds: a document whose cosine is within `eps` of
    the partner's may rank either side of it (two batchings of the same texts differ by about 1e-7, which flips a
    near-tie), so each query's rank is bounded from sentence-transformers' own embeddings, and the evaluator's
    figure must lie within the bounds. With no near-tie, low == high == the evaluator's figure."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    firsts, seconds = _held_halves(configs)
    model = st.SentenceTransformer(str(folder), device="cpu")
    evaluator = InformationRetrievalEvaluator(
        queries={f"q{i}": t for i, t in enumerate(firsts)}, corpus={f"d{i}": t for i, t in enumerate(seconds)},
        relevant_docs={f"q{i}": {f"d{i}"} for i in range(len(firsts))}, mrr_at_k=[10], accuracy_at_k=[1],
        precision_recall_at_k=[1], ndcg_at_k=[10], map_at_k=[10], show_progress_bar=False)
    scores = evaluator(model)
    said = {"mrr10": next(v for k, v in scores.items() if k.endswith("cosine_mrr@10")),
            "recall1": next(v for k, v in scores.items() if k.endswith("cosine_accuracy@1"))}
    sims = F.normalize(model.encode(firsts, convert_to_tensor=True), dim=1) @ \
        F.normalize(model.encode(seconds, convert_to_tensor=True), dim=1).T  # (N, N)
    own = sims.diagonal()[:, None]
    best = 1 + (sims > own + eps).sum(1)  # (N,) ranks with every near-tie won
    worst = (sims >= own - eps).sum(1)  # and lost (the partner counts itself)
    rr = lambda ranks: float(torch.where(ranks <= 10, 1.0 / ranks.double(), 0.0).mean())  # noqa: E731
    bounds = {"mrr10": (rr(worst), rr(best)),
              "recall1": (float((worst == 1).double().mean()), float((best == 1).double().mean()))}
    for key, (low, high) in bounds.items():
        assert low - 1e-9 <= said[key] <= high + 1e-9, (key, said[key], low, high)
        assert high - low <= 0.05, (key, low, high)  # a near-tie or two, not a collapsed encoder
    return bounds


def assert_within(figure: float, bounds: tuple[float, float]) -> None:
    assert bounds[0] - 1e-9 <= figure <= bounds[1] + 1e-9, (figure, bounds)


def test_the_check_equals_sentence_transformers_retrieval_evaluator(sentence_run, sentence_dir, configs):
    out, m, _ = sentence_run
    firsts, _ = _held_halves(configs)
    assert m["embedding_texts"] == len(firsts) >= 16 and m["embedding_pooling"] == "mean pooling, normalised"
    for folder, when in ((sentence_dir, "before"), (out, "after")):
        reference = st_retrieval(folder, configs)
        assert_within(m[f"embedding_mrr10_{when}"], reference["mrr10"])
        assert_within(m[f"embedding_recall1_{when}"], reference["recall1"])


def test_eval_reproduces_the_after_figure_and_the_run_prints_both(sentence_run, configs, capsys):
    out, m, _ = sentence_run
    flags = configs.flags(out)
    assert main(["eval", "--model", str(out), "--dataset", flags["dataset"], "--text-field", flags["text_field"],
                 "--block-size", "32", "--embedding-eval", "auto", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["embedding_mrr10"] == pytest.approx(m["embedding_mrr10_after"], abs=1e-9)
    assert evaluated["embedding_recall1"] == pytest.approx(m["embedding_recall1_after"], abs=1e-9)
    from mlmtune.training.card import summary_lines

    line = next(line for line in summary_lines(m) if line.startswith("embeddings ("))
    assert f"MRR@10 {m['embedding_mrr10_before']:.3f} -> {m['embedding_mrr10_after']:.3f}" in line


def test_identical_halves_score_one_and_shuffled_partners_chance(sentence_dir, docs_texts):
    model, tokenizer = load_model(str(sentence_dir))
    encoder = read_encoder(sentence_dir)
    firsts, seconds, short = halves(docs_texts, 0, n=128)
    assert len(firsts) == 128 and short > 0
    assert all(len(f.split()) + len(s.split()) >= 20 for f, s in zip(firsts, seconds))
    queries = embed(model, tokenizer, encoder, firsts, torch.device("cpu"))
    assert retrieval(queries, embed(model, tokenizer, encoder, list(firsts), torch.device("cpu"))) == {
        "mrr10": 1.0, "recall1": 1.0}
    order = list(range(len(seconds)))
    random.Random(1).shuffle(order)
    docs = embed(model, tokenizer, encoder, seconds, torch.device("cpu"))
    shuffled = retrieval(queries, docs[order])
    assert shuffled["mrr10"] < 3 * chance_mrr10(len(firsts)) and shuffled["recall1"] < 5 / len(firsts)
    assert retrieval(queries, docs)["mrr10"] > 10 * chance_mrr10(len(firsts))  # the check can tell the two apart


@pytest.mark.parametrize("pooling, normalize", [("mean", False), ("cls", True), ("max", False)])
def test_the_pooling_is_sentence_transformers(tiny_bert_dir, tmp_path, docs_texts, pooling, normalize):
    folder = sentence_folder(tiny_bert_dir, tmp_path / "encoder", pooling, normalize)
    model, tokenizer = load_model(str(folder))
    texts = docs_texts[20:40]
    ours = embed(model, tokenizer, read_encoder(folder), texts, torch.device("cpu"))
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, _by_hand(folder, texts, pooling, normalize), atol=1e-5, rtol=1e-4)


def test_a_grown_vocabulary_grows_in_the_transformer_module(configs, sentence_dir, tmp_path, docs_texts):
    out = tmp_path / "run"
    m = train(configs(out, model=str(sentence_dir), add_tokens="8", max_steps=2), progress=False).metrics
    words = (out / "added_tokens.txt").read_text().split()
    model = st.SentenceTransformer(str(out), device="cpu")
    assert [type(x).__name__ for x in model] == ["Transformer", "Pooling", "Normalize"]
    assert len(model.tokenizer) == 600 + len(words) == 608
    assert model.tokenizer.tokenize(words[0]) == [words[0]]
    texts = [t for t in docs_texts if words[0] in t][:4]
    torch.testing.assert_close(model.encode(texts, convert_to_tensor=True), _by_hand(out, texts), atol=1e-5,
                               rtol=1e-4)
    # the embedding check reads the grown tokenizer: sentence-transformers' evaluator on the output agrees
    assert_within(m["embedding_mrr10_after"], st_retrieval(out, configs)["mrr10"])


def test_a_finished_run_resumed_writes_its_folder_again(sentence_run, sentence_dir, configs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sentence_run[0], out)
    m = train(configs(out, model=str(sentence_dir), resume=True), progress=False).metrics
    assert m["embedding_mrr10_before"] == sentence_run[1]["embedding_mrr10_before"]  # from the checkpoint
    assert m["embedding_mrr10_after"] == pytest.approx(sentence_run[1]["embedding_mrr10_after"], abs=1e-9)
    assert _modules(out) == ["Transformer", "Pooling", "Normalize"]


def test_a_module_file_missing_is_one_line_and_the_run_goes_on(configs, sentence_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sentence_dir, broken)
    (broken / "1_Pooling" / "config.json").unlink()
    out = tmp_path / "run"
    flags = configs.flags(out, model=str(broken), max_steps=2)
    argv = ["train", *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
    assert main(argv) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "embedding check" in line]
    assert said == [f"note: no embedding check: {broken / 'modules.json'} names the Pooling module 1_Pooling/, and "
                    f"{broken / '1_Pooling' / 'config.json'} is missing"]
    assert "Traceback" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "embedding_mrr10_after" not in metrics and metrics["sentence_modules"] == ["Transformer", "Pooling",
                                                                                        "Normalize"]
    assert (out / "modules.json").read_bytes() == (broken / "modules.json").read_bytes()


def test_a_model_without_sentence_transformers_files_is_left_as_it_is(reference_run):
    assert not (reference_run.folder / "modules.json").exists()
    assert not any(k.startswith(("embedding_", "sentence_")) for k in reference_run.metrics)
