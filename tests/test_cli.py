"""The real `mlmtune` entry point, end to end on the tiny model, and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compare import assert_same_as_pipeline

from mlmtune.cli import main


def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "mlmtune", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_prepare_train_eval_fill_end_to_end(tiny_model_dir, eli5_like, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    prepared, out = tmp_path / "prepared", tmp_path / "model"
    p = run("prepare", "--model", str(tiny_model_dir), "--dataset", str(eli5_like), "--text-field", "answers.text",
            "--block-size", "32", "--output-dir", str(prepared))
    assert p.returncode == 0, p.stderr
    from datasets import load_from_disk

    dd = load_from_disk(str(prepared))
    assert set(dd) == {"train", "test"} and dd["train"].column_names == ["input_ids", "word_starts"]
    assert len(dd["train"][0]["input_ids"]) == 32

    cfg = tmp_path / "train.yaml"
    # the general check and the cloze have tests of their own: this one is about the commands' hand-offs
    cfg.write_text(f"learning_rate: 0.01\nbatch_size: 4\nmax_steps: 8\ngeneral_eval: none\ncloze_words: none\n"
                   f"data:\n  block_size: 32\n  cache_dir: {cache}\n")
    p = run("train", "--config", str(cfg), "--model", str(tiny_model_dir), "--dataset", str(prepared),
            "--output-dir", str(out), "--precision", "fp32", "--max-steps", "10")
    assert p.returncode == 0, p.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 10  # the flag beat the config file
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert f"{metrics['perplexity_after']:,.2f} after" in p.stdout
    saved = (out / "mlmtune_config.yaml").read_text()
    assert "learning_rate: 0.01" in saved and "max_steps: 10" in saved

    # eval on the same prepared split and seed reproduces the run's final perplexity
    p = run("eval", "--model", str(out), "--dataset", str(prepared), "--block-size", "32", "--json")
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert math.isclose(ev["perplexity"], metrics["perplexity_after"], rel_tol=1e-5)
    assert ev["eval_masked_tokens"] == metrics["eval_masked_tokens"]
    # and without --json, the same figures as lines a person reads
    assert main(["eval", "--model", str(out), "--dataset", str(prepared), "--block-size", "32"]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == f"scored {ev['eval_texts']:,} records of {prepared}: {ev['scored']}"
    assert report[1] == (f"perplexity {ev['perplexity']:,.3f} (eval loss {ev['eval_loss']:.4f} over "
                         f"{ev['eval_masked_tokens']:,} masked tokens in {ev['eval_blocks']:,} blocks, fp32)")

    # fill --json: one line per text, in order, each what pipeline("fill-mask") returns
    from transformers import pipeline

    texts = ["The <mask> statement is used.", "A [MASK] is defined with <mask> keyword."]
    p = run("fill", "--model", str(out), "--json", "--top-k", "3", stdin="\n".join(texts) + "\n")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2
    pipe = pipeline("fill-mask", model=str(out))
    for line, text in zip(lines, texts):
        assert_same_as_pipeline(json.loads(line), pipe(text.replace("[MASK]", "<mask>"), top_k=3))


def test_errors_are_one_line_without_traceback(tmp_path):
    p = run("fill", "--model", str(tmp_path / "nope"), "A <mask>.")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"mlmtune: error: model folder {tmp_path / 'nope'} does not exist"]


def _err(capsys) -> str:
    """The one error line (progress bars of work done before the error may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "mlmtune: error:" in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0][lines[0].index("mlmtune: error:"):]


@pytest.mark.parametrize("args, message", [
    (["fill", "--model", "{model}", "No mask here."], "has no mask"),
    (["fill", "--model", "{model}", " "], "is empty"),
    (["train", "--model", "{model}", "--dataset", "eli5", "--block-size", "32", "--output-dir", "{tmp}/o"],
     "datasets#6605"),
    (["train", "--model", "{model}", "--dataset", "{data}", "--text-field", "answers.text", "--block-size", "512",
      "--output-dir", "{tmp}/o"], "--block-size 512 is larger than the model's maximum length 64"),
    (["train", "--model", "{model}", "--dataset", "{data}", "--learning-rate", "0"], "--learning-rate must be"),
    (["train", "--model", "{model}", "--dataset", "{data}", "--batch-size", "-2"], "--batch-size must be a positive"),
    (["train", "--model", "{model}", "--dataset", "{data}", "--epochs", "three"], "--epochs expects float"),
    (["train", "--model", "{model}", "--dataset", "{data}", "--output-dir", "{data}"], "is a file"),
    (["train", "--model", "{model}", "--dataset", "{data}", "--text-field", "answer", "--block-size", "32",
      "--output-dir", "{tmp}/o"],
     "its fields are: q_id, title, answers.a_id, answers.text, answers.score"),
    (["train", "--model", "{model}", "--dataset", "{tiny_txt}", "--test-size", "0", "--block-size", "32",
      "--output-dir", "{tmp}/o"], "fewer than one block of 32"),
    (["train", "--dataset", "{data}", "--config", "{tmp}/missing.yaml"], "missing.yaml does not exist"),
    (["eval", "--model", "{model}"], "--dataset is required"),
    (["fill", "--model", "{tmp}/not-a-model", "a <mask>"], "does not exist"),
])
def test_bad_input(tiny_model_dir, eli5_like, tmp_path, capsys, args, message):
    tiny_txt = tmp_path / "tiny.txt"
    tiny_txt.write_text("just a few words\n")
    args = [a.format(model=tiny_model_dir, data=eli5_like, tmp=tmp_path, tiny_txt=tiny_txt) for a in args]
    assert main(args) == 1
    err = _err(capsys)
    assert err.startswith("mlmtune: error: ") and message in err


def test_unknown_config_key_is_named(tmp_path, capsys, eli5_like):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rte: 0.1\n")
    assert main(["train", "--dataset", str(eli5_like), "--config", str(cfg)]) == 1
    assert "unknown option 'learning_rte'" in _err(capsys)


def test_model_without_mask_token(tmp_path, capsys, tiny_model_dir):
    import shutil

    folder = tmp_path / "nomask"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["mask_token"] = None
    cfg.pop("added_tokens_decoder", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<mask>"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    assert main(["fill", "--model", str(folder), "a <mask>"]) == 1
    assert "has no mask token" in _err(capsys)


def test_python_dash_m_help():
    p = run("--help")
    assert p.returncode == 0 and "quickstart" in p.stdout


@pytest.mark.parametrize("command", ["train", "check", "prepare", "eval", "fill", "serve", "quickstart"])
def test_every_subcommand_help(command, capsys):
    # a literal % in a field's doc once made argparse raise while formatting `mlmtune train --help`
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: mlmtune {command}")
    if command in ("train", "prepare", "check"):
        assert "train[:10%]" in out


@pytest.mark.numerics
def test_fill_precision_flag_reaches_the_model(tiny_model_dir, capsys):
    """`fill --precision bf16`: each token's score is its fp32 probability (the pipeline's, tested elsewhere)
    to 0.5% (measured: 0.18%), and not to fp32's 1e-6: the weights really ran in bf16."""
    from mlmtune.inference.fill import FillMask

    text = "The <mask> statement is used."
    assert main(["fill", "--model", str(tiny_model_dir), "--precision", "bf16", "--json", "--top-k", "3", text]) == 0
    preds = json.loads(capsys.readouterr().out)
    fp32 = FillMask.from_pretrained(str(tiny_model_dir))
    probs = fp32.mask_logits(fp32.encode([text]))[0][0].softmax(-1)
    exact = [float(probs[p["token"]]) for p in preds]
    assert [p["score"] for p in preds] == pytest.approx(exact, rel=5e-3)
    assert [p["score"] for p in preds] != pytest.approx(exact, rel=1e-6)


BAD_VALUES = [["train", "--dataset", "x", "--epochs", "inf"], ["fill", "--model", "x", "--top-k", "0", "a <mask>"],
              ["check", "--dataset", "x", "--block-size", "1"], ["eval", "--model", "x", "--dataset", "x",
                                                                 "--batch-size", "zero"],
              ["score", "--model", "x", "--metric", "bogus", "a"], ["serve", "--model", "x", "--port", "-5"],
              ["quickstart", "--learning-rate", "nan"], ["prepare", "--dataset", "x", "--test-size", "2"],
              ["probe", "--model", "x", "--task", "t.csv", "--seeds", "0"]]


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["serve", "--help"], ["train", "--bogus-flag"],
                                  *BAD_VALUES])
def test_help_bad_flags_and_bad_values_answer_without_importing_the_heavy_stack(args):
    """`mlmtune --help`, a mistyped flag and a bad value answer at once: torch, transformers and datasets
    (seconds to import) are imported only by the command that runs, after its config is resolved (and so
    validated)."""
    code = ("import sys\nfrom mlmtune.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'fastapi') if m in sys.modules]\n"
            "print(code, heavy)\n")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    expected = {"--help": "0", "--bogus-flag": "2"}.get(args[-1], "1")
    assert p.stdout.strip().splitlines()[-1] == f"{expected} []", p.stdout + p.stderr
    if expected == "1":  # the value's own message, on one line
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("mlmtune: error: --"), p.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1 (see `mlmtune train --help`)"),
    (["fill", "--top-k"], "argument --top-k: expected one argument (see `mlmtune fill --help`)"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND (see `mlmtune --help`)")])
def test_a_command_line_that_does_not_parse_is_one_line_and_exit_2(args, message):
    """argparse's usage block is replaced by one `mlmtune: error:` line that points at the right --help; the
    exit status stays argparse's 2 (a bad value, which parses, exits 1)."""
    p = run(*args)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("mlmtune: error: ") and message in p.stderr, p.stderr
    assert "usage:" not in p.stderr and p.stdout == ""
