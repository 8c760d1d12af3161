"""The PyTorch engine: how `train()`'s model is held (one process, DDP or FSDP), how one optimizer step runs
(autocast, the fp16 gradient scaler, clipping, fused AdamW), and how its weights and optimizer state go in
and out of checkpoints. The step's forward and backward are `forward.backward_masked`; the ranks are
`distributed.py`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mlmtune import distributed
from mlmtune.config import TrainConfig
from mlmtune.data.masking import dropout_seed
from mlmtune.device import PRECISION_NAMES, resolve_device, resolve_precision, tf32_matmuls
from mlmtune.errors import MlmtuneError, say
from mlmtune.model.forward import MaskedLMLoss, backward_masked, compile_encoder, freeze_encoder
from mlmtune.training import checkpoint as ckpt
from mlmtune.training import resume, sharding
from mlmtune.training.budget import torch_probe

_RANK_MIX = 7_919_000_011  # spreads the ranks' dropout apart; rank 0 draws what a single process draws


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights, as the Trainer does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def deterministic_kernels(on: bool):
    """--deterministic: only deterministic kernels while the run lasts (the setting is put back after it).
    cuBLAS needs a fixed workspace for that, read from CUBLAS_WORKSPACE_CONFIG when it starts."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class Precision:
    """The training step's arithmetic: autocast dtype (None: fp32) and, for fp16, the gradient scaler
    (the loss is scaled; gradients are unscaled before clipping; a step with an overflow is skipped)."""

    def __init__(self, autocast: torch.dtype | None, device: torch.device):
        self.autocast = autocast
        self.name = PRECISION_NAMES[autocast]
        self.scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None

    @classmethod
    def choose(cls, choice: str, device: torch.device, sharded: bool = False) -> Precision:
        autocast = resolve_precision(choice, device)
        if sharded and autocast == torch.float16:
            raise MlmtuneError("--fsdp on this GPU would train in fp16, whose gradient scaler is not shared over "
                               "the shards yet: pass --precision fp32, or train without --fsdp")
        return cls(autocast, device)

    def describe(self) -> str:
        return self.name if self.autocast is None else f"{self.name} autocast"

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def resume(self, state: ckpt.TrainState) -> None:
        if self.scaler is not None and state.grad_scaler:
            self.scaler.load_state_dict(state.grad_scaler)

    def step(self, optimizer, params, max_grad_norm: float) -> None:
        """Unscale (fp16), clip, update, clear the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class TorchEngine:
    """A Hugging Face masked-LM trained by PyTorch: in one process, under DDP, or sharded with --fsdp."""

    def __init__(self, cfg: TrainConfig, d: distributed.Dist, device: torch.device):
        self.cfg, self.dist, self.device = cfg, d, device
        self.pin_memory = device.type == "cuda"  # the next steps' batches are pinned, for asynchronous copies
        self.model = self.fsdp = self.root = self.optimizer = self.full_optimizer = self.step_loss = None
        self.precision_ = None

    @classmethod
    def open(cls, cfg: TrainConfig) -> tuple[TorchEngine, TrainConfig]:
        d = distributed.init()  # one process unless torchrun / accelerate launched several
        if not cfg.compute.fsdp and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            say("accelerate launch with an FSDP config: sharding as --fsdp does (its other fsdp_* choices are not "
                "read)")
            cfg = dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, fsdp=True))
        if cfg.compute.fsdp:
            distributed.require_ranks(d, "--fsdp")
            if cfg.schedule.time_budget is not None and not cfg.output.resume:
                raise MlmtuneError("--time-budget with --fsdp: its probe would time an unsharded copy of the whole "
                                   "model on one device, which is what --fsdp avoids; give --max-steps or --epochs")
        if d.enabled and cfg.compute.device:
            raise MlmtuneError("--device is for one process; under torchrun each rank takes its LOCAL_RANK GPU")
        # checked before the data
        device = distributed.device_for(d) if d.enabled else resolve_device(cfg.compute.device)
        return cls(cfg, d, device), cfg

    @staticmethod
    def check_model(model) -> None:
        return None  # any AutoModelForMaskedLM: the sparse head where its layout is known, else the dense one

    probe = staticmethod(torch_probe)

    def session(self):
        return deterministic_kernels(self.cfg.compute.deterministic)

    @property
    def precision(self) -> str:
        return self.precision_.name

    def attach(self, model) -> None:
        self.model = model
        # rank 0's CPU copy, for writing
        self.fsdp = sharding.FSDP(self.dist, model) if self.cfg.compute.fsdp else None
        if self.cfg.compute.gradient_checkpointing:  # before DDP or FSDP wrap the layers, and before the budget's probe
            if not model.supports_gradient_checkpointing:
                raise MlmtuneError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
            # non-reentrant: works with DDP's and FSDP's hooks, with frozen inputs, and replays dropout's RNG
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # load_model hands the model over in eval mode: the steps train it with dropout (and with the checkpointing
        # above, which transformers applies only in training mode); evaluations switch to eval mode and back
        model.train()
        model.to(self.device)
        distributed.broadcast_parameters(self.dist, model)  # a new head is random: every rank starts from rank 0's

    def start(self, cfg: TrainConfig, tokenizer) -> None:
        self.cfg = cfg
        if cfg.compute.compile:  # after the budget's probe, which times eager steps on a copy; before FSDP shards
            compile_encoder(self.model, cfg.data.block_size, layers=self.fsdp is not None)
        self.precision_ = Precision.choose(cfg.compute.precision, self.device, sharded=self.fsdp is not None)
        # bf16 training gathers bf16 weights (FSDP2's policy is fixed per module, so evaluation runs on them too:
        # with --eval-precision fp32 the shards are gathered in fp32 and autocast casts them, as before)
        bf16_gathers = self.precision_.autocast == torch.bfloat16 and cfg.compute.eval_precision != "fp32"
        self.root = (self.fsdp.shard(self.device, param_dtype=torch.bfloat16 if bf16_gathers else None)
                     if self.fsdp else None)  # before the optimizer: it holds the shards
        # fused: one kernel over all parameters, 5x faster than foreach on a CPU for DistilRoBERTa
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.learning_rate,
                                           fused=True)
        # what checkpoints read and write: under FSDP the full (gathered) state, keyed by parameter name
        self.full_optimizer = self.fsdp.optimizer(self.optimizer) if self.fsdp else self.optimizer

    @property
    def eval_autocast(self) -> torch.dtype | None:
        """--eval-precision train: the steps' autocast (None under fp32); fp32: None."""
        return None if self.cfg.compute.eval_precision == "fp32" else self.precision_.autocast

    def describe(self) -> str:
        d = self.dist
        sharding = "" if not self.fsdp else (" (FSDP" if self.fsdp.nodes == 1 else
                                             f" (HSDP: sharded within each of {self.fsdp.nodes} nodes")
        if self.fsdp:
            sharding += ", bf16 all-gathers, fp32 gradient reduction)" if self.fsdp.param_dtype else ")"
        per = self.cfg.schedule.batch_size
        ranks = f"; {d.world} processes{sharding}, {per} blocks each per micro-batch" if d.enabled else ""
        evaluation = ("in fp32" if self.eval_autocast is None else
                      f"under {PRECISION_NAMES[self.eval_autocast]} autocast (--eval-precision fp32 for true fp32)")
        return f"Training precision: {self.precision_.describe()}; evaluation {evaluation}{ranks}"

    def restore(self, path: Path, state: ckpt.TrainState) -> None:
        """A checkpoint into the engine. Under FSDP loading is a collective: every rank first checks (the shards) or
        reads (full files) on its own and the ranks agree (`distributed.agree`), so a rank that cannot read fails
        all of them at once instead of leaving the others in the collective until its timeout."""
        if self.fsdp and (path / ckpt.SHARDS).is_dir():
            distributed.agree(self.dist, lambda: ckpt.check_shards(path / ckpt.SHARDS), "a shard cannot be read")
            self.fsdp.load_shards(self.optimizer, path / ckpt.SHARDS)
        elif self.fsdp:  # full files, as checkpoints under --fsdp were written before the shards
            weights, optimizer = distributed.agree(
                self.dist, lambda: (load_file(path / "model.safetensors"), resume.load_optimizer_state(path)),
                "the checkpoint cannot be read")
            self.fsdp.load_full_state_dict(weights)
            self.full_optimizer.load_state_dict(optimizer)
        else:
            resume.load_weights(path, self.model)
            self.full_optimizer.load_state_dict(resume.load_optimizer_state(path))
        self.precision_.resume(state)

    def shard_writer(self, state: ckpt.TrainState):
        """Under FSDP, what writes this rank's shards of a checkpoint (`checkpoint.save_sharded_checkpoint`); else
        None: rank 0 writes full files."""
        if not self.fsdp:
            return None
        state.grad_scaler = self.precision_.scaler_state()
        return lambda folder: self.fsdp.save_shards(self.optimizer, folder)

    def set_phase(self, head_only: bool) -> None:
        freeze_encoder(self.model, head_only, self.cfg.optim.freeze_layers)
        # the training forward, under DDP on several ranks; DDP registers its hooks on the parameters that
        # train, so it is built again when the encoder joins. Under FSDP the sharded root is the forward.
        self.step_loss = self.root if self.fsdp else distributed.wrap(self.dist, MaskedLMLoss(self.model))

    def step(self, step: int, batches: list, n_masked: int, learning_rate: float, head_only: bool) -> torch.Tensor:
        torch.manual_seed(dropout_seed(self.cfg.seed, step) + self.dist.rank * _RANK_MIX)  # dropout of this step
        # token-weighted loss over the whole accumulated batch; this rank's nll stays a device tensor, and the
        # ranks' masked tokens are summed on the device (queued, not waited for)
        n_masked = distributed.sum_on_device(self.dist, n_masked, self.device)
        with tf32_matmuls(self.device):  # the step's fp32 matmuls only: evaluation stays true fp32
            nll = backward_masked(self.step_loss, batches, n_masked, self.device, self.precision_.autocast,
                                  head_only, self.precision_.scaler, self.dist.world)
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
            self.precision_.step(self.optimizer, self.model.parameters(), self.cfg.optim.max_grad_norm)
        return nll / (n_masked.clamp(min=1) if isinstance(n_masked, torch.Tensor) else max(n_masked, 1))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def eval_model(self) -> torch.nn.Module:
        return self.root if self.fsdp else self.model

    def checkpoint(self, state: ckpt.TrainState) -> tuple[torch.nn.Module | None, dict]:
        state.grad_scaler = self.precision_.scaler_state()
        return self.output_model(), self.full_optimizer.state_dict()

    def output_model(self) -> torch.nn.Module | None:
        """The model with its full weights on rank 0 (under FSDP every rank takes part in gathering them)."""
        return self.fsdp.full_model() if self.fsdp else self.model

    def metrics(self) -> dict[str, Any]:
        return {"device": self.device.type, "torch_threads": torch.get_num_threads()}

    def close(self) -> None:
        self.step_loss = None  # DDP's hooks and buffers, before the process group goes
