"""One schema: defaults < config file < flags, validated once."""

from __future__ import annotations

import pytest

from mlmtune.config import DataConfig, TrainConfig
from mlmtune.errors import MlmtuneError
from mlmtune.options import field_doc, flat_fields, load_config_file, resolve, save_config


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


def test_grouped_and_flat_yaml_make_the_same_config_and_every_leaf_has_its_help(tmp_path):
    flat, grouped = tmp_path / "flat.yaml", tmp_path / "grouped.yaml"
    flat.write_text("learning_rate: 1.0e-4\nmax_steps: 5\nprecision: fp32\nreport_to: tensorboard\n"
                    "cloze_words: none\ndownstream_seeds: 2\n")
    grouped.write_text("optim:\n  learning_rate: 1.0e-4\nschedule: {max_steps: 5}\ncompute: {precision: fp32}\n"
                       "output: {report_to: tensorboard}\nmeasure:\n  cloze_words: none\n  downstream:\n"
                       "    downstream_seeds: 2\n")
    a, b = (resolve(TrainConfig, load_config_file(f), {"dataset": "x"}) for f in (flat, grouped))
    assert a == b and a.optim.learning_rate == 1e-4 and a.schedule.max_steps == 5
    assert a.measure.downstream.downstream_seeds == 2 and a.output.report_to == "tensorboard"
    assert all(field_doc(TrainConfig, name) for name in flat_fields(TrainConfig))  # the groups' docs are found
    assert len(flat_fields(TrainConfig)) == 55  # no leaf name in two groups (one would hide the other)


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
