"""examples/*.yaml: each opens with the command that runs it, that command parses, the file loads through the
config loader and, with the command's flags, resolves into a valid TrainConfig; the two that fit a tiny model run
a few steps through the real CLI."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from mlmtune.cli import _config, build_parser, main
from mlmtune.config import TrainConfig
from mlmtune.options import flat_fields, flatten, load_config_file, to_dict

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def command(path: Path) -> list[str]:
    """The arguments of the `mlmtune` command in the file's first line (after torchrun's own, if any)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), path.name
    words = shlex.split(first[2:])
    at = words.index("mlmtune")
    assert words[:at] in ([], ["torchrun", "--nproc_per_node", "4", "-m"]), words
    return words[at + 1:]


def test_there_are_examples_and_each_is_listed():
    assert {p.name for p in EXAMPLES} >= {"guide.yaml", "modernbert.yaml", "torchrun.yaml", "streaming.yaml"}
    listed = (ROOT / "examples" / "README.md").read_text()
    assert all(f"]({p.name})" in listed for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_is_a_valid_config_run_by_its_own_command(path):
    args = command(path)
    assert args[:3] == ["train", "--config", f"examples/{path.name}"]
    raw = yaml.safe_load(path.read_text())
    flat = load_config_file(path)
    assert set(flat) <= set(flat_fields(TrainConfig)) and len(flat) >= 5
    assert all(not isinstance(v, dict) for v in flat.values()) and raw  # nested sections flattened
    parsed = build_parser().parse_args(["train", "--config", str(path), *args[3:]])
    cfg = _config(TrainConfig, parsed)  # raises MlmtuneError on any bad value
    leaves = flatten(to_dict(cfg))  # the config's groups, by leaf name
    for name, value in flat.items():  # every value of the file reaches the config
        assert leaves[name] == value, name


@pytest.mark.parametrize(("name", "data"), [("guide.yaml", "eli5"), ("streaming.yaml", "text")])
def test_the_tiny_ones_run(name, data, tiny_model_dir, eli5_like, docs_texts, tmp_path, session_cache, capsys):
    """The file's settings with the tiny model and a small corpus, for 2 steps of 32-token blocks."""
    if data == "text":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(docs_texts[:300]))
    else:
        corpus = eli5_like
    extra = ["--eval-records", "40"] if name == "streaming.yaml" else []
    out = tmp_path / "out"
    assert main(["train", "--config", str(ROOT / "examples" / name), "--model", str(tiny_model_dir), "--dataset",
                 str(corpus), "--block-size", "32", "--max-steps", "2", "--save-steps", "2", "--output-dir",
                 str(out), "--general-eval", "none", "--cloze-words", "none", "--cache-dir", session_cache,
                 *extra]) == 0
    saved = flatten(yaml.safe_load((out / "mlmtune_config.yaml").read_text()))  # its groups, by leaf name
    file_values = load_config_file(ROOT / "examples" / name)
    for key in ("learning_rate", "mlm_probability", "weight_decay", "streaming", "text_field", "split"):
        if key in file_values:  # the file's values are the run's
            assert saved[key] == file_values[key], key
    assert "model saved in" in capsys.readouterr().out
