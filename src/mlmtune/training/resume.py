"""--resume: the newest checkpoint that reads back whole and was made with this run's settings (`RESUME_KEYS`
and the global batch), chosen alike on every rank, and its weights and optimizer state read back. The checkpoints
themselves are written by `checkpoint.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model

from mlmtune import distributed
from mlmtune.config import DataConfig
from mlmtune.distributed import Dist
from mlmtune.errors import MlmtuneError, say, warn
from mlmtune.options import flat_fields, flatten
from mlmtune.probe_config import DownstreamConfig
from mlmtune.training.checkpoint import STATE_FILE, TrainState, checkpoints_dir, list_checkpoints, remove_partial_saves

# Settings a resumed run must share with the run it continues, by leaf name (`options.flatten`: a checkpoint
# saved before the config had groups compares the same); anything else may change. Every setting of the data
# and of the downstream probe is one. The global batch (blocks per device x processes x accumulation) must be
# the same too (`check_global_batch`); how it is split over the processes may change.
RESUME_KEYS = ("model", *flat_fields(DataConfig), "mlm_probability", "epochs", "max_steps", "learning_rate",
               "weight_decay", "warmup_steps", "max_grad_norm", "seed", "head_warmup_steps", "head_learning_rate",
               "backend", "fsdp", "masking", "add_tokens", "add_numbers", "freeze_layers",
               *flat_fields(DownstreamConfig), "eval_precision")
# what a checkpoint from before a setting existed ran with
RESUME_DEFAULTS = {"head_warmup_steps": 0, "backend": "torch", "fsdp": False, "masking": "token", "add_tokens": None,
                   "add_numbers": False, "freeze_layers": 0, "eval_precision": "fp32",
                   **{k: default for k, (_, default) in flat_fields(DownstreamConfig).items()}}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint whose config differs from this run's in any of `RESUME_KEYS` (either config grouped,
    as `to_dict` writes it, or flat, as a checkpoint of an older version holds it)."""
    saved, current = {**RESUME_DEFAULTS, **flatten(saved)}, flatten(current)
    diffs = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diffs)
        raise MlmtuneError(
            f"--resume: {where} was made with other settings ({detail}); use the same settings "
            f"or another --output-dir"
        )


def global_batch(config: dict[str, Any], world: int) -> tuple[int, str]:
    """Blocks per optimizer step over all processes, and how they are made up (`config` grouped or flat)."""
    config = flatten(config)
    bs, acc = int(config.get("batch_size", 0)), int(config.get("gradient_accumulation_steps", 1))
    return bs * world * acc, f"{bs} per process x {world} process{'es' if world > 1 else ''} x {acc} accumulation"


def check_global_batch(state: TrainState, current: dict[str, Any], world: int, where: Path) -> None:
    """A run may resume on another number of processes when its global batch stays the same: every step then
    trains on the same blocks with the same masks (`feed.StepBatches`). Another global batch is refused."""
    saved, current = flatten(state.config), flatten(current)
    if state.world_size is None:  # an older checkpoint: its split over processes is not known
        keys = [k for k in ("batch_size", "gradient_accumulation_steps") if saved.get(k) != current.get(k)]
        if keys:
            detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)
            raise MlmtuneError(f"--resume: {where} was made with other settings ({detail}); use the same settings "
                               f"or another --output-dir")
        return
    (old, old_parts), (new, new_parts) = global_batch(saved, state.world_size), global_batch(current, world)
    if old != new:
        per = int(current.get("batch_size", 1)) * world
        hint = (f": keep it, e.g. with --gradient-accumulation-steps {old // per}" if old % per == 0 else
                ": keep it, or start another --output-dir")
        raise MlmtuneError(f"--resume: {where} was trained with a global batch of {old} blocks ({old_parts}); this "
                           f"run's is {new} ({new_parts}){hint}")
    if state.world_size != world and saved.get("streaming"):
        raise MlmtuneError(f"--resume: {state.world_size} process(es) streamed {where.name}, each reading its own "
                           f"share of the records; resume a --streaming run on {state.world_size} process(es)")
    if state.world_size != world:
        say(f"--resume: {state.world_size} process(es) trained {where.name}, {world} continue it, with the same global "
            f"batch of {old} blocks")


def read_state(path: Path) -> TrainState:
    try:
        return TrainState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise MlmtuneError(f"--resume: checkpoint {path} cannot be read ({type(e).__name__}); "
                           f"delete it to resume from an older one") from None


def newest_config(output_dir: Path) -> dict[str, Any] | None:
    """The config saved with the newest readable checkpoint, flat (`options.flatten`), or None."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return flatten(read_state(path).config)
        except MlmtuneError:
            continue
    return None


def load_weights(path: Path, model) -> None:
    """A checkpoint's weights into `model`, in place (tied weights are stored once); a sharded model
    (`sharding.FSDP`) keeps its shard of each."""
    if hasattr(model, "load_full_state_dict"):
        model.load_full_state_dict(load_file(path / "model.safetensors"))
    else:
        load_model(model, str(path / "model.safetensors"))


def load_optimizer_state(path: Path) -> dict:
    """A checkpoint's optimizer state, on the CPU: a checkpoint written on cuda:0 resumes on any rank and on a
    machine without a GPU (the optimizer moves its state to each parameter's device itself)."""
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)


def resume_latest(output_dir: Path, config: dict[str, Any], restore: Callable[[Path, TrainState], None],
                  d: Dist | None = None) -> TrainState | None:
    """Restore the newest checkpoint that reads back whole; older ones stand in for a damaged one.

    On several ranks rank 0 chooses (it alone removes half-written saves and reads the states) and tells the
    others; every rank restores the one it names, and if any rank cannot, rank 0 names the one before. So all
    ranks always resume the same step.

    Args:
        config: the run's resolved config, which the checkpoint's must match in every `RESUME_KEYS` and in its
            global batch.
        restore: loads a checkpoint's weights and optimizer state into the engine (raising on a bad file).

    Returns:
        The loop state, or None when the folder holds no checkpoint.

    Raises:
        MlmtuneError: the checkpoints were made with other settings, or none can be read.
    """
    d = d or Dist()
    candidates = list_checkpoints(output_dir) if d.main else []
    if d.main:
        remove_partial_saves(output_dir)
    offers = _offers(candidates, config, d.world) if d.main else None

    def next_offer():
        offer = next(offers)
        if offer is None and candidates:  # raised on every rank (from_main): none goes on alone from step 0
            raise MlmtuneError(f"--resume: none of the {len(candidates)} checkpoints in "
                               f"{checkpoints_dir(output_dir)} can be read; start again in another --output-dir")
        return offer

    while True:
        offer = distributed.from_main(d, next_offer)  # (path, state), or None: no checkpoint
        if offer is None:
            return None
        path, state = offer
        try:
            restore(path, state)
            ok = ""
        except MlmtuneError as e:  # the engine's own agreement (`distributed.agree`): said alike on every rank
            ok = str(e)
        except Exception as e:  # safetensors, pickle and torch each have their own error types for a bad file
            ok = type(e).__name__
        failed = distributed.gather_strings(d, ok)
        if not any(failed):
            say(f"Resuming from {path} (step {state.step})")
            state.world_size = d.world
            return state
        warn(f"--resume: checkpoint {path} cannot be read ({next(f for f in failed if f)}"
             f"{'' if d.world == 1 else ' on rank(s) ' + ', '.join(str(r) for r, f in enumerate(failed) if f)}); "
             f"delete it to resume from an older one")


def _offers(candidates: list[Path], config: dict[str, Any], world: int):
    """Rank 0's checkpoints to try, newest first: those whose state reads back and whose settings match."""
    for path in reversed(candidates):
        try:
            state = read_state(path)
        except MlmtuneError as e:
            warn(str(e))
            continue
        check_compatible(state.config, config, path)
        check_global_batch(state, config, world, path)
        yield path, state
    while True:
        yield None
