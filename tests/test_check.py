"""`mlmtune check`: every problem named before compute is spent, plus estimates of the run."""

from __future__ import annotations

import json
import resource
import shutil
import time

from mlmtune.cli import main


def _peak_gb() -> float:
    """The process's peak resident memory so far (what the probe reports on a CPU), read independently."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def timed_check(args: list[str]) -> tuple[int, float, float, float]:
    """`main(args)`, and around it: the peak memory before and after, and the wall time."""
    before, t0 = _peak_gb(), time.perf_counter()
    code = main(args)
    return code, before, _peak_gb(), time.perf_counter() - t0


def assert_measured(est: dict[str, str], before: float, after: float, wall: float) -> None:
    """On a CPU the probe's peak is the process's: between its peak before the check and after it (to the 0.01 GB it
    is rounded to); a step takes less than the whole check."""
    assert before - 0.005 <= float(est["peak_memory_gb"]) <= after + 0.005, (est, before, after)
    assert 0 < float(est["seconds_per_step"]) < wall


def _corpus(tmp_path, docs_texts):
    """Records with empty texts and with eval texts repeated word for word in train."""
    path = tmp_path / "corpus.jsonl"
    texts = docs_texts[:300] + ["", "   "] + docs_texts[:40]  # 40 exact duplicates
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return path


def test_check_reports_findings_and_estimates(tiny_model_dir, tmp_path, docs_texts, capsys):
    data = _corpus(tmp_path, docs_texts)
    code, before, after, wall = timed_check(["check", "--model", str(tiny_model_dir), "--dataset", str(data),
                                             "--block-size", "32", "--batch-size", "4", "--epochs", "2",
                                             "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "warning  2 of 342 records have empty or whitespace-only text" in out
    dup = [line for line in out.splitlines() if "word for word" in line]
    assert len(dup) == 1 and int(dup[0].split()[1]) > 0  # the repeats that the split put into the eval part
    # the estimates agree with a hand count from the reported block numbers
    est = dict(kv.split(": ") for kv in out.split("estimate ")[1].strip().split(", "))
    train_blocks = int(est["train_blocks"])
    assert f"train: {train_blocks:,} blocks of 32 tokens" in out
    assert int(est["steps_per_epoch"]) == -(-train_blocks // 4)
    assert int(est["total_steps"]) == 2 * int(est["steps_per_epoch"])
    assert_measured(est, before, after, wall)
    assert "m" in est["run_time"] and "s" in est["run_time"]


def test_check_names_errors_and_exits_1(tiny_model_dir, tmp_path, docs_texts, capsys):
    data = _corpus(tmp_path, docs_texts)
    code = main(["check", "--model", str(tiny_model_dir), "--dataset", str(data), "--block-size", "4096",
                 "--no-probe"])
    captured = capsys.readouterr()
    assert code == 1
    assert "error  --block-size 4096 is larger than the model's maximum length 64" in captured.out
    assert captured.err.strip() == "mlmtune: error: --block-size 4096 is larger than the model's maximum length 64"


def test_pad_equal_to_eos_is_a_warning(tiny_model_dir, tmp_path, docs_texts, capsys):
    """The guide's `tokenizer.pad_token = tokenizer.eos_token`, saved into a model folder."""
    folder = tmp_path / "pad-is-eos"
    shutil.copytree(tiny_model_dir, folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    code = main(["check", "--model", str(folder), "--dataset", str(_corpus(tmp_path, docs_texts)),
                 "--block-size", "32", "--no-probe", "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0
    assert "warning  the pad token is the end-of-sequence token ('</s>')" in out


def test_non_string_values_are_an_error(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "numbers.jsonl"
    data.write_text("\n".join(json.dumps({"text": i}) for i in range(50)))
    assert main(["check", "--model", str(tiny_model_dir), "--dataset", str(data), "--block-size", "32",
                 "--no-probe"]) == 1
    assert "--text-field text holds int values, not text" in capsys.readouterr().out
