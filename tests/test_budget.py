"""Head warm-up, the two-phase learning rate, --time-budget and TensorBoard logging."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlmtune.config_groups import parse_duration
from mlmtune.errors import MlmtuneError
from mlmtune.training import budget, resume, schedule
from mlmtune.training.train import train


@pytest.fixture(scope="module")
def headless_dir(tmp_path_factory, tiny_model_dir):
    """The tiny RoBERTa's encoder alone (as a sentence-transformers checkpoint is): no masked-LM head."""
    from transformers import AutoTokenizer, RobertaForMaskedLM

    folder = tmp_path_factory.mktemp("headless")
    RobertaForMaskedLM.from_pretrained(tiny_model_dir).roberta.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("total, warmup", [(10, 0), (10, 3), (7, 7), (50, 5)])
def test_lr_without_head_warmup_is_transformers_linear_schedule(total, warmup):
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(opt, warmup, total)
    for step in range(total + 2):
        assert schedule.lr_factor(step, total, warmup) == pytest.approx(reference.lr_lambdas[0](step))


def test_lr_with_head_warmup_is_constant_then_a_fresh_schedule():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rest = get_linear_schedule_with_warmup(opt, 2, 8).lr_lambdas[0]  # the 8 steps after 4 head steps
    assert [schedule.lr_factor(s, 12, 2, head_steps=4, head_factor=10.0) for s in range(4)] == [10.0] * 4
    for s in range(4, 12):
        assert schedule.lr_factor(s, 12, 2, head_steps=4, head_factor=10.0) == pytest.approx(rest(s - 4))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("3m", 180), ("1h30m", 5400), ("2.5m", 150), ("45", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3 minutes", "m", "3x", ""])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(MlmtuneError, match="is not a duration"):
        parse_duration(text)


def test_head_warmup_trains_the_head_alone_then_everything(headless_dir, configs, tmp_path):
    """Steps 1-2 change the new head only; steps 3-4 change the encoder too; the logs say so."""
    out = tmp_path / "run"
    result = train(configs(out, model=str(headless_dir), max_steps=4, head_warmup_steps=2, logging_steps=2,
                           report_to="tensorboard"), progress=False)
    start = load_file(str(headless_dir / "model.safetensors"))  # the encoder as it was
    at2 = load_file(str(out / "checkpoints" / "step-0000002" / "model.safetensors"))
    at4 = load_file(str(out / "model.safetensors"))
    # the input embedding is also the head's decoder (saved once, under the decoder's name)
    tied, decoder = "embeddings.word_embeddings.weight", "lm_head.decoder.weight"
    encoder = [k for k in at2 if k.startswith("roberta.")]
    head = [k for k in at2 if k.startswith("lm_head.") and k != decoder]
    assert encoder and head and tied not in (k.removeprefix("roberta.") for k in encoder)
    for k in encoder:
        assert torch.equal(at2[k], start[k.removeprefix("roberta.")]), k
    assert not torch.equal(at2[decoder], start[tied])  # it trains with the head
    assert all(not torch.equal(at2[k], at4[k]) for k in head)
    assert sum(not torch.equal(at2[k], at4[k]) for k in encoder) > 0.9 * len(encoder)
    m = result.metrics
    assert m["head_warmup_steps"] == 2 and m["train_steps"] == 4
    assert m["eval_loss_after"] < m["eval_loss_before"]

    # TensorBoard's own reader finds every number, at its step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [s for s, _ in scalars["train/loss"]] == [2, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([e["loss"] for e in m["train_loss"]])
    # the rate the next step uses: after the 2 head steps the whole model starts at 1e-2, decaying to 0
    assert [v for _, v in scalars["train/learning_rate"]] == pytest.approx([1e-2, 0.0])
    assert [s for s, _ in scalars["eval/loss"]] == [0, 4]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([m["eval_loss_before"], m["eval_loss_after"]])
    assert scalars["eval/perplexity"][-1][1] == pytest.approx(m["perplexity_after"], rel=1e-5)
    # each window of 2 steps trains 2 x 4 x 32 tokens; its seconds add up to the run's training time
    windows = [256 / v for _, v in scalars["train/tokens_per_second"]]
    assert m["train_tokens"] == 4 * 4 * 32 and len(windows) == 2
    assert sum(windows) == pytest.approx(m["train_seconds"], abs=2e-3)


def test_a_new_head_gets_a_warmup_by_default(headless_dir, configs, tmp_path):
    from mlmtune.distributed import Dist
    from mlmtune.model.load import load_model

    def planned(model_dir, **over):
        cfg = configs(tmp_path / "unused", model=str(model_dir), **over)
        model, _ = load_model(cfg.model)
        return budget.resolve_steps(cfg, Dist(), model, 100, torch.device("cpu"), probe=None)[0]

    cfg = planned(headless_dir, max_steps=10)
    assert cfg.optim.head_warmup_steps == 1 and cfg.optim.head_learning_rate == budget.DEFAULT_HEAD_LR  # 10% of 10
    assert planned(headless_dir, max_steps=None, epochs=2, batch_size=5).optim.head_warmup_steps == 4  # 10% of 2 x 20
    cfg = planned(configs.base["model"], max_steps=10)
    assert cfg.optim.head_warmup_steps == 0 and cfg.optim.head_learning_rate is None  # the model came with its head
    assert planned(headless_dir, max_steps=10, head_warmup_steps=0).optim.head_warmup_steps == 0  # asked for none


def _fake_probe(asked):
    """An engine's probe that says a full step takes 0.2 s and a head-only step 0.1 s."""
    def probe(head_only: bool) -> float:
        asked.append(head_only)
        return 0.1 if head_only else 0.2

    return lambda: probe


def test_time_budget_picks_the_steps_and_resume_keeps_them(headless_dir, configs, tmp_path, monkeypatch):
    """3.05 s at 0.2 s a full step and 0.1 s a head step: 15% of the time (0.4575 s) buys 4 head steps, the
    2.65 s left 13 full steps. The counts are saved with the checkpoints; a resumed run takes them from there."""
    asked = []
    monkeypatch.setattr("mlmtune.training.torch_engine.TorchEngine.probe",
                        staticmethod(lambda *args: _fake_probe(asked)()))
    out = tmp_path / "run"
    cfg = configs(out, model=str(headless_dir), max_steps=None, time_budget="3.05s", save_steps=5)

    def stop_at_5(step, seconds):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(MlmtuneError, match="interrupted at step 5"):
        train(cfg, progress=False, on_step=stop_at_5)
    assert asked == [False, True]  # a full step and, for the new head, a head-only step
    planned = resume.read_state(out / "checkpoints" / "step-0000005").config
    assert planned["schedule"]["time_budget"] == "3.05s" and planned["schedule"]["max_steps"] == 4 + 13
    assert planned["optim"]["head_warmup_steps"] == 4

    def no_probe(*a, **k):
        raise AssertionError("a resumed run must not measure again")

    monkeypatch.setattr("mlmtune.training.torch_engine.TorchEngine.probe", staticmethod(no_probe))
    result = train(configs(out, model=str(headless_dir), max_steps=None, time_budget="3.05s", save_steps=5,
                           resume=True), progress=False)
    m = result.metrics
    assert m["train_steps"] == 17 and m["head_warmup_steps"] == 4
    saved_cfg = yaml.safe_load((out / "mlmtune_config.yaml").read_text())
    assert saved_cfg["schedule"]["max_steps"] == 17 and saved_cfg["schedule"]["time_budget"] == "3.05s"


def test_max_steps_caps_a_time_budget(headless_dir, configs, tmp_path):
    cfg = configs(tmp_path / "unused", model=str(headless_dir), max_steps=6, time_budget="3.05s")
    plan = budget.plan_budget(cfg, new_head=True, probe=_fake_probe([])())
    assert (plan.max_steps, plan.head_warmup_steps) == (6, 4)
    plan = budget.plan_budget(cfg, new_head=False, probe=_fake_probe([])())
    assert (plan.max_steps, plan.head_warmup_steps, plan.head_step_seconds) == (6, 0, None)


def test_time_budget_too_short_for_one_step(configs, tmp_path):
    """The real probe, on this machine: no step fits in a millisecond."""
    with pytest.raises(MlmtuneError, match="does not fit one training step"):
        train(configs(tmp_path / "run", max_steps=None, time_budget="0.001s"), progress=False)


def test_report_to_tensorboard_needs_the_package(configs, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(MlmtuneError, match=r"pip install 'mlmtune\[tensorboard\]'"):
        train(configs(tmp_path / "run", report_to="tensorboard"), progress=False)
    assert not (tmp_path / "run" / "runs").exists()


def test_frozen_lower_layers_stay_as_loaded_after_the_head_phase(headless_dir, configs, tmp_path, capsys):
    out = tmp_path / "run"
    train(configs(out, model=str(headless_dir), max_steps=4, head_warmup_steps=2, freeze_layers=1), progress=False)
    start, end = load_file(str(headless_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    frozen = [k for k in start if k.startswith(("embeddings.", "encoder.layer.0.")) and "word_embeddings" not in k]
    upper = [k for k in start if k.startswith("encoder.layer.1.")]
    assert frozen and upper
    assert all(torch.equal(start[k], end[f"roberta.{k}"]) for k in frozen)
    assert sum(not torch.equal(start[k], end[f"roberta.{k}"]) for k in upper) > 0.9 * len(upper)
    tied = end.get("lm_head.decoder.weight", end.get("roberta.embeddings.word_embeddings.weight"))  # saved once
    assert not torch.equal(start["embeddings.word_embeddings.weight"], tied)  # the decoder trains, from the head
    with pytest.raises(MlmtuneError, match="--freeze-layers 2: .* has 2 encoder layers, so at most 1 can be frozen"):
        train(configs(tmp_path / "too-many", model=str(headless_dir), freeze_layers=2), progress=False)
