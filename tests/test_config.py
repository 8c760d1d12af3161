"""One schema: defaults < config file < flags, validated once."""

from __future__ import annotations

import pytest

from mlmtune.config import DataConfig, TrainConfig
from mlmtune.errors import MlmtuneError
from mlmtune.options import load_config_file, resolve, save_config


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1.0e-4\nbatch-size: 4\ndata:\n  block_size: 64\n  text_field: answers.text\n")
    cfg = resolve(TrainConfig, load_config_file(f), {"dataset": "x.jsonl", "batch_size": "2"})
    assert cfg.optim.learning_rate == 1e-4    # from the file
    assert cfg.schedule.batch_size == 2       # the flag beats the file
    assert cfg.data.block_size == 64 and cfg.data.text_field == "answers.text"
    assert cfg.optim.weight_decay == 0.01 and cfg.schedule.epochs == 3
    assert cfg.mlm_probability == 0.15 and cfg.data.held_out == 0.2  # the guide's defaults


def test_saved_config_reads_back_to_the_same_config(tmp_path):
    cfg = resolve(TrainConfig, {}, {"dataset": "x.jsonl", "max_steps": "7"})
    save_config(cfg, tmp_path)
    again = resolve(TrainConfig, load_config_file(tmp_path / "mlmtune_config.yaml"), {})
    assert again == cfg


@pytest.mark.parametrize("values, message", [
    ({"resume": "maybe"}, "--resume expects bool"),
    ({"max_steps": "2.5"}, "--max-steps expects int"),
    ({"test_size": "1"}, "--test-size must be in"),
    ({"mlm_probability": "0"}, "--mlm-probability must be in"),
    ({"precision": "fp8"}, "--precision must be one of auto, fp32, bf16"),
    ({"nonsense": "1"}, "unknown option 'nonsense'"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(MlmtuneError, match=message):
        resolve(TrainConfig, {}, {"dataset": "x.jsonl", **values})


def test_false_strings_are_false():
    # the run_mlm.py `type=bool` trap: "False" must not parse as True
    assert resolve(TrainConfig, {"resume": "False"}, {"dataset": "x"}).output.resume is False
    assert resolve(TrainConfig, {"resume": False}, {"dataset": "x"}).output.resume is False


def test_configs_are_frozen():
    cfg = DataConfig(dataset="x")
    with pytest.raises(AttributeError):
        cfg.block_size = 3  # type: ignore[misc]
