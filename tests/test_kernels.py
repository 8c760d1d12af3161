"""What a GPU user tunes, checked on the CPU: activation checkpointing, the attention kernels, and the throughput
figures (tokens/s, MFU, peak memory) that the log lines and metrics.json report."""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch
from safetensors.torch import load_file


def _layer_calls(monkeypatch) -> dict[str, int]:
    """Count the runs of a RoBERTa layer's MLP (RobertaLayer.forward itself is transformers' checkpointing
    wrapper): with activation checkpointing each training pass runs it twice (once more to recompute it in the
    backward)."""
    from transformers.models.roberta import modeling_roberta

    calls = {"n": 0}
    forward = modeling_roberta.RobertaIntermediate.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_roberta.RobertaIntermediate, "forward", counted)
    return calls


def test_gradient_checkpointing_trains_the_same_steps(configs, tmp_path, monkeypatch):
    """--gradient-checkpointing recomputes each layer in the backward pass (the layer runs once more per training
    pass) and gives the same losses and weights as the run that keeps the activations, dropout included."""
    from mlmtune.training.train import train

    calls = _layer_calls(monkeypatch)
    plain = train(configs(tmp_path / "plain", max_steps=4, save_steps=100), progress=False)
    plain_calls, calls["n"] = calls["n"], 0
    ckpt = train(configs(tmp_path / "ckpt", max_steps=4, save_steps=100, gradient_checkpointing=True), progress=False)
    # 4 steps x 1 micro-batch x 2 layers recomputed; evaluation runs without gradients, so once
    assert calls["n"] - plain_calls == 4 * 2
    assert [r["loss"] for r in ckpt.metrics["train_loss"]] == [r["loss"] for r in plain.metrics["train_loss"]]
    w1, w2 = (load_file(str(r.output_dir / "model.safetensors")) for r in (plain, ckpt))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()).get("gradient_checkpointing") is not True


def test_eager_and_sdpa_attention_train_alike(configs, tmp_path, tiny_model_dir):
    """--attn-implementation reaches from_pretrained: eager (the matmul-softmax written out) and sdpa (the fused
    kernel) give the same losses to float32's order of sums."""
    from mlmtune.model.load import load_model
    from mlmtune.training.train import train

    assert load_model(str(tiny_model_dir), attn_implementation="eager")[0].config._attn_implementation == "eager"
    runs = {
        impl: train(
            configs(tmp_path / impl, max_steps=3, save_steps=100, attn_implementation=impl), progress=False
        ).metrics
        for impl in ("eager", "sdpa")
    }
    eager, sdpa = ([r["loss"] for r in runs[i]["train_loss"]] for i in ("eager", "sdpa"))
    assert sdpa == pytest.approx(eager, rel=1e-5)
    assert runs["sdpa"]["eval_loss_after"] == pytest.approx(runs["eager"]["eval_loss_after"], rel=1e-5)


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "fast",
            "--attn-implementation must be one of sdpa, eager, flash_attention_2, flash_attention_3, "
            "flex_attention, got 'fast'",
        ),
        ("flash_attention_2", "--attn-implementation flash_attention_2"),
    ],
)
def test_an_attention_kernel_that_is_not_here_is_one_line_before_training(configs, tmp_path, capsys, value, message):
    from mlmtune.cli import main

    flags = configs.flags(tmp_path / "run", attn_implementation=value)
    argv = ["train"]
    for key, v in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(v)]
    if value == "flash_attention_2":
        pytest.importorskip("torch")
        try:
            import flash_attn  # noqa: F401

            pytest.skip("flash-attn is installed here")
        except ImportError:
            pass
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlmtune: error: ") and message in err[0], err
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_tokens_per_second_and_memory_are_measured_and_no_mfu_on_a_cpu(configs, tmp_path):
    """metrics.json's tokens/s agrees with the tokens of the blocks trained over the wall time of the steps timed
    here; a CPU gets no MFU (no datasheet peak), and its memory figure is the process's peak RSS, named so and
    equal to what the OS reports for this process."""
    from mlmtune.training.train import train

    seconds: list[float] = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    result = train(
        configs(tmp_path / "run", max_steps=6, save_steps=100),
        progress=False,
        on_step=lambda step, s: seconds.append(s),
    )
    wall = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    m = result.metrics
    tokens = 6 * 4 * 32  # steps x blocks x block size
    assert m["train_tokens"] == tokens and len(seconds) == 6
    measured = tokens / sum(seconds)
    assert 0.5 < m["train_tokens_per_second"] / measured < 2.0
    assert m["train_tokens_per_second"] > tokens / wall  # the run's wall time holds evaluations and the save too
    assert "mfu" not in m and "peak_gpu_memory_gb" not in m
    assert rss_before - 0.01 <= m["process_peak_rss_gb"] <= rss_after + 0.01
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["process_peak_rss_gb"] == m["process_peak_rss_gb"]
    )


def test_model_flops_per_token_by_hand(tiny_model_dir):
    """6 x the parameters of the layers and the head (the head at the 15% masked share: RoBERTa's runs sparse),
    plus attention's 12 x layers x block x hidden, counted from the config by hand."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from mlmtune.model.forward import has_sparse_head
    from mlmtune.training.throughput import flops_per_token

    c = AutoConfig.from_pretrained(tiny_model_dir)
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    assert has_sparse_head(model)
    h, ff, v, n = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    layer = 4 * (h * h + h) + 2 * h + (h * ff + ff) + (ff * h + h) + 2 * h  # q k v o, 2 LayerNorms, the MLP
    head = (h * h + h) + 2 * h + (v * h) + v  # dense, LayerNorm, the tied decoder, its bias
    assert flops_per_token(model, 32, 0.15) == pytest.approx(6 * n * layer + 12 * n * 32 * h + 6 * 0.15 * head)


def test_mfu_uses_the_datasheet_peak_of_the_named_gpu():
    from mlmtune.training.throughput import datasheet_peak

    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert datasheet_peak("NVIDIA H200", "fp32") == 494e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert datasheet_peak("NVIDIA GeForce RTX 3090", "bf16") is None


def test_fill_score_and_serve_default_to_bf16_on_a_fast_gpu_and_fp32_on_a_cpu(monkeypatch):
    from mlmtune import device as device_mod
    from mlmtune.inference_config import FillConfig, ScoreConfig, ServeConfig

    assert FillConfig().precision == ScoreConfig().precision == ServeConfig().precision == "auto"
    assert device_mod.inference_precision("auto", torch.device("cpu")) == "fp32"
    assert device_mod.inference_precision("fp16", torch.device("cpu")) == "fp16"
    monkeypatch.setattr(device_mod, "fast_bf16", lambda d: True)  # an Ampere or newer GPU
    assert device_mod.inference_precision("auto", torch.device("cuda")) == "bf16"
    assert device_mod.inference_precision("auto", torch.device("cpu")) == "fp32"  # a CPU's results stay fp32's
    monkeypatch.setattr(device_mod, "fast_bf16", lambda d: False)  # a V100 or T4
    assert device_mod.inference_precision("auto", torch.device("cuda")) == "fp32"


def test_score_precision_casts_the_weights_and_auto_on_a_cpu_is_fp32(tiny_model_dir):
    """`score --precision bf16` scores with bf16 weights, close to fp32 (hand check: log-softmax of the model's own
    fp32 logits at the masked token); auto on a CPU is the fp32 score exactly."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmtune.inference.scoring import Scorer

    text = "The interpreter reads a module."
    auto, bf16 = (Scorer.from_pretrained(str(tiny_model_dir), precision=p) for p in ("auto", "bf16"))
    assert next(auto.model.parameters()).dtype == torch.float32
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a = auto.score_encoded([text], auto.encode([text]), "original")[0]
    b = bf16.score_encoded([text], bf16.encode([text]), "original")[0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).eval()
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(ids) - 1):  # each token but the special ones, masked in turn
            masked = ids.clone()
            masked[i] = tok.mask_token_id
            total += model(masked[None]).logits[0, i].log_softmax(-1)[ids[i]].item()
    assert a.pll == pytest.approx(total, rel=1e-5)
    assert b.pll == pytest.approx(total, rel=0.05) and b.pll != a.pll
