"""The training loop: it learns, writes an ordinary HF folder, and resumes to the same result."""

from __future__ import annotations

import json

import pytest
import torch
from compare import assert_same_as_pipeline, assert_same_weights

from mlmtune.errors import MlmtuneError
from mlmtune.training.train import train


def _fixed_mask_loss(model_folder, configs, out):
    """The eval loss of a model folder on the run's fixed eval masks, through plain transformers: the dense
    forward of `AutoModelForMaskedLM` and its own token-weighted loss, in one batch."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmtune.data.blocks import Blocks
    from mlmtune.data.masking import Masker, fixed_eval_masks
    from mlmtune.data.prepare import prepare_blocks

    cfg = configs(out)
    tok = AutoTokenizer.from_pretrained(model_folder)
    blocks, _ = prepare_blocks(cfg.data, tok, cfg.seed)
    inputs, labels = fixed_eval_masks(Blocks(blocks["test"]), Masker.from_tokenizer(tok), cfg.seed)
    with torch.no_grad():
        return float(AutoModelForMaskedLM.from_pretrained(model_folder).eval()(input_ids=inputs, labels=labels).loss)


@pytest.mark.numerics
def test_train_learns_and_writes_a_model_folder(reference_run, configs, tiny_model_dir, tmp_path):
    out, m = reference_run.folder, reference_run.metrics
    assert m["perplexity_after"] < 0.9 * m["perplexity_before"]
    assert m["train_steps"] == 8 and m["epochs"][-1]["step"] == 8
    assert m["train_tokens"] == 8 * 4 * 32  # steps x blocks x tokens: every token of every block trains
    # the rate is that count over the seconds reported (rounded to 1 ms and to 0.1 token/s)
    rate, seconds = m["train_tokens_per_second"], m["train_seconds"]
    assert rate == pytest.approx(8 * 4 * 32 / seconds, abs=0.05 + rate * 5e-4 / seconds)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "training_curves.png",
                 "README.md", "mlmtune_config.yaml"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card and f"{m['perplexity_after']:,.2f}" in card
    # the folder holds the trained model: plain transformers scores it as the run reported, before and after
    assert _fixed_mask_loss(out, configs, tmp_path) == pytest.approx(m["eval_loss_after"], rel=1e-5)
    assert _fixed_mask_loss(tiny_model_dir, configs, tmp_path) == pytest.approx(m["eval_loss_before"], rel=1e-5)
    # and the pipeline fills with it as mlmtune's fill does
    from transformers import pipeline

    from mlmtune.inference.fill import FillMask

    text = "The <mask> statement."
    assert_same_as_pipeline(FillMask.from_pretrained(str(out))(text, top_k=3),
                            pipeline("fill-mask", model=str(out))(text, top_k=3))


@pytest.mark.numerics
def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(reference_run, configs, tmp_path):
    assert [p.name for p in sorted((reference_run.folder / "checkpoints").iterdir())] == \
        ["step-0000002", "step-0000004", "step-0000006", "step-0000008"]
    # a second run that only got as far as the step-2 checkpoint, then resumed
    part = reference_run.copy_up_to(2, tmp_path / "part")
    resumed = train(configs(part, resume=True), progress=False)
    assert_same_weights(part, reference_run.weights)
    assert resumed.metrics["eval_loss_after"] == pytest.approx(reference_run.metrics["eval_loss_after"], rel=1e-6)
    assert resumed.metrics["eval_loss_before"] == reference_run.metrics["eval_loss_before"]  # kept from the start


@pytest.mark.numerics
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same(reference_run, configs, tmp_path, monkeypatch):
    import mlmtune.training.torch_engine as engine_mod

    real = engine_mod.backward_masked  # one call per optimizer step
    calls = {"n": 0}

    def interrupt_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(engine_mod, "backward_masked", interrupt_in_step_4)
    with pytest.raises(MlmtuneError, match="interrupted at step 3; checkpoint saved in .*--resume"):
        train(configs(out, save_steps=100), progress=False)
    monkeypatch.setattr(engine_mod, "backward_masked", real)

    resumed = train(configs(out, save_steps=100, resume=True), progress=False)
    assert_same_weights(out, reference_run.weights)
    full = reference_run.metrics
    assert [e["step"] for e in resumed.metrics["epochs"]] == [e["step"] for e in full["epochs"]]
    assert resumed.metrics["eval_loss_after"] == pytest.approx(full["eval_loss_after"], rel=1e-6)


def test_a_second_ctrl_c_inside_a_step_lets_the_step_finish(reference_run, configs, tmp_path, monkeypatch):
    """The second Ctrl-C lands in the middle of step 4's update: the step ends, is counted, and is saved, so the
    checkpoint holds whole steps and the resumed run still ends on the reference."""
    import os
    import signal

    import mlmtune.training.torch_engine as engine_mod

    real = engine_mod.Precision.step
    calls = {"n": 0}

    def two_ctrl_c_in_the_update(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # the second, while the weights change
        return real(self, *args, **kwargs)

    out = tmp_path / "twice"
    monkeypatch.setattr(engine_mod.Precision, "step", two_ctrl_c_in_the_update)
    with pytest.raises(MlmtuneError, match="interrupted at step 4; checkpoint saved in .*step-0000004"):
        train(configs(out, save_steps=100), progress=False)
    monkeypatch.setattr(engine_mod.Precision, "step", real)
    train(configs(out, save_steps=100, resume=True), progress=False)
    assert_same_weights(out, reference_run.weights)


def test_output_dir_in_use_needs_resume(configs, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(MlmtuneError, match="is not empty; pass --resume"):
        train(configs(out), progress=False)
    assert [p.name for p in out.iterdir()] == ["something"]


def test_resume_with_other_settings_is_refused(reference_run, configs, tmp_path):
    out = reference_run.copy_up_to(4, tmp_path / "run")
    with pytest.raises(MlmtuneError, match=r"other settings \(learning_rate: 0.01 -> 0.001\)"):
        train(configs(out, learning_rate=1e-3, resume=True), progress=False)


def test_metrics_json_has_the_documented_fields(reference_run):
    m = json.loads((reference_run.folder / "metrics.json").read_text())
    assert m == json.loads(json.dumps(reference_run.metrics))  # what train() returned, as written
    for key in ("eval_loss_before", "perplexity_before", "eval_loss_after", "perplexity_after", "epochs",
                "train_tokens_per_second", "train_steps", "eval_masked_tokens", "dropped_tokens"):
        assert key in m, key
    assert set(m["epochs"][0]) >= {"epoch", "step", "eval_loss", "perplexity"}
    assert 0 <= m["dropped_tokens"] < 2 * 32  # at most block_size - 1 per split (train and test)
    assert m["train_tokens"] == sum(m["rank_train_tokens"]) == 8 * 4 * 32  # 8 steps of 4 blocks of 32 tokens


def test_push_to_unreachable_hub_keeps_the_model_and_says_so(configs, tmp_path, monkeypatch):
    from mlmtune import hub

    monkeypatch.setattr(hub, "prepare_hub_access", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(MlmtuneError, match=r"cannot be reached; the model is saved in .*hf upload me/tiny"):
        train(configs(out, max_steps=1, push_to_hub=True, hub_model_id="me/tiny"), progress=False)
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


@pytest.mark.numerics
def test_fp16_scales_the_loss_and_resumes_with_the_same_scale(configs, tmp_path):
    """--precision fp16 (for GPUs before Ampere; CPU autocast runs it too): a GradScaler scales the loss,
    its state rides in every checkpoint, and a resumed run ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from mlmtune.training import resume

    full = train(configs(tmp_path / "full", precision="fp16", max_steps=6), progress=False)
    m = full.metrics
    assert m["precision"] == "fp16" and m["eval_loss_after"] < m["eval_loss_before"] - 0.05
    scale = resume.read_state(tmp_path / "full" / "checkpoints" / "step-0000002").grad_scaler
    assert scale and scale["scale"] > 1  # 65536 at the start, halved on each overflow
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    train(configs(part, precision="fp16", max_steps=6, resume=True), progress=False)
    assert_same_weights(part, load_file(str(tmp_path / "full" / "model.safetensors")))


def _compiled(configs, tmp_path, backend, monkeypatch):
    """--compile on the reference run's start, data, masks and dropout seeds."""
    import torch._dynamo
    from safetensors.torch import load_file

    monkeypatch.setattr("mlmtune.model.forward.COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train(configs(tmp_path / "compiled", compile=True), progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the encoder really went through dynamo
    torch._dynamo.reset()
    return compiled.metrics, load_file(str(tmp_path / "compiled" / "model.safetensors"))


@pytest.mark.numerics
def test_compile_trains_as_eager_does(reference_run, configs, tmp_path, monkeypatch):
    """The compiled encoder (dynamo's graph and AOTAutograd's backward, run by aot_eager: inductor's code
    generation takes ~30 s on 2 cores, see the slow test) gives the eager run's gradients, dropout included."""
    metrics, weights = _compiled(configs, tmp_path, "aot_eager", monkeypatch)
    assert weights.keys() == reference_run.weights.keys()  # parameter names unchanged: no `_orig_mod.`
    assert metrics["eval_loss_after"] == pytest.approx(reference_run.metrics["eval_loss_after"], rel=1e-6)
    assert_same_weights(tmp_path / "compiled", reference_run.weights)


@pytest.mark.slow
@pytest.mark.numerics
def test_compile_with_inductor_trains_close_to_eager(reference_run, configs, tmp_path, monkeypatch, inductor_agrees):
    """Inductor's fused kernels draw dropout from their own generator and sum in another order: close, not equal."""
    if not inductor_agrees:  # the refusal is tested under --fsdp, in processes of their own (test_distributed.py)
        pytest.skip("inductor compiles a RoBERTa layer wrong on this machine (torch 2.13 under ATen's AVX2 kernels), "
                    "and the whole encoder's compiled code can abort the process")
    metrics, _ = _compiled(configs, tmp_path, "inductor", monkeypatch)
    eager = reference_run.metrics
    # measured: 0.0075 apart, against the run's 0.164 drop (dropout's draws alone differ)
    moved = eager["eval_loss_before"] - eager["eval_loss_after"]
    assert abs(metrics["eval_loss_after"] - eager["eval_loss_after"]) < 0.15 * moved


def test_a_compiled_model_that_computes_other_logits_is_refused():
    """The check that guards --compile: a compile that changes what the model computes (here a weight nudged by
    0.5, as wrong generated code would) is refused in one line; a real compile (dynamo and AOTAutograd, run eager)
    passes, and the model is handed back in training mode."""
    import torch._dynamo
    from transformers import RobertaConfig, RobertaForMaskedLM

    from mlmtune.model.forward import check_compiled, compile_encoder

    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64)).train()

    def wrong() -> None:
        with torch.no_grad():
            model.roberta.encoder.layer[1].output.dense.weight[0] += 0.5

    with pytest.raises(MlmtuneError, match=r"largest difference [0-9.e-]+, logits up to .*train without --compile"):
        check_compiled(model, wrong, 16)
    assert model.training
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr("mlmtune.model.forward.COMPILE_BACKEND", "aot_eager")
        compile_encoder(model, 16)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs and model.training
    torch._dynamo.reset()


@pytest.mark.numerics
def test_deterministic_holds_for_the_run_only(reference_run, configs, tmp_path):
    """--deterministic runs the whole loop (evaluation, checkpoints) under strict deterministic kernels, which
    raise where an op has none, and puts the setting back; on a CPU the result is the plain run's."""
    seen = []
    strict = train(configs(tmp_path / "strict", deterministic=True), progress=False,
                   on_step=lambda step, s: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert len(seen) == 8 and all(seen) and not torch.are_deterministic_algorithms_enabled()
    assert strict.metrics["eval_loss_after"] == reference_run.metrics["eval_loss_after"]


def test_tf32_is_on_only_inside_a_gpu_training_step(configs, tmp_path, monkeypatch):
    """Evaluation, fills and whatever the process runs after train() stay true fp32: TF32 is switched on around
    each training step on a GPU and put back after (read from the flags; the CPU ignores them)."""
    from mlmtune.device import tf32_matmuls
    from mlmtune.training import torch_engine

    torch.backends.cuda.matmul.allow_tf32 = False
    seen = []
    real = torch_engine.backward_masked

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(*args, **kwargs)

    with tf32_matmuls(torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cuda.matmul.allow_tf32 is False
    monkeypatch.setattr(torch_engine, "backward_masked", spy)
    monkeypatch.setattr(torch_engine, "tf32_matmuls", lambda device: tf32_matmuls(torch.device("cuda")))
    train(configs(tmp_path / "run", max_steps=2), progress=False)
    assert seen == [True, True]  # inside each step (as on a GPU)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # and off again after


@pytest.mark.parametrize("avx512_bf16, amx, onednn_isa, picked", [
    (True, True, None, torch.bfloat16),          # this Xeon
    (True, False, "AVX512_CORE_BF16", torch.bfloat16),
    (True, True, "AVX2", None),                   # as CI simulates an AVX2-only CPU: bf16 would run 24x slower
    (True, True, "avx512_core", None),            # AVX-512 without bf16 dot products: 4x slower
    (False, False, None, None),                   # an AVX2-only EPYC
])
def test_auto_precision_is_bf16_only_where_onednn_runs_it_fast(monkeypatch, avx512_bf16, amx, onednn_isa, picked):
    from mlmtune.device import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if onednn_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
    assert resolve_precision("auto", torch.device("cpu")) == picked
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16  # asked for: always


@pytest.mark.numerics
def test_a_model_declared_bf16_trains_from_fp32_master_weights(configs, tiny_model_dir, tmp_path):
    """transformers 5 loads a model in its config's dtype (EuroBERT declares bfloat16): training must still keep fp32
    master weights and AdamW state. Two twins hold the same (bf16-representable) weights, one declared bfloat16 and
    one float32: trained the same way they must give the same losses, which bf16 weights would not."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # values both dtypes hold exactly
    twins = {}
    for dtype in ("float32", "bfloat16"):
        folder = tmp_path / dtype
        shutil.copytree(tiny_model_dir, folder)
        model.to(getattr(torch, dtype)).save_pretrained(folder)
        assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
        twins[dtype] = train(configs(tmp_path / f"run-{dtype}", model=str(folder), max_steps=3, save_steps=100),
                             progress=False).metrics
    fp32, bf16 = twins["float32"], twins["bfloat16"]
    assert [e["loss"] for e in bf16["train_loss"]] == pytest.approx([e["loss"] for e in fp32["train_loss"]], rel=1e-6)
    assert bf16["eval_loss_before"] == pytest.approx(fp32["eval_loss_before"], rel=1e-6)
    assert bf16["eval_loss_after"] == pytest.approx(fp32["eval_loss_after"], rel=1e-6)
    saved = load_file(str(tmp_path / "run-bfloat16" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the output is an fp32 checkpoint


def _dense_eval_loss(model_folder, configs, out, autocast):
    """`_fixed_mask_loss` under an autocast dtype (None: fp32): plain transformers' dense forward and loss."""
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        return _fixed_mask_loss(model_folder, configs, out)


@pytest.mark.numerics
def test_evaluation_runs_under_the_training_autocast_unless_asked_for_fp32(configs, tiny_model_dir, tmp_path):
    """--precision bf16: the evaluations run under bf16 autocast (from fp32 weights), before and after alike, and
    match transformers' dense forward under the same autocast; --eval-precision fp32 matches its fp32 forward.
    `mlmtune eval` on the output follows the run's precision, so it reproduces the after figure."""
    import shutil

    from transformers import AutoModelForMaskedLM

    from mlmtune.config import EvalConfig
    from mlmtune.evaluation.evaluate import run_eval
    from mlmtune.options import resolve

    # the tiny model's near-uniform predictions hide bf16's rounding in the mean loss; embeddings 30x larger give
    # it sharp logits (the decoder is tied to them), whose bf16 rounding moves the loss
    sharp = tmp_path / "sharp"
    shutil.copytree(tiny_model_dir, sharp)
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30)
    model.save_pretrained(sharp)
    fp32_ref = _dense_eval_loss(sharp, configs, tmp_path / "x", None)
    bf16_ref = _dense_eval_loss(sharp, configs, tmp_path / "x", torch.bfloat16)
    gap = abs(bf16_ref - fp32_ref)
    assert gap > 1e-3  # bf16 moves the loss: the checks below can tell the two apart

    fast = train(configs(tmp_path / "bf16", model=str(sharp), precision="bf16", max_steps=1, save_steps=100),
                 progress=False).metrics
    assert fast["eval_precision"] == "bf16" and fast["precision"] == "bf16"
    assert abs(fast["eval_loss_before"] - bf16_ref) < gap / 4
    assert "both in bf16 autocast" in (tmp_path / "bf16" / "README.md").read_text()

    exact = train(configs(tmp_path / "fp32", model=str(sharp), precision="bf16", eval_precision="fp32", max_steps=1,
                          save_steps=100), progress=False).metrics
    assert exact["eval_precision"] == "fp32" and exact["eval_loss_before"] == pytest.approx(fp32_ref, rel=1e-5)

    flags = {"model": str(tmp_path / "bf16"), "dataset": configs.base["dataset"], "text_field": "answers.text",
             "cache_dir": configs.base["cache_dir"]}
    again = run_eval(resolve(EvalConfig, {}, flags), progress=False)
    assert again["eval_precision"] == "bf16" and again["eval_loss"] == pytest.approx(fast["eval_loss_after"], rel=1e-6)
    in_fp32 = run_eval(resolve(EvalConfig, {}, {**flags, "precision": "fp32"}), progress=False)
    assert in_fp32["eval_loss"] == pytest.approx(_dense_eval_loss(tmp_path / "bf16", configs, tmp_path / "x", None),
                                                 rel=1e-5)
