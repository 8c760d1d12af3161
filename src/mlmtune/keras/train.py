"""train_keras(cfg): `mlmtune train --backend keras`, the run of `train()` with Keras' `model.fit` as the engine.

Everything but the engine is shared with the PyTorch path: the model is loaded the same way (a new
seeded head when the folder has none), the blocks and each step's masks come from the same
`StepBatches` (a function of (seed, step)), evaluation is the same fixed-mask fp32 perplexity on
the PyTorch twin of the model, and the output is the same Hugging Face folder. So the two
backends' numbers compare directly.

Keras trains a keras-hub masked-LM built from the Hugging Face weights (`convert.py`). A step is
one `fit` batch holding all of the step's micro-batches, so its loss is the same token-weighted
mean over the whole step that PyTorch's gradient accumulation computes. A callback does what
PyTorch's loop does between steps: the learning rate of `schedule.lr_factor`, dropout seeded
from (seed, step), logging, evaluation, checkpoints, the Ctrl-C stop. Checkpoints hold the
weights as a Hugging Face `model.safetensors` plus the Keras optimizer's variables, in the same
folders and with the same atomic writes as PyTorch's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mlmtune import checkpoint as ckpt
from mlmtune import dashboard, distributed
from mlmtune.config import TrainConfig
from mlmtune.errors import MlmtuneError
from mlmtune.evaluate import EvalResult, perplexity_of
from mlmtune.feed import StepBatches
from mlmtune.keras import from_hf, loss, optimizer, require
from mlmtune.keras.convert import family_of, hf_to_keras, keras_to_hf
from mlmtune.keras.data import keras_batch, signature, uses_segments
from mlmtune.masking import SEED_MIX, iter_eval_masks
from mlmtune.model import pick_device
from mlmtune.run import (
    TrainResult,
    check_output_dir,
    eval_entry,
    load_run,
    log,
    resolve_steps,
    run_metrics,
    start_or_resume,
    step_plan,
    stop_on_ctrl_c,
    write_output,
)
from mlmtune.schedule import lr_factor
from mlmtune.stream import BlockStream

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
_GENERATOR_SPACING = 1 << 20  # dropout seeds of two layers in one step never meet


def keras_policy(precision: str) -> str:
    """The Keras dtype policy for --precision. auto: bf16 on GPUs from Ampere on, fp16 (Keras scales the loss)
    before that, fp32 on the CPU (TensorFlow's CPU kernels gain little from bf16)."""
    import tensorflow as tf

    if precision != "auto":
        return POLICIES[precision]
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "float32"
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
    return "mixed_bfloat16" if capability >= (8, 0) else "mixed_float16"


def freeze_backbone(model, frozen: bool) -> None:
    """Head warm-up: every backbone weight but the token embedding (the head's tied output projection)
    stops training. Keras must compile again after this."""
    trainable = getattr(model, "_mlmtune_trainable", None)
    if trainable is None:  # what trains in the whole-model phase (not BERT's unused pooler)
        trainable = model._mlmtune_trainable = [v for v in model.backbone.variables if v.trainable]
    embedding = model.backbone.token_embedding.embeddings
    for v in trainable:
        v.trainable = not frozen or v is embedding


class OptimizerState:
    """The Keras optimizer's variables, in the shape `checkpoint.save_checkpoint` stores (`state_dict`)."""

    def __init__(self):
        self.optimizer, self.head_only, self.saved = None, None, None

    def attach(self, opt, head_only: bool) -> None:
        """Use `opt` from now on; a state read from a checkpoint of the same phase is restored into it."""
        self.optimizer, self.head_only = opt, head_only
        saved, self.saved = self.saved, None
        if saved is None or saved["head_only"] != head_only:
            return  # a new phase starts with a new optimizer, as in an uninterrupted run
        values = saved["variables"]
        if len(values) != len(opt.variables) or any(tuple(v.shape) != tuple(t.shape)
                                                    for v, t in zip(opt.variables, values)):
            raise MlmtuneError("--resume: the checkpoint's Keras optimizer state does not fit this model; "
                               "use the same --model, or another --output-dir")
        for v, t in zip(opt.variables, values):
            v.assign(t.numpy())

    def state_dict(self) -> dict:
        import keras

        values = [torch.from_numpy(np.array(keras.ops.convert_to_numpy(v))) for v in self.optimizer.variables]
        return {"head_only": self.head_only, "variables": values}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state


class _NoScheduler:
    """Keras' learning rate is set per step from `lr_factor`: nothing to save."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def dropout_seeder(model, seed: int) -> Callable[[int], None]:
    """Sets every dropout layer's seed state for a step: dropout of step s is drawn from (seed, s), as in
    PyTorch's loop, so a resumed run draws what an uninterrupted one does."""
    states = [v for v in model.variables if v.path.endswith("seed_generator_state")]

    def seed_step(step: int) -> None:
        for i, v in enumerate(states):
            v.assign(np.array([seed * SEED_MIX + step, i * _GENERATOR_SPACING], dtype=v.dtype))

    return seed_step


def head_model(model):
    """The head warm-up's model: the same layers and weights, with the gradient stopped at the backbone's
    output, so a head-only step back-propagates through the head alone (the tied token embedding learns
    from the head's gradient only), as PyTorch's head-only step does."""
    import keras

    sequence = model.backbone(model.backbone.input)
    if isinstance(sequence, dict):  # BERT's backbone also returns the pooled output
        sequence = sequence["sequence_output"]
    positions = keras.Input(shape=(None,), dtype="int32", name="mask_positions")
    logits = model.masked_lm_head(keras.ops.stop_gradient(sequence), positions)
    return keras.Model({**model.backbone.input, "mask_positions": positions}, logits)


def compile_phase(model, cfg: TrainConfig, head_only: bool, jit_compile: bool = False):
    """Freeze (or not) for the phase and compile, with a new AdamW, the model that trains in it (`model`, or
    its `head_model` during the head warm-up); returns that model and its optimizer, built."""
    freeze_backbone(model, head_only)
    trainer = head_model(model) if head_only else model
    opt = optimizer(trainer, cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm)
    # XLA off: the number of masks per batch changes every step, and each new shape would compile again
    trainer.compile(optimizer=opt, loss=loss(), weighted_metrics=[], jit_compile=jit_compile)
    opt.build(trainer.trainable_variables)
    return trainer, opt


def keras_probe(cfg: TrainConfig, hf_model, tokenizer, train_blocks, policy: str) -> Callable[[bool], float]:
    """--time-budget's probe for Keras: seconds per step of a copy of the model trained as the run trains it
    (`fit` on masked blocks from a generator, learning rate and dropout seeds set and the loss read every
    step); the median of the steps after the first, which traces the graph."""
    import keras
    import tensorflow as tf

    from mlmtune.masking import Masker

    segments = uses_segments(tokenizer)
    steps = 5

    def probe(head_only: bool) -> float:
        model = from_hf(hf_model, dtype=policy)
        trainer, _ = compile_phase(model, cfg, head_only)
        masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability)
        generator = torch.Generator().manual_seed(cfg.seed)
        rows = min(cfg.batch_size * cfg.gradient_accumulation_steps, len(train_blocks))
        seed_step = dropout_seeder(model, cfg.seed)
        times: list[float] = []

        def generate():
            for _ in range(steps):
                picked = torch.randint(len(train_blocks), (rows,), generator=generator)
                yield keras_batch(*masker(train_blocks[picked], generator), segments)

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.model.optimizer.learning_rate = cfg.learning_rate
                seed_step(batch)
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                float(logs["loss"])
                times.append(time.perf_counter() - self.t0)

        data = tf.data.Dataset.from_generator(generate, output_signature=signature(segments)).prefetch(2)
        trainer.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[Timer()])
        return float(np.median(times[1:]))

    return probe


def train_keras(cfg: TrainConfig, progress: bool = True,
                on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """`train()` with Keras' model.fit as the engine; same arguments, result and output folder.

    Raises:
        MlmtuneError: Keras not installed, a model family keras-hub has no masked-LM for, bad data or
            output folder, or an interrupted run (checkpoint saved first, so `--resume` continues).
    """
    require()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MlmtuneError("--backend keras trains in one process; launch it without torchrun or accelerate "
                           "(several GPUs: --backend torch)")
    import keras
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):  # leave GPU memory to PyTorch's evaluation
        tf.config.experimental.set_memory_growth(gpu, True)
    out = Path(cfg.output_dir)
    d = distributed.init()  # one process
    check_output_dir(out, cfg.resume)
    dashboard.require(cfg.report_to)
    run = load_run(cfg, d, log, check_model=family_of)  # a family keras-hub cannot take fails before the data
    hf_model, tokenizer, train_blocks, eval_blocks = run.model, run.tokenizer, run.train_blocks, run.eval_blocks
    device = pick_device()  # where PyTorch evaluates
    hf_model.to(device).eval()
    policy = keras_policy(cfg.precision)
    keras.utils.set_random_seed(cfg.seed)
    model = from_hf(hf_model, dtype=policy)
    segments = uses_segments(tokenizer)
    probe = keras_probe(cfg, hf_model, tokenizer, train_blocks, policy) if train_blocks is not None else None
    cfg = resolve_steps(cfg, d, hf_model, tokenizer, train_blocks, device, log, probe=probe)
    precision = {v: k for k, v in POLICIES.items()}[policy]
    log(f"Training with Keras {keras.__version__} (keras-hub, TensorFlow {tf.__version__}) in "
        f"{precision}; evaluation in fp32 with PyTorch")
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def evaluate(desc: str) -> EvalResult | None:
        """The PyTorch path's fp32 perplexity, on the PyTorch twin of the Keras weights."""
        if eval_blocks is None:
            return None
        keras_to_hf(model, hf_model)
        return perplexity_of(hf_model, iter_eval_masks(eval_blocks, run.masker, cfg.seed), eval_bs,
                             progress=progress, desc=desc, total=len(eval_blocks))

    steps_per_epoch, total_steps, save_every = step_plan(cfg, train_blocks, 1)
    opt_state = OptimizerState()
    state, resumed, dash = start_or_resume(cfg, out, hf_model, opt_state, _NoScheduler(), evaluate, log)
    if resumed:
        hf_to_keras(hf_model, model)  # the checkpoint's weights, loaded into the PyTorch twin

    stream = None
    if train_blocks is None:
        stream = BlockStream(cfg.data, tokenizer, cfg.seed, cfg.batch_size).batches(
            start=state.step * cfg.gradient_accumulation_steps, progress=progress)
    step_batches = StepBatches(train_blocks, stream, run.masker, cfg.seed, cfg.batch_size,
                               cfg.gradient_accumulation_steps)
    blocks_of: dict[int, int] = {}  # step -> its blocks, told by the feeding thread
    feed_error: list[MlmtuneError] = []

    def dataset(first: int, last: int):
        """Steps first..last-1, each one batch of all its micro-batches, read and masked ahead of the step."""
        def generate():
            for step in range(first, last):
                try:
                    micro, n_blocks, _, _ = step_batches(step)
                except MlmtuneError as e:  # a stream that stops parsing: the loop saves and reports it
                    feed_error.append(e)
                    return
                blocks_of[step] = n_blocks
                yield keras_batch(torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro]), segments)

        return tf.data.Dataset.from_generator(generate, output_signature=signature(segments)).prefetch(2)

    def save() -> Path:
        keras_to_hf(model, hf_model)
        return ckpt.save_checkpoint(out, hf_model, opt_state.state_dict(), {}, state, cfg.save_total_limit)

    seed_step = dropout_seeder(model, cfg.seed)
    stop_requested = threading.Event()
    bar = tqdm(total=total_steps, initial=state.step, desc="Training", disable=not progress, dynamic_ncols=True)
    window: list[float] = []
    window_time, window_tokens = 0.0, 0

    class Loop(keras.callbacks.Callback):
        """What PyTorch's loop does around each step."""

        def on_train_batch_begin(self, batch, logs=None):
            step = state.step
            self.model.optimizer.learning_rate = cfg.learning_rate * lr_factor(
                step, total_steps, cfg.warmup_steps, cfg.head_warmup_steps,
                (cfg.head_learning_rate or cfg.learning_rate) / cfg.learning_rate)
            seed_step(step)
            self.model.reset_metrics()  # logs["loss"] is then this step's loss, not a running mean
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            nonlocal window_time, window_tokens
            step_loss = float(logs["loss"])
            seconds = time.perf_counter() - self.t0
            state.train_seconds += seconds
            window_time += seconds
            tokens = blocks_of.pop(state.step) * cfg.data.block_size
            state.step += 1
            state.train_tokens += tokens
            window_tokens += tokens
            window.append(step_loss)
            bar.update(1)
            if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                state.train_loss.append({"step": state.step, "loss": sum(window) / len(window)})
                bar.set_postfix(loss=f"{state.train_loss[-1]['loss']:.4f}")
                dash.train(state.step, state.train_loss[-1]["loss"], float(self.model.optimizer.learning_rate),
                           window_tokens / window_time if window_time else None)
                window.clear()
                window_time, window_tokens = 0.0, 0
            if state.step % steps_per_epoch == 0 or state.step == total_steps:
                result = evaluate(f"Eval (step {state.step})")
                if result:
                    entry = {"epoch": round(state.step / steps_per_epoch, 4) if stream is None else None,
                             "step": state.step, **eval_entry(result)}
                    state.epochs.append(entry)
                    where = f"step {state.step}" if stream else f"epoch {entry['epoch']:g} step {state.step}"
                    bar.write(f"{where}: eval loss {result.loss:.4f}, perplexity {result.perplexity:,.2f}")
                    dash.eval(state.step, result.loss, result.perplexity)
            if state.step % save_every == 0 or state.step == total_steps:
                save()
            if on_step is not None:
                on_step(state.step, seconds)
            if stop_requested.is_set():
                self.model.stop_training = True

    restore_sigint = stop_on_ctrl_c(stop_requested)
    phases = [(True, cfg.head_warmup_steps), (False, total_steps)]
    try:
        for head_only, end in phases:
            if state.step >= end or stop_requested.is_set() or feed_error:
                continue
            trainer, opt = compile_phase(model, cfg, head_only)
            opt_state.attach(opt, head_only)
            if head_only:
                bar.write(f"step {state.step}: training the new head alone until step {end}")
            elif cfg.head_warmup_steps and state.step == cfg.head_warmup_steps:
                bar.write(f"step {state.step}: head warm-up done, training the whole model")
            trainer.fit(dataset(state.step, end), epochs=1, steps_per_epoch=end - state.step, verbose=0,
                        shuffle=False, callbacks=[Loop()])
    except KeyboardInterrupt:  # the second Ctrl-C: Keras may be inside a step, so nothing is saved now
        previous = ckpt.list_checkpoints(out)
        kept = f"the last checkpoint is {previous[-1]}" if previous else "no checkpoint was saved yet"
        raise MlmtuneError(f"stopped at once near step {state.step}; {kept}; continue with --resume") from None
    finally:
        restore_sigint()
        dash.close()
        bar.close()
    if feed_error:
        saved = f"; checkpoint saved in {save()}, continue with --resume" if state.step else ""
        raise MlmtuneError(f"{feed_error[0]}{saved}")
    if stop_requested.is_set() and state.step < total_steps:
        last = ckpt.checkpoints_dir(out) / f"step-{state.step:07d}"
        saved_to = last if last.is_dir() else save()
        raise MlmtuneError(f"interrupted at step {state.step}; checkpoint saved in {saved_to}, "
                           f"continue with the same command and --resume")

    after = state.epochs[-1] if state.epochs and state.epochs[-1]["step"] == state.step else None
    if after is None and eval_blocks is not None:  # resumed a finished run with no eval on record
        after = {"step": state.step, **eval_entry(evaluate("Eval (after)"))}
    metrics = {
        **run_metrics(cfg, run, state, after),
        "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
        "world_size": 1,
        "precision": precision,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
    }
    keras_to_hf(model, hf_model)
    write_output(cfg, out, hf_model, tokenizer, metrics)
    return TrainResult(output_dir=out, metrics=metrics)


