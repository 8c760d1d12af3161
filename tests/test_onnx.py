"""`mlmtune export` and `--runtime onnx`: the exported graphs give PyTorch's logits (checked here with onnxruntime
and transformers directly, not through mlmtune's runtime), fill, score and serve answer as the torch runtime does,
transformers.js fills as the Python pipeline does, and bad input is one line with nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from mlmtune.cli import main  # noqa: E402

JS = Path(__file__).resolve().parent / "js"
TEXTS = ["The function returns a [MASK] value.", "A list is a [MASK] of items, and a tuple is [MASK] too."]


def _export(source: Path, out: Path, quantize: bool = True) -> Path:
    assert main(["export", "--model", str(source), "--output-dir", str(out),
                 *(["--quantize", "int8"] if quantize else [])]) == 0
    return out


@pytest.fixture(scope="session")
def bert_onnx(tiny_bert_dir, tmp_path_factory) -> Path:
    return _export(tiny_bert_dir, tmp_path_factory.mktemp("bert-onnx") / "out")


@pytest.fixture(scope="session")
def roberta_onnx(tiny_model_dir, tmp_path_factory) -> Path:
    return _export(tiny_model_dir, tmp_path_factory.mktemp("roberta-onnx") / "out", quantize=False)


def _tiny(kind: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A tiny model of another architecture with the tiny BERT's WordPiece tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "modernbert":
        model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
            **common, max_position_embeddings=64, global_attn_every_n_layers=1, local_attention=16,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
            sep_token_id=tok.sep_token_id))
    elif kind == "distilbert":
        model = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
            vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
            pad_token_id=tok.pad_token_id))
    elif kind == "xlm-roberta":
        model = transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**common, max_position_embeddings=66))
    else:  # eurobert
        model = transformers.EuroBertForMaskedLM(transformers.EuroBertConfig(
            **common, max_position_embeddings=64, num_key_value_heads=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def modernbert_onnx(tiny_bert_dir, tmp_path_factory) -> Path:
    source = _tiny("modernbert", tiny_bert_dir, tmp_path_factory.mktemp("modernbert") / "model")
    return _export(source, tmp_path_factory.mktemp("modernbert-onnx") / "out", quantize=False)


def _check_against_transformers(folder: Path) -> None:
    """onnxruntime on onnx/model.onnx, fed what the tokenizer gives, against transformers' logits at every real
    position; a batch of 1 and a batch of 3 of other lengths than the export's (both dims dynamic); and the masked
    graph at scattered positions."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    session = ort.InferenceSession(str(folder / "onnx" / "model.onnx"))
    masked = ort.InferenceSession(str(folder / "onnx" / "mlmtune_masked.onnx"))
    wanted = {i.name for i in session.get_inputs()}
    for texts in (["print the value"], ["a", "Lists are mutable sequences, typically used to store items.",
                                         "the module imports the names it needs"]):
        enc = tok(texts, padding=True, return_tensors="np")
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in wanted}
        assert set(feed) == wanted  # the graph takes what the tokenizer gives
        got = session.run(["logits"], feed)[0]
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        real = enc["attention_mask"].astype(bool)
        assert got.shape == want.shape
        assert np.abs(got[real] - want[real]).max() < 1e-4
        positions = np.flatnonzero(real.reshape(-1))[::2]
        at = masked.run(["logits"], {"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"],
                                     "positions": positions})[0]
        assert np.abs(at - want.reshape(-1, want.shape[-1])[positions]).max() < 1e-4


def test_bert_exports_with_logits_equal_to_pytorch(bert_onnx):
    _check_against_transformers(bert_onnx)
    assert {i.name for i in ort.InferenceSession(str(bert_onnx / "onnx" / "model.onnx")).get_inputs()} == {
        "input_ids", "attention_mask", "token_type_ids"}


def test_roberta_exports_with_logits_equal_to_pytorch(roberta_onnx):
    _check_against_transformers(roberta_onnx)
    assert not (roberta_onnx / "onnx" / "model_quantized.onnx").exists()  # only with --quantize int8


@pytest.mark.slow  # ~8 s of export: BERT and RoBERTa stay in the default suite, the other families are slow too
def test_modernbert_exports_with_logits_equal_to_pytorch(modernbert_onnx):
    _check_against_transformers(modernbert_onnx)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["distilbert", "xlm-roberta", "eurobert"])
def test_the_other_architectures_export(kind, tiny_bert_dir, tmp_path):
    source = _tiny(kind, tiny_bert_dir, tmp_path / "model")
    _check_against_transformers(_export(source, tmp_path / "out", quantize=False))


@pytest.mark.slow
def test_a_run_with_added_tokens_exports_at_its_end(configs, tmp_path):
    """train --add-tokens ... --export onnx: onnx/ in the run's folder, the grown vocabulary in the graph."""
    from mlmtune.training.train import train  # noqa: F401  (the CLI runs it)

    flags = configs.flags(tmp_path / "run", max_steps=2, save_steps=None, add_tokens="20", export="onnx")
    argv = ["train"] + [a for k, v in flags.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]
    assert main(argv) == 0
    run = tmp_path / "run"
    assert (run / "onnx" / "model_quantized.onnx").is_file() and "## ONNX" in (run / "README.md").read_text()
    _check_against_transformers(run)
    assert not [p for p in run.iterdir() if p.name.startswith(".onnx.partial")]


def test_the_int8_figure_is_measured_and_in_the_card(bert_onnx):
    """The card's int8 agreement, recomputed: onnxruntime's int8 graph against transformers' fp32 top-1 at the masked
    positions of the self-check's batch."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmtune.inference.onnx_export import check_batch

    tok = AutoTokenizer.from_pretrained(bert_onnx)
    model = AutoModelForMaskedLM.from_pretrained(bert_onnx).eval()
    _, attention, masked = check_batch(tok)
    at = (masked == tok.mask_token_id).numpy()
    feed = {"input_ids": masked.numpy(), "attention_mask": attention.numpy(), "token_type_ids": np.zeros_like(at,
                                                                                                           np.int64)}
    int8 = ort.InferenceSession(str(bert_onnx / "onnx" / "model_quantized.onnx")).run(["logits"], feed)[0]
    with torch.no_grad():
        fp32 = model(input_ids=masked, attention_mask=attention).logits.numpy()
    agree = (int8[at].argmax(-1) == fp32[at].argmax(-1)).mean()
    card = (bert_onnx / "README.md").read_text()
    row = re.search(r"`onnx/model_quantized.onnx` \| ([\d.]+) MB \| top-1 agrees with PyTorch at ([\d.]+)% of (\d+)",
                    card)
    assert row, card
    assert float(row[2]) == pytest.approx(100 * agree, abs=0.05) and int(row[3]) == at.sum() > 20
    full = (bert_onnx / "onnx" / "model.onnx").stat().st_size
    assert (bert_onnx / "onnx" / "model_quantized.onnx").stat().st_size < full  # int8 weights are smaller


def _run_json(capsys, argv: list[str]) -> list:
    capsys.readouterr()
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _same(a, b, tol: float) -> None:
    """The same JSON, numbers within `tol`."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y, tol)
    elif isinstance(a, float):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (a, b)
    else:
        assert a == b


@pytest.mark.parametrize("extra", [[], ["--targets", "value,function"], ["--max-pieces", "2", "--top-k", "3"],
                                   ["--joint", "--beam-size", "3"]])
def test_fill_with_runtime_onnx_equals_torch(bert_onnx, capsys, extra):
    texts = TEXTS[:1] if "--max-pieces" in extra else TEXTS
    base = ["fill", "--model", str(bert_onnx), "--json", *extra, *texts]
    torch_out = _run_json(capsys, base + ["--runtime", "torch"])
    _same(_run_json(capsys, base + ["--runtime", "onnx"]), torch_out, 1e-4)
    int8 = _run_json(capsys, base + ["--runtime", "onnx", "--quantized"])
    assert len(int8) == len(torch_out)  # the same shape of answer; its numbers are int8's


@pytest.mark.parametrize("metric", ["within-word-l2r", "original"])
def test_score_with_runtime_onnx_equals_torch(bert_onnx, capsys, metric):
    base = ["score", "--model", str(bert_onnx), "--json", "--per-word", "--metric", metric,
            "Immutable sequences are hashable.", "the value"]
    _same(_run_json(capsys, base + ["--runtime", "onnx"]), _run_json(capsys, base), 1e-4)


def test_serve_with_runtime_onnx_answers_as_torch_and_health_names_it(roberta_onnx):
    from fastapi.testclient import TestClient

    from mlmtune.inference.fill import FillMask
    from mlmtune.serving.serve import make_app

    answers = {}
    for runtime in ("torch", "onnx"):
        with TestClient(make_app(FillMask.from_pretrained(str(roberta_onnx), runtime=runtime))) as c:
            assert c.get("/health").json() == {"status": "ok", "runtime": runtime}
            assert c.get("/info").json()["runtime"] == runtime
            answers[runtime] = [c.post("/fill", json={"text": ["The <mask> of a module.", "a <mask>"]}).json(),
                                c.post("/fill", json={"text": "The <mask> of a module.", "max_pieces": 2}).json(),
                                c.post("/score", json={"text": "The name of a module."}).json()]
    assert "error" not in json.dumps(answers)
    _same(answers["onnx"], answers["torch"], 1e-4)


def _js_missing() -> bool:
    return not (JS / "node_modules" / "@huggingface" / "transformers").is_dir()


@pytest.mark.skipif(_js_missing() and not os.environ.get("MLMTUNE_REQUIRE_JS"),
                    reason="transformers.js is not installed (npm install --ignore-scripts in tests/js; CI does)")
@pytest.mark.parametrize("folder", ["bert_onnx", "roberta_onnx"])
def test_transformers_js_fills_as_the_python_pipeline(folder, request):
    from transformers import pipeline

    model_dir = request.getfixturevalue(folder)
    texts = ([t.replace("[MASK]", "<mask>") for t in TEXTS[:1]] if folder == "roberta_onnx" else TEXTS[:1]) + [
        "Paris is the [MASK] of France." if folder == "bert_onnx" else "Paris is the <mask> of France."]
    run = subprocess.run(["node", str(JS / "fill.mjs"), str(model_dir), "4", "fp32", *texts], capture_output=True,
                         text=True, timeout=120, cwd=JS)
    assert run.returncode == 0, run.stderr
    fill = pipeline("fill-mask", model=str(model_dir), top_k=4)
    for line, text in zip(run.stdout.splitlines(), texts, strict=True):
        got, want = json.loads(line), fill(text)
        assert [p["token"] for p in got] == [p["token"] for p in want]
        assert [p["sequence"] for p in got] == [p["sequence"] for p in want]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)


# bad input: one line, exit 1, nothing written


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
    err = lines[-1]
    assert err.startswith("mlmtune: error: ") and not any("Traceback" in line for line in lines), lines
    return err


def test_export_of_a_folder_with_no_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["export", "--model", str(tmp_path / "empty"), "--output-dir",
                                   str(tmp_path / "out")])
    assert "config.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_export_into_a_folder_that_is_not_empty(tiny_bert_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    err = _one_line_error(capsys, ["export", "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "out")])
    assert "not empty" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_export_with_an_unknown_quantization(tiny_bert_dir, tmp_path, capsys):
    err = _one_line_error(capsys, ["export", "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "out"),
                                   "--quantize", "int4"])
    assert "int8" in err and "int4" in err
    assert list(tmp_path.iterdir()) == []


def test_runtime_onnx_on_a_folder_without_onnx_names_export(tiny_bert_dir, capsys):
    for command in (["fill", "a [MASK]"], ["score", "a text"]):
        err = _one_line_error(capsys, [command[0], "--model", str(tiny_bert_dir), "--runtime", "onnx", command[1]])
        assert "onnx/" in err and "mlmtune export" in err
    err = _one_line_error(capsys, ["serve", "--model", str(tiny_bert_dir), "--runtime", "onnx", "--port", "0"])
    assert "mlmtune export" in err
    assert "--runtime onnx" in _one_line_error(capsys, ["fill", "--model", str(tiny_bert_dir), "--quantized", "a"])


def test_a_failed_export_leaves_nothing(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    """An export that fails its own check after the graphs were written: no output folder, no temp folder."""
    import mlmtune.inference.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", -1.0)  # no difference passes
    err = _one_line_error(capsys, ["export", "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "out")])
    assert "logits" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_empty_output_folder_is_used(tiny_model_dir, tmp_path, roberta_onnx):
    """An existing empty folder is filled (and holds what a new one would)."""
    (tmp_path / "out").mkdir()
    out = _export(tiny_model_dir, tmp_path / "out", quantize=False)
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in roberta_onnx.rglob("*"))
    shutil.rmtree(out)
