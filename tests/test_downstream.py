"""The downstream probe (`mlmtune probe`, `train --downstream`, `eval --downstream`): the linear probe equals
features from plain `AutoModel` and scikit-learn's `LogisticRegression`; random labels score at chance; a fine-tuned
classifier learns a rule it can see; a run reports before and after and `eval` reproduces the after figure; bad
tasks are refused in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler
from transformers import AutoModel, AutoTokenizer

from mlmtune.cli import main
from mlmtune.evaluation.probe import probe, scores
from mlmtune.evaluation.task import CHAPTERS, TaskData, python_docs_chapters
from mlmtune.model.load import load_model
from mlmtune.probe_config import TaskConfig
from mlmtune.training.train import train

MARKERS = ["apple", "river", "engine"]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _marker_rows(docs_texts: list[str], n: int, seed: int, classes: int = 3, random_labels: bool = False):
    """Short docs sentences with a marker word inserted; the label is the marker (or, with random_labels, a coin
    that has nothing to do with the text)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [w for w in rng.choice(docs_texts).split() if w.isalpha()][:6]
        k = rng.randrange(classes)
        words.insert(rng.randrange(len(words) + 1), MARKERS[k])
        rows.append({"text": " ".join(words), "label": rng.randrange(classes) if random_labels else MARKERS[k]})
    return rows


@pytest.fixture(scope="module")
def marker_task(tmp_path_factory, docs_texts) -> Path:
    """A task with its own split: train.jsonl (240) and test.jsonl (90), the label the marker word in the text."""
    folder = tmp_path_factory.mktemp("marker-task")
    _write_jsonl(folder / "train.jsonl", _marker_rows(docs_texts, 240, 0))
    _write_jsonl(folder / "test.jsonl", _marker_rows(docs_texts, 90, 1))
    return folder


def _reference_predictions(folder: Path, train_rows: list[dict], test_rows: list[dict]) -> list:
    """Independently of mlmtune: plain AutoModel, one text at a time, mean of the last layer and the first token's
    vector, then scikit-learn's StandardScaler and LogisticRegression (C=1) run to convergence."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder).eval()

    def feats(rows):
        out = []
        with torch.no_grad():
            for r in rows:
                ids = tokenizer(r["text"], truncation=True, max_length=64, return_tensors="pt")
                h = encoder(**ids).last_hidden_state[0]  # (T, H)
                out.append(torch.cat([h.mean(0), h[0]]).double().numpy())
        return out

    scaler = StandardScaler().fit(feats(train_rows))
    clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=20000)
    clf.fit(scaler.transform(feats(train_rows)), [r["label"] for r in train_rows])
    return list(clf.predict(scaler.transform(feats(test_rows))))


@pytest.mark.parametrize("classes", [3, 2])  # multinomial, and binomial as scikit-learn fits two classes
def test_the_linear_probe_equals_automodel_features_and_scikit_learn(tiny_bert_dir, docs_texts, tmp_path, classes):
    train_rows = _marker_rows(docs_texts, 240, 0, classes)
    test_rows = _marker_rows(docs_texts, 90, 1, classes)
    _write_jsonl(tmp_path / "train.jsonl", train_rows)
    _write_jsonl(tmp_path / "test.jsonl", test_rows)
    cfg = TaskConfig(task=str(tmp_path))
    model, tokenizer = load_model(str(tiny_bert_dir))
    result = probe(model, tokenizer, TaskData(cfg, 42), cfg, 42, torch.device("cpu"))
    expected = _reference_predictions(tiny_bert_dir, train_rows, test_rows)
    truth = [r["label"] for r in test_rows]
    assert result["seeds"] == [42] and result["test_examples"] == 90  # its own split: one deterministic run
    assert abs(result["accuracy"] - accuracy_score(truth, expected)) <= 1 / 90  # at most one borderline text
    assert abs(result["f1"] - f1_score(truth, expected, average="macro")) <= 0.02
    assert result["accuracy"] > 1 / classes + 0.2  # the rule is learnable from the random encoder's features


def test_scores_equal_scikit_learns():
    g = torch.Generator().manual_seed(0)
    truth, predicted = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 5, (200,), generator=g)
    s = scores(truth, predicted)
    assert s["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert s["f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)


def test_random_labels_score_near_chance(tiny_bert_dir, docs_texts, tmp_path):
    task = _write_jsonl(tmp_path / "coin.jsonl", _marker_rows(docs_texts, 800, 2, classes=2, random_labels=True))
    cfg = TaskConfig(task=str(task), seeds=2)
    model, tokenizer = load_model(str(tiny_bert_dir))
    result = probe(model, tokenizer, TaskData(cfg, 7), cfg, 7, torch.device("cpu"))
    assert result["seeds"] == [7, 8] and result["test_examples"] == 160
    # chance is 50%: the mean of two runs of 160 test texts has a standard error of at most 4 points; 12 is 3 of them
    assert abs(result["accuracy"] - 0.5) < 0.12
    assert result["accuracy_std"] > 0  # the seeds drew different splits


def test_a_fine_tuned_classifier_learns_a_word_in_the_text(tiny_bert_dir, marker_task):
    cfg = TaskConfig(task=str(marker_task), method="finetune", seeds=1, epochs=8, learning_rate=3e-3, batch_size=16)
    model, tokenizer = load_model(str(tiny_bert_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = probe(model, tokenizer, TaskData(cfg, 0), cfg, 0, torch.device("cpu"))
    assert result["accuracy"] >= 0.95  # 120 steps of a random 2-layer encoder: the linear probe's 60-70% before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the probed model is untouched


def test_the_builtin_task_labels_every_topic_by_its_part_of_the_docs():
    named = {t for names in CHAPTERS.values() for t in names}
    assert set(topics) - named <= {"debugger"}  # every topic of this Python has its part (pdb's commands none)
    texts, labels = python_docs_chapters()
    assert len(texts) == len(set(texts)) > 1500  # each paragraph once, with one answer
    counts = {c: labels.count(c) for c in CHAPTERS}
    assert min(counts.values()) >= 40, counts
    assert labels[texts.index('The "if" statement is used for conditional execution:')] == "statements"


def test_max_examples_is_one_stratified_sample_for_every_run(tmp_path, docs_texts):
    rows = _marker_rows(docs_texts, 300, 3)
    cfg = TaskConfig(task=str(_write_jsonl(tmp_path / "t.jsonl", rows)), max_examples=60)
    data = TaskData(cfg, 5)
    assert 58 <= len(data.texts) <= 62 and set(data.texts) <= {r["text"] for r in rows}
    assert all(15 <= int((data.labels == c).sum()) <= 25 for c in range(3))  # stratified: about 20 of each
    first, second = data.split(5), data.split(6)
    assert not torch.equal(first[1], second[1]) and sorted(torch.cat(first).tolist()) == list(range(len(data.texts)))


def test_train_reports_before_and_after_and_eval_and_probe_reproduce_them(configs, marker_task, tmp_path, capsys):
    out = tmp_path / "run"
    m = train(configs(out, downstream=str(marker_task), downstream_seeds=2), progress=False).metrics
    assert m["downstream"] == str(marker_task) and m["downstream_seeds"] == [42]  # its own split: one run
    assert m["downstream_test_examples"] == 90 and m["downstream_classes"] == 3
    assert json.loads((out / "metrics.json").read_text())["downstream_f1_after"] == m["downstream_f1_after"]
    assert "## Does it help the task" in (out / "README.md").read_text()
    flags = configs.flags(out)
    capsys.readouterr()
    # mlmtune probe on the start and the trained model, side by side: the run's before and after figures
    assert main(["probe", "--model", flags["model"], "--model", str(out), "--task", str(marker_task), "--json"]) == 0
    side_by_side = json.loads(capsys.readouterr().out)
    start, trained = side_by_side["models"]
    assert (start["accuracy"], start["f1"]) == (m["downstream_accuracy_before"], m["downstream_f1_before"])
    assert (trained["accuracy"], trained["f1"]) == (m["downstream_accuracy_after"], m["downstream_f1_after"])
    assert main(["eval", "--model", str(out), "--dataset", flags["dataset"], "--text-field", flags["text_field"],
                 "--block-size", "32", "--downstream", str(marker_task), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert (evaluated["downstream_accuracy"], evaluated["downstream_f1"]) == (m["downstream_accuracy_after"],
                                                                              m["downstream_f1_after"])


def test_the_probe_table_puts_models_side_by_side(tiny_bert_dir, tiny_model_dir, marker_task, capsys):
    assert main(["probe", "--model", f"{tiny_bert_dir},{tiny_model_dir}", "--task", str(marker_task)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(str(tiny_bert_dir.parent))]
    assert len(rows) == 2 and "240 train and 90 test texts, 3 classes" in out


@pytest.mark.parametrize("rows, flags, message", [
    ([{"text": "a", "category": 1}, {"text": "b", "category": 2}], [], "have no field 'label' (its label field)"),
    ([{"text": f"t{i}", "label": "same"} for i in range(10)], [], "has one class"),
    ([], [], "holds no records"),
    ([{"text": f"t{i}", "label": [1, 2]} for i in range(10)], [], "one label per text"),
    ([{"text": f"t{i}", "label": i % 2} for i in range(10)], ["--method", "svm"], "--method must be one of"),
])
def test_bad_tasks_are_one_line(tmp_path, tiny_bert_dir, capsys, rows, flags, message):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["probe", "--model", str(tiny_bert_dir), "--task", str(task), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlmtune: error:") and message in err and "\n" not in err


def test_a_label_the_train_split_lacks_is_refused(tmp_path, tiny_bert_dir, capsys):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    _write_jsonl(tmp_path / "test.jsonl", [{"text": "u", "label": 0}, {"text": "v", "label": 7}])
    assert main(["probe", "--model", str(tiny_bert_dir), "--task", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "labels its train split lacks (7)" in err and "\n" not in err


def test_train_refuses_a_bad_task_before_training(configs, tmp_path, capsys):
    task = _write_jsonl(tmp_path / "task.jsonl", [{"body": "a", "label": 1}, {"body": "b", "label": 2}])
    out = tmp_path / "run"
    with pytest.raises(Exception, match="have no field 'text' \\(its text field\\)"):
        train(configs(out, downstream=str(task)), progress=False)
    assert not (out / "checkpoints").exists()


def test_check_reads_the_task_as_train_does(configs, marker_task, tmp_path, capsys):
    flags = configs.flags(tmp_path / "run")
    common = ["check", "--no-probe", "--model", flags["model"], "--dataset", flags["dataset"], "--text-field",
              flags["text_field"], "--block-size", "32"]
    assert main([*common, "--downstream", str(marker_task)]) == 0
    assert "downstream task " + str(marker_task) + ": 240 train and 90 test texts, 3 classes" in capsys.readouterr().out
    bad = _write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(4)])
    assert main([*common, "--downstream", str(bad)]) == 1
    assert "--downstream: the task " + str(bad) + " has one class" in capsys.readouterr().err
