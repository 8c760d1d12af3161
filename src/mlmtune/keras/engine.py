"""The Keras engine of `mlmtune train --backend keras`: a keras-hub masked-LM trained by Keras 3 on TensorFlow.

`train()` runs the same lifecycle as for PyTorch: the model is loaded the same way (a new seeded head
when the folder has none), the blocks and each step's masks come from the same `StepBatches` (a function
of (seed, step)), the learning rate from `schedule.learning_rate_at`, evaluation is the same fixed-mask
fp32 perplexity on the PyTorch twin of the model, and the output is the same Hugging Face folder. So the
two backends' numbers compare directly.

This engine owns the Keras side: the keras-hub model built from the Hugging Face weights (`convert.py`),
one `train_on_batch` per optimizer step holding all of the step's micro-batches (so its loss is the same
token-weighted mean over the whole step that PyTorch's gradient accumulation computes), dropout seeded
from (seed, step), and the optimizer's variables in checkpoints beside the Hugging Face
`model.safetensors`. Imported only after `mlmtune.keras.require()`: keras and tensorflow are an optional
dependency.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import torch

from mlmtune import distributed
from mlmtune.config import TrainConfig
from mlmtune.data.masking import Masker, dropout_seed
from mlmtune.device import pick_device
from mlmtune.errors import MlmtuneError
from mlmtune.keras import from_hf, loss, optimizer
from mlmtune.keras.convert import family_of, hf_to_keras, keras_to_hf
from mlmtune.keras.data import keras_batch, uses_segments
from mlmtune.training import checkpoint as ckpt
from mlmtune.training import resume
from mlmtune.training.budget import Probe, warm_median

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
_GENERATOR_SPACING = 1 << 20  # dropout seeds of two layers in one step never meet


def keras_policy(precision: str) -> str:
    """The Keras dtype policy for --precision. auto: bf16 on GPUs from Ampere on, fp16 (Keras scales the loss)
    before that, fp32 on the CPU (TensorFlow's CPU kernels gain little from bf16)."""
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
        values = [torch.from_numpy(np.array(keras.ops.convert_to_numpy(v))) for v in self.optimizer.variables]
        return {"head_only": self.head_only, "variables": values}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state


def dropout_seeder(model, seed: int) -> Callable[[int], None]:
    """Sets every dropout layer's seed state for a step: dropout of step s is drawn from (seed, s), as in
    PyTorch's loop, so a resumed run draws what an uninterrupted one does."""
    states = [v for v in model.variables if v.path.endswith("seed_generator_state")]

    def seed_step(step: int) -> None:
        for i, v in enumerate(states):
            v.assign(np.array([dropout_seed(seed, step), i * _GENERATOR_SPACING], dtype=v.dtype))

    return seed_step


def head_model(model):
    """The head warm-up's model: the same layers and weights, with the gradient stopped at the backbone's
    output, so a head-only step back-propagates through the head alone (the tied token embedding learns
    from the head's gradient only), as PyTorch's head-only step does."""
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
    opt = optimizer(trainer, cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.max_grad_norm)
    # XLA off: the number of masks per batch changes every step, and each new shape would compile again
    trainer.compile(optimizer=opt, loss=loss(), weighted_metrics=[], jit_compile=jit_compile)
    opt.build(trainer.trainable_variables)
    return trainer, opt


def keras_probe(cfg: TrainConfig, hf_model, tokenizer, train_blocks, device: torch.device | None = None,
                steps: int = 5) -> Probe:
    """--time-budget's probe for Keras: seconds per step of a copy of the model trained as the run trains it
    (`train_on_batch` on a masked batch of the step's size, learning rate and dropout seeds set and the loss
    read every step); `warm_median` of them: the first two trace the step's graph (the second with the batch's
    shape left open)."""
    segments = uses_segments(tokenizer)
    policy = keras_policy(cfg.compute.precision)

    def probe(head_only: bool) -> float:
        model = from_hf(hf_model, dtype=policy)
        trainer, _ = compile_phase(model, cfg, head_only)
        masker = Masker.from_tokenizer(tokenizer, cfg.mlm_probability)
        generator = torch.Generator().manual_seed(cfg.seed)
        rows = min(cfg.schedule.batch_size * cfg.schedule.gradient_accumulation_steps, len(train_blocks))
        seed_step = dropout_seeder(model, cfg.seed)
        times: list[float] = []
        for step in range(steps):
            picked = torch.randint(len(train_blocks), (rows,), generator=generator)
            x, y, w = keras_batch(*masker(train_blocks[picked], generator), segments)
            t0 = time.perf_counter()
            trainer.optimizer.learning_rate = cfg.optim.learning_rate
            seed_step(step)
            trainer.reset_metrics()
            float(trainer.train_on_batch(x, y, sample_weight=w))
            times.append(time.perf_counter() - t0)
        return warm_median(times)

    return probe


class KerasEngine:
    """A keras-hub masked-LM trained by Keras, with its Hugging Face twin for evaluation, checkpoints and output."""

    pin_memory = False  # batches go to TensorFlow as NumPy arrays

    def __init__(self, cfg: TrainConfig, d: distributed.Dist):
        self.cfg, self.dist = cfg, d
        self.device = pick_device()  # where PyTorch evaluates
        for gpu in tf.config.list_physical_devices("GPU"):  # leave GPU memory to PyTorch's evaluation
            tf.config.experimental.set_memory_growth(gpu, True)
        self.policy = keras_policy(cfg.compute.precision)
        self.precision = {v: k for k, v in POLICIES.items()}[self.policy]
        self.hf_model = self.model = self.trainer = self.seed_step = None
        self.opt_state = OptimizerState()
        self.segments = False

    @classmethod
    def open(cls, cfg: TrainConfig) -> tuple[KerasEngine, TrainConfig]:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MlmtuneError("--backend keras trains in one process; launch it without torchrun or accelerate "
                               "(several GPUs: --backend torch)")
        return cls(cfg, distributed.init()), cfg

    @staticmethod
    def check_model(model) -> str:
        """A family keras-hub has a masked-LM for, or MlmtuneError naming the ones it has."""
        return f"--backend keras: the {family_of(model).model_type} family, on keras-hub"

    probe = staticmethod(keras_probe)

    def session(self):
        return contextlib.nullcontext()

    def attach(self, model) -> None:
        self.hf_model = model.to(self.device).eval()

    def start(self, cfg: TrainConfig, tokenizer) -> None:
        self.cfg = cfg
        keras.utils.set_random_seed(cfg.seed)
        self.model = from_hf(self.hf_model, dtype=self.policy)
        self.segments = uses_segments(tokenizer)
        self.seed_step = dropout_seeder(self.model, cfg.seed)

    eval_autocast = None  # the PyTorch twin evaluates in fp32, whatever --eval-precision says

    def describe(self) -> str:
        return (f"Training with Keras {keras.__version__} (keras-hub, TensorFlow {tf.__version__}) in "
                f"{self.precision}; evaluation in fp32 with PyTorch")

    def restore(self, path: Path, state: ckpt.TrainState) -> None:
        resume.load_weights(path, self.hf_model)
        hf_to_keras(self.hf_model, self.model)
        self.opt_state.load_state_dict(resume.load_optimizer_state(path))

    def set_phase(self, head_only: bool) -> None:
        self.trainer, opt = compile_phase(self.model, self.cfg, head_only)
        self.opt_state.attach(opt, head_only)

    def step(self, step: int, batches: list, n_masked: int, learning_rate: float, head_only: bool) -> float:
        x, y, w = keras_batch(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), self.segments)
        self.trainer.optimizer.learning_rate = learning_rate
        self.seed_step(step)
        self.trainer.reset_metrics()  # the loss returned is then this step's, not a running mean
        return float(self.trainer.train_on_batch(x, y, sample_weight=w))

    def sync(self) -> None:
        pass  # the step returned its loss: Keras has finished it

    def eval_model(self) -> torch.nn.Module:
        """The PyTorch twin, with the Keras weights copied into it."""
        keras_to_hf(self.model, self.hf_model)
        return self.hf_model

    def shard_writer(self, state: ckpt.TrainState) -> None:
        return None  # one process: full files

    def checkpoint(self, state: ckpt.TrainState) -> tuple[torch.nn.Module, dict]:
        return self.eval_model(), self.opt_state.state_dict()

    def output_model(self) -> torch.nn.Module:
        return self.eval_model()

    def metrics(self) -> dict[str, Any]:
        return {"device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
                "keras_version": keras.__version__, "tensorflow_version": tf.__version__}

    def close(self) -> None:
        pass
