"""--fsdp, and what each rank holds: the model sharded over the ranks with FSDP2's `fully_shard` (one unit per
encoder layer, on several nodes an HSDP mesh), its shards saved and restored with torch.distributed.checkpoint, and
the weight digests that show whether the ranks that must hold the same weights do (`distributed.py` has who the
ranks are and the collectives the loop needs).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mlmtune.distributed import COLLECTIVE_TIMEOUT, Dist
from mlmtune.model.forward import MaskedLMLoss, encoder_layers


class FSDP:
    """--fsdp: parameters, gradients and optimizer state sharded over the ranks with FSDP2's `fully_shard`.

    One unit per encoder layer (its weights are gathered just before it runs and freed after), and the
    rest, the embeddings and the head tied to them, in the root: the training forward, `MaskedLMLoss`,
    which evaluation also runs through. Checkpoints are each rank's shards (`save_shards`, DCP); the output
    stays an ordinary model folder: rank 0 gathers the full weights into a CPU copy of the model to write it
    (so rank 0 needs the model's size in host memory).
    """

    def __init__(self, d: Dist, model: torch.nn.Module):
        """Call while the model is still on the CPU: rank 0's copy for writing is taken here."""
        self.d, self.model, self.nodes, self.param_dtype = d, model, 1, None
        self.copy = copy.deepcopy(model) if d.main else None
        # async checkpoints' own gloo group (every rank creates it, in the same order): their background thread's
        # collectives never interleave with the training loop's
        self.save_group = (dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
                           if d.enabled and hasattr(dcp, "async_save") else None)

    def shard(self, device: torch.device | None = None, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Shard the model in place (on its device already); returns the root, the training forward. On several
        nodes the mesh is 2-D: the shards stay within a node and are replicated across nodes (HSDP), so no
        gather crosses the slow links; the gradients are averaged across nodes once per step.

        Args:
            param_dtype: gather the weights in this dtype for the forward and backward (bf16: half the all-gather
                traffic and memory; FSDP2's `MixedPrecisionPolicy`), the gradients reduced in fp32 and the shards,
                which the optimizer updates, kept fp32. None: gathered as they are (fp32).

        With --compile the layers are compiled before this (`forward.compile_encoder(layers=True)`), the way torch
        documents for FSDP2: the all-gathers and reduce-scatters stay in FSDP's hooks, outside the graphs.
        """
        mesh = hybrid_mesh(self.d, device or torch.device("cpu"))
        self.nodes = 1 if mesh is None else mesh.size(0)
        self.param_dtype = param_dtype
        kwargs: dict[str, Any] = {} if mesh is None else {"mesh": mesh}
        if param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in encoder_layers(self.model):
            fully_shard(layer, **kwargs)
        return fully_shard(MaskedLMLoss(self.model), **kwargs)

    def full_model(self) -> torch.nn.Module | None:
        """Every rank takes part; rank 0 gets its CPU copy holding the full weights, the others None."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.copy is not None:
            self.copy.load_state_dict(full)
        return self.copy

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Full weights read from a file (tied ones once) -> this rank's shards (`resume.load_weights`)."""
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer(self, optimizer: torch.optim.Optimizer) -> FullOptimizerState:
        return FullOptimizerState(self.model, optimizer)

    def save_shards(self, optimizer: torch.optim.Optimizer, folder: Path):
        """Every rank writes its own shards of the weights and of AdamW's state into `folder`
        (torch.distributed.checkpoint: one file per rank and a `.metadata`); nothing is gathered.

        Asynchronous where torch has `async_save`: the shards are copied to host memory here, and written by a
        background thread (its collectives on a gloo group of their own, `save_group`) while the next steps train;
        returns its future. Else written before it returns (None)."""
        model_state, optimizer_state = get_state_dict(self.model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if self.save_group is None:
            dcp.save(state, checkpoint_id=str(folder))
            return None
        response = dcp.async_save(state, checkpoint_id=str(folder), process_group=self.save_group)
        return getattr(response, "upload_completion", response)  # newer torch: a response holding the future

    def load_shards(self, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """A checkpoint of `save_shards` back into this rank's shards (resharded if the ranks changed). A collective:
        check the files first on every rank (`checkpoint.check_shards`, `agree`)."""
        model_state, optimizer_state = get_state_dict(self.model, optimizer)  # the shapes and shards to fill
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def hybrid_mesh(d: Dist, device: torch.device):
    """On several nodes (WORLD_SIZE over LOCAL_WORLD_SIZE), a (nodes, ranks per node) mesh for HSDP; else None."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
    if not d.enabled or local >= d.world or d.world % local:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (d.world // local, local), mesh_dim_names=("replicate", "shard"))


class FullOptimizerState:
    """A sharded model's optimizer as checkpoints see it: the full state, keyed by parameter name.
    `state_dict` is a collective (rank 0 gets the state, the others an empty dict)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.inner = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.inner,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.inner, state, options=StateDictOptions(full_state_dict=True))


def weights_digests(d: Dist, model: torch.nn.Module) -> list[str]:
    """A short sha256 of the weights each rank holds, in rank order: its whole replica (one process, DDP), or under
    --fsdp its own shards (each DTensor's local part; gathering the full tensors would give every rank the same
    bytes, so a rank whose shard went wrong could never show). `replica_groups` says which ranks must agree."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        p = p.to_local() if hasattr(p, "to_local") else p  # a DTensor (--fsdp): this rank's shard only
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    mine = h.hexdigest()[:16]
    if not d.enabled:
        return [mine]
    every: list[str | None] = [None] * d.world
    dist.all_gather_object(every, mine)
    return [str(x) for x in every]


def replica_groups(d: Dist, model: torch.nn.Module) -> list[list[int]]:
    """The sets of ranks that must hold the same weights: every rank under DDP; under --fsdp the ranks holding the
    same shards, which are the nodes' ranks at the same place on an HSDP mesh (replicated across nodes), and each
    rank alone on one node (its shards are its own: nothing to compare)."""
    mesh = next((p.device_mesh for p in model.state_dict().values() if hasattr(p, "device_mesh")), None)
    if mesh is None:
        return [list(range(d.world))]
    ranks = mesh.mesh  # (ranks,) or (nodes, ranks per node)
    if ranks.ndim == 1:
        return [[int(r)] for r in ranks.tolist()]
    return [[int(r) for r in ranks[:, j].tolist()] for j in range(ranks.shape[1])]


def disagreeing(digests: list[str], groups: list[list[int]]) -> list[list[int]]:
    """The groups of `replica_groups` whose ranks' digests differ (none when the replicas are in sync)."""
    return [g for g in groups if len({digests[r] for r in g}) > 1]
