"""One process or many: who we are in a `torchrun` / `accelerate launch` job, and the few
collectives the training loop needs. With WORLD_SIZE unset or 1 every helper is a no-op, so the
single-process path is the same code.

Gradients are summed with one all-reduce over a flat buffer after each optimizer step's backward
passes (the loss is already divided by the global count of masked tokens, so the sum is the
gradient of the global token-weighted loss), rather than through DDP, whose hooks only fire
when the wrapped module's own forward runs (mlmtune calls the encoder and the head separately).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from mlmtune.errors import MlmtuneError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Join the process group that torchrun or accelerate set up through the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # long: the other ranks wait here while rank 0 tokenizes a large corpus
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def device_for(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def main_first(d: Dist, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the others (which then find its cache); an MlmtuneError on
    rank 0 is raised on every rank instead of leaving them waiting."""
    if not d.enabled:
        return fn()
    import torch.distributed as dist

    status: list[str | None] = [None]
    result = None
    if d.main:
        try:
            result = fn()
        except MlmtuneError as e:
            status[0] = str(e)
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise MlmtuneError(status[0])
    return result if d.main else fn()


def all_reduce_sum(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks."""
    if not d.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(d: Dist, model: torch.nn.Module) -> None:
    """Sum every parameter's gradient over all ranks, in one flat buffer."""
    if not d.enabled:
        return
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if p.grad is None else p.grad.copy_(
            flat[offset : offset + n].view_as(p))
        offset += n


def broadcast_parameters(d: Dist, model: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights (a new head is random)."""
    if not d.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.state_dict().values():
            dist.broadcast(p, src=0)


def weights_digests(d: Dist, model: torch.nn.Module) -> list[str]:
    """A short sha256 of each rank's parameters, in rank order: all equal when the replicas are in sync."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    mine = h.hexdigest()[:16]
    if not d.enabled:
        return [mine]
    import torch.distributed as dist

    every: list[str | None] = [None] * d.world
    dist.all_gather_object(every, mine)
    return [str(x) for x in every]


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def close(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
