"""Nothing lost, nothing silent: what mlmtune does with input that is bad, partly bad, or not its own.

Each case here failed on the main before this file (a deleted folder, a traceback, an empty
fill that looked like an answer); each is now one `mlmtune: error:` line and exit 1, or a
warning that counts what was skipped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
from test_cli import _err, run

from mlmtune.cli import main

# ---------------------------------------------------------------------------------------------
# prepare never deletes or overwrites what it did not write


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_refuses_a_folder_it_did_not_write(tiny_model_dir, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "corpus.txt").write_text("\n".join(f"line {i} of the notes, with some words" for i in range(200)))
    (notes / "todo.md").write_text("not mlmtune's")
    before = _snapshot(notes)
    for target in (notes, tmp_path):  # the corpus's own folder, and "." seen from there
        assert main(["prepare", "--model", str(tiny_model_dir), "--dataset", str(notes / "corpus.txt"),
                     "--block-size", "16", "--output-dir", str(target)]) == 1
        assert "was not written by `mlmtune prepare`" in _err(capsys)
    assert _snapshot(notes) == before


def test_prepare_again_replaces_only_its_own_entries(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of the notes, with some words" for i in range(200)))
    out = tmp_path / "blocks"
    args = ["prepare", "--model", str(tiny_model_dir), "--dataset", str(corpus), "--block-size", "16",
            "--output-dir", str(out)]
    assert main(args) == 0
    assert (out / "test").is_dir()
    (out / "NOTES.txt").write_text("the user's own file")
    assert main([*args, "--test-size", "0"]) == 0  # prepared again, now without a test split
    assert (out / "NOTES.txt").read_text() == "the user's own file"
    assert not (out / "test").exists()  # its own earlier split is gone, not left to mislead
    from datasets import load_from_disk

    assert set(load_from_disk(str(out))) == {"train"}

    (out / "test").mkdir()  # a name prepare would write, but this one is the user's
    (out / "test" / "keep.txt").write_text("x")
    assert main(args) == 1
    assert (out / "test" / "keep.txt").read_text() == "x"


def test_resume_into_a_folder_that_holds_no_run_is_refused(tiny_model_dir, eli5_like, tmp_path, capsys):
    out = tmp_path / "docs"
    out.mkdir()
    (out / ".tmp-final-notes").write_text("a user's file that only looks like a leftover")
    (out / "README.md").write_text("mine")
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(eli5_like), "--text-field",
                 "answers.text", "--block-size", "32", "--max-steps", "1", "--output-dir", str(out), "--resume"]) == 1
    assert "holds files but no mlmtune run" in _err(capsys)
    assert (out / "README.md").read_text() == "mine" and (out / ".tmp-final-notes").exists()


def test_partial_save_cleanup_removes_only_mlmtunes_temporary_names(tmp_path):
    from mlmtune.training.checkpoint import remove_partial_saves

    (tmp_path / "checkpoints" / ".tmp-step-0000004-abc").mkdir(parents=True)
    (tmp_path / ".tmp-final-xyz").mkdir()
    (tmp_path / ".tmp-notes").write_text("user")
    (tmp_path / "checkpoints" / ".tmp-mine").mkdir()
    remove_partial_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob(".tmp-*")) == [".tmp-mine", ".tmp-notes"]


# ---------------------------------------------------------------------------------------------
# a tokenizer that cannot belong to the model is refused, not used


def test_model_folder_without_tokenizer_files(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    assert main(["fill", "--model", str(folder), "A <mask>."]) == 1
    assert f"model folder {folder} has no tokenizer files" in _err(capsys)


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    folder = tmp_path / "small-embedding"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(100)  # ids 100..599 of the tokenizer would index past the table
    model.save_pretrained(folder)
    assert main(["fill", "--model", str(folder), "A <mask>."]) == 1
    assert "has 600 tokens but the model's embedding has 100 rows" in _err(capsys)


def test_tokenizer_far_smaller_than_the_embedding_warns(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    folder = tmp_path / "big-embedding"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(5000)
    model.save_pretrained(folder)
    assert main(["fill", "--model", str(folder), "A <mask>."]) == 0
    assert "has 600 tokens, far fewer than the model's 5,000 embedding rows" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# one line and exit 1, never a traceback


def _damage(tiny_model_dir, tmp_path, name: str, data: bytes):
    folder = tmp_path / f"damaged-{name}"
    shutil.copytree(tiny_model_dir, folder)
    (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("case, message", [
    ("empty_txt", "holds no text: every line is empty"),
    ("blank_txt", "holds no text: every line is empty"),
    ("truncated_weights", "its weights file is damaged (SafetensorError"),
    ("broken_tokenizer_json", "cannot load model"),
    ("top_k_over_vocab", "top_k 1000 is larger than the vocabulary of this model (600 tokens)"),
    ("config_not_utf8", "is not UTF-8 text"),
    ("config_empty_value", "option 'learning_rate' has no value"),
    ("epochs_inf", "--epochs expects a finite number, got 'inf'"),
    ("mlm_probability_nan", "--mlm-probability expects a finite number"),
    ("prepared_missing_file", "is damaged (FileNotFoundError"),
    ("prepared_bad_meta", "is damaged (JSONDecodeError"),
    ("jsonl_unparsable", "cannot parse"),
    ("fsdp_one_process", "--fsdp shards over several processes: launch with torchrun"),
    ("keras_compile", "--device, --compile, --fsdp and --deterministic are options of --backend torch"),
    ("train_device_not_here", "--device cuda:7: no such CUDA device here"),
    ("accelerate_fsdp_one_process", "--fsdp shards over several processes"),  # accelerate's FSDP config read
])
def test_one_line_errors(tiny_model_dir, eli5_like, tmp_path, capsys, monkeypatch, case, message):
    model = str(tiny_model_dir)
    common = ["--block-size", "32", "--output-dir", str(tmp_path / "out")]
    if case in ("empty_txt", "blank_txt"):
        path = tmp_path / "corpus.txt"
        path.write_text("" if case == "empty_txt" else "\n   \n\t\n")
        args = ["train", "--model", model, "--dataset", str(path), *common]
    elif case == "truncated_weights":
        whole = (tiny_model_dir / "model.safetensors").read_bytes()
        broken = _damage(tiny_model_dir, tmp_path, "model.safetensors", whole[:1000])
        args = ["fill", "--model", str(broken), "a <mask>"]
    elif case == "broken_tokenizer_json":
        args = ["fill", "--model", str(_damage(tiny_model_dir, tmp_path, "tokenizer.json", b"{broken")), "a <mask>"]
    elif case == "top_k_over_vocab":
        args = ["fill", "--model", model, "--top-k", "1000", "a <mask>"]
    elif case in ("config_not_utf8", "config_empty_value"):
        cfg = tmp_path / "run.yaml"
        cfg.write_bytes(b"\xff\xfe learning_rate: 1" if case == "config_not_utf8" else b"learning_rate:\n")
        args = ["train", "--model", model, "--dataset", str(eli5_like), "--config", str(cfg), *common]
    elif case == "epochs_inf":
        args = ["train", "--model", model, "--dataset", str(eli5_like), "--epochs", "inf", *common]
    elif case == "mlm_probability_nan":
        args = ["eval", "--model", model, "--dataset", str(eli5_like), "--mlm-probability", "nan"]
    elif case.startswith("prepared_"):
        prepared = tmp_path / "prepared"
        assert main(["prepare", "--model", model, "--dataset", str(eli5_like), "--text-field", "answers.text",
                     "--block-size", "32", "--output-dir", str(prepared)]) == 0
        if case == "prepared_missing_file":
            next((prepared / "train").glob("*.arrow")).unlink()
        else:
            (prepared / "mlmtune_prepared.json").write_text("{not json")
            (prepared / "dataset_dict.json").unlink()  # no longer a prepare output at all: a damaged one
            (prepared / "mlmtune_prepared.json").write_text("{not json")
        capsys.readouterr()
        args = ["train", "--model", model, "--dataset", str(prepared), *common]
    elif case == "fsdp_one_process":
        args = ["train", "--model", model, "--dataset", str(eli5_like), "--text-field", "answers.text", "--fsdp",
                *common]
    elif case == "keras_compile":
        args = ["train", "--model", model, "--dataset", str(eli5_like), "--compile", "--backend=keras", *common]
    elif case == "accelerate_fsdp_one_process":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        args = ["train", "--model", model, "--dataset", str(eli5_like), *common]
    elif case == "train_device_not_here":
        args = ["train", "--model", model, "--dataset", str(eli5_like), "--device", "cuda:7", *common]
    elif case == "jsonl_unparsable":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"text": "fine"}\n{"text": broken\n')
        args = ["train", "--model", model, "--dataset", str(path), *common]
    assert main(args) == 1
    assert message in _err(capsys)


def test_partly_bad_text_goes_on_with_one_warning(tiny_model_dir, tmp_path, capsys):
    """Invalid UTF-8 lines are kept (bad bytes replaced) and `null`/list lines of a JSONL skipped
    (pyarrow's reader crashes the process on a `null` line): counted, never silent."""
    good = [f"line {i} of a corpus with enough words to make blocks" for i in range(60)]
    txt = tmp_path / "mixed.txt"
    txt.write_bytes(("\n".join(good[:30]) + "\nbad \xff\xfe bytes here\n" + "\n".join(good[30:])).encode("latin-1"))
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b"null\n[1, 2]\n" + b"".join(json.dumps({"text": t}).encode() + b"\n" for t in good)
                      + b'{"text": "bad \xff bytes"}\n{"text": null}\n')
    for path, expected in ((txt, "1 of 61 lines of"), (jsonl, "2 line(s) of")):
        out = tmp_path / f"blocks-{path.suffix[1:]}"
        assert main(["prepare", "--model", str(tiny_model_dir), "--dataset", str(path), "--block-size", "16",
                     "--output-dir", str(out)]) == 0
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    assert "1 of 62 records hold text that is not valid UTF-8" in err  # the JSONL's one bad record
    meta = json.loads((tmp_path / "blocks-jsonl" / "mlmtune_prepared.json").read_text())
    assert meta["records"] == 62 and meta["empty_texts"] == 1  # null text dropped and counted


def test_stdin_that_is_not_utf8_is_filled_with_a_warning(tiny_model_dir):
    p = subprocess.run([sys.executable, "-m", "mlmtune", "fill", "--model", str(tiny_model_dir), "--json"],
                       input=b"The <mask> \xff\xfe statement.\nA <mask> loop.\n", capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    assert len(p.stdout.decode().splitlines()) == 2
    assert b"warning: 1 line(s) of stdin are not valid UTF-8" in p.stderr


def test_a_stream_that_breaks_mid_run_keeps_a_checkpoint(tiny_model_dir, tmp_path, capsys, docs_texts,
                                                         monkeypatch):
    """A record that does not parse, met only after some steps (here: the file was damaged while the
    run read it a second time), ends the run with one line and a checkpoint of the steps done."""
    import pyarrow as pa
    from datasets import IterableDataset

    from mlmtune.data import stream
    from mlmtune.training.checkpoint import list_checkpoints

    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs_texts[:40]))
    real = stream.stream_records
    reads = {"n": 0}

    def damaged_on_second_read(data):
        records = list(real(data))

        def gen():
            reads["n"] += 1
            for n, record in enumerate(records):
                if reads["n"] == 3 and n == 25:  # 1: held-out records, 2: epoch 0, 3: epoch 1
                    raise pa.ArrowInvalid("JSON parse error: Invalid value. in row 25")
                yield record
        return IterableDataset.from_generator(gen)

    monkeypatch.setattr(stream, "stream_records", damaged_on_second_read)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(path), "--streaming", "--max-steps", "40",
                 "--eval-records", "5", "--block-size", "32", "--batch-size", "4", "--save-steps", "100",
                 "--precision", "fp32", "--output-dir", str(out)]) == 1
    err = _err(capsys)
    assert "the stream cannot be read (" in err and "ArrowInvalid: JSON parse error" in err
    saved = list_checkpoints(out)
    assert len(saved) == 1 and f"checkpoint saved in {saved[0]}, continue with --resume" in err
    assert 0 < int(saved[0].name.split("-")[1]) < 40


# ---------------------------------------------------------------------------------------------
# serve: a model that cannot load is a 500 on /health, and an exit 1 from the command


def test_health_says_500_with_the_reason_when_the_model_fails_to_load(tiny_model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from mlmtune.serving.serve import make_app

    whole = (tiny_model_dir / "model.safetensors").read_bytes()
    broken = _damage(tiny_model_dir, tmp_path, "model.safetensors", whole[:1000])
    with TestClient(make_app(str(broken))) as client:
        for _ in range(200):  # the loader runs in the background; it fails fast
            r = client.get("/health")
            if r.status_code != 503:
                break
            import time

            time.sleep(0.05)
        assert r.status_code == 500
        assert "weights file is damaged" in r.json()["error"]
        assert client.post("/fill", json={"text": "a <mask>"}).status_code == 503


def test_serve_exits_1_when_the_model_cannot_load(tiny_model_dir, tmp_path):
    broken = _damage(tiny_model_dir, tmp_path, "model.safetensors", b"\0" * 100)
    p = run("serve", "--model", str(broken), "--port", "0")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("mlmtune: error: cannot load model")
    assert "Traceback" not in p.stderr


def test_serve_on_a_port_in_use_is_one_line(tiny_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = run("serve", "--model", str(tiny_model_dir), "--port", str(port))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"mlmtune: error: cannot listen on 127.0.0.1:{port}: Address already in use" in p.stderr


def test_deeply_nested_json_is_400_not_500(tiny_model_dir):
    from fastapi.testclient import TestClient

    from mlmtune.inference.fill import FillMask
    from mlmtune.serving.serve import make_app

    with TestClient(make_app(FillMask.from_pretrained(str(tiny_model_dir)))) as client:
        r = client.post("/fill", content=b"[" * 40_000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
        r = client.post("/fill", json={"text": "a <mask>", "top_k": 100})  # allowed by the limit, not by vocab 600
        assert r.status_code == 200


# ---------------------------------------------------------------------------------------------
# a slow tokenizer (no tokenizer.json): what needs the fast one's offsets says so, the rest trains


@pytest.fixture(scope="module")
def slow_bert_dir(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with only a slow tokenizer (vocab.txt, no tokenizer.json): what AutoTokenizer loads as slow."""
    from transformers import AutoTokenizer, BertTokenizerLegacy

    folder = tmp_path_factory.mktemp("slow-bert")
    for f in tiny_bert_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    BertTokenizerLegacy(vocab_file=str(tiny_bert_dir / "vocab.txt"), model_max_length=64).save_pretrained(folder)
    assert not (folder / "tokenizer.json").exists() and not AutoTokenizer.from_pretrained(folder).is_fast
    return folder


def _slow_flags(slow_bert_dir, configs, out) -> list[str]:
    f = configs.flags(out)
    return ["train", "--model", str(slow_bert_dir), "--dataset", f["dataset"], "--text-field", f["text_field"],
            "--block-size", "32", "--max-steps", "1", "--general-eval", "none", "--precision", "fp32",
            "--cache-dir", f["cache_dir"], "--output-dir", str(out)]


def test_a_slow_tokenizer_trains_without_the_cloze_by_default_and_says_so(slow_bert_dir, configs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_slow_flags(slow_bert_dir, configs, out)) == 0  # --cloze-words auto, the default
    err = capsys.readouterr().err
    assert err.count("note: no cloze: it needs the character offsets of a fast tokenizer, and this one is slow "
                     "(BertTokenizerLegacy); training goes on without it") == 1
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 1
    assert main([*_slow_flags(slow_bert_dir, configs, tmp_path / "asked"), "--cloze-words", "python"]) == 1
    assert _err(capsys).startswith("mlmtune: error: --cloze-words python needs the character offsets of a fast")


def test_add_tokens_with_a_slow_tokenizer_is_one_line(slow_bert_dir, configs, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("kubectl\nterraform\n")
    assert main([*_slow_flags(slow_bert_dir, configs, tmp_path / "run"), "--add-tokens", str(words)]) == 1
    assert _err(capsys) == (f"mlmtune: error: --add-tokens {words} needs a fast tokenizer (a tokenizer.json: its "
                            f"normalizer and words say how a new word is spelled), and this one is slow "
                            f"(BertTokenizerLegacy): use a model folder with a tokenizer.json, or leave --add-tokens "
                            f"out")
