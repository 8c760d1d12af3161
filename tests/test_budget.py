"""Head warm-up, the two-phase learning rate, --time-budget and TensorBoard logging."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlmtune import checkpoint as ckpt
from mlmtune import schedule
from mlmtune.config import TrainConfig, resolve
from mlmtune.errors import MlmtuneError
from mlmtune.train import train


@pytest.fixture(scope="module")
def headless_dir(tmp_path_factory, tiny_model_dir):
    """The tiny RoBERTa's encoder alone (as a sentence-transformers checkpoint is): no masked-LM head."""
    from transformers import AutoTokenizer, RobertaForMaskedLM

    folder = tmp_path_factory.mktemp("headless")
    RobertaForMaskedLM.from_pretrained(tiny_model_dir).roberta.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _cfg(model_dir, out, eli5_like, cache_dir, **over):
    flags = {"model": str(model_dir), "dataset": str(eli5_like), "text_field": "answers.text", "block_size": 32,
             "batch_size": 4, "max_steps": 6, "learning_rate": 1e-2, "save_steps": 2, "save_total_limit": 10,
             "output_dir": str(out), "cache_dir": cache_dir, "precision": "fp32", "logging_steps": 2, **over}
    return resolve(TrainConfig, {}, flags)


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
    assert schedule.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3 minutes", "m", "3x", ""])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(MlmtuneError, match="is not a duration"):
        schedule.parse_duration(text)


def test_head_warmup_trains_the_head_alone_then_everything(headless_dir, tmp_path, eli5_like, cache_dir):
    """Steps 1-2 change the new head only; steps 3-4 change the encoder too; the logs say so."""
    out = tmp_path / "run"
    result = train(_cfg(headless_dir, out, eli5_like, cache_dir, max_steps=4, head_warmup_steps=2,
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
    assert all(v > 0 for _, v in scalars["train/tokens_per_second"])


def test_a_new_head_gets_a_warmup_by_default(headless_dir, tiny_model_dir, tmp_path, eli5_like, cache_dir):
    m = train(_cfg(headless_dir, tmp_path / "a", eli5_like, cache_dir, max_steps=10, save_steps=10),
              progress=False).metrics
    assert m["head_warmup_steps"] == 1  # 10% of 10 steps
    m = train(_cfg(tiny_model_dir, tmp_path / "b", eli5_like, cache_dir, max_steps=2), progress=False).metrics
    assert m["head_warmup_steps"] == 0  # the model came with its head


def test_time_budget_picks_the_steps_and_resume_keeps_them(headless_dir, tmp_path, eli5_like, cache_dir,
                                                           monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(headless_dir, out, eli5_like, cache_dir, max_steps=None, time_budget="3s", save_steps=5)
    seen = []

    def stop_at_5(step, seconds):
        seen.append(step)
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(MlmtuneError, match="interrupted at step 5"):
        train(cfg, progress=False, on_step=stop_at_5)
    planned = ckpt.read_state(out / "checkpoints" / "step-0000005").config
    assert planned["time_budget"] == "3s" and planned["max_steps"] > 5
    assert 0 < planned["head_warmup_steps"] < planned["max_steps"]

    def no_probe(*a, **k):
        raise AssertionError("a resumed run must not measure again")

    monkeypatch.setattr("mlmtune.run.plan_budget", no_probe)
    result = train(_cfg(headless_dir, out, eli5_like, cache_dir, max_steps=None, time_budget="3s", save_steps=5,
                        resume=True), progress=False)
    m = result.metrics
    assert m["train_steps"] == planned["max_steps"] and m["head_warmup_steps"] == planned["head_warmup_steps"]
    saved_cfg = yaml.safe_load((out / "mlmtune_config.yaml").read_text())
    assert saved_cfg["max_steps"] == planned["max_steps"] and saved_cfg["time_budget"] == "3s"
    # the probe measured this machine: the steps it allowed fit the budget (generously, on a loaded machine)
    assert m["train_seconds"] < 3 * 3


def test_time_budget_too_short_for_one_step(tiny_model_dir, tmp_path, eli5_like, cache_dir):
    with pytest.raises(MlmtuneError, match="does not fit one training step"):
        train(_cfg(tiny_model_dir, tmp_path / "run", eli5_like, cache_dir, max_steps=None, time_budget="0.001s"),
              progress=False)


def test_report_to_tensorboard_needs_the_package(tiny_model_dir, tmp_path, eli5_like, cache_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(MlmtuneError, match=r"pip install 'mlmtune\[tensorboard\]'"):
        train(_cfg(tiny_model_dir, tmp_path / "run", eli5_like, cache_dir, report_to="tensorboard"), progress=False)
    assert not (tmp_path / "run" / "runs").exists()
