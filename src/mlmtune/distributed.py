"""One process or many: who we are in a `torchrun` / `accelerate launch` job, and the few
collectives the training loop needs. With WORLD_SIZE unset or 1 every helper is a no-op, so the
single-process path is the same code.

Gradients go through DistributedDataParallel (`wrap`), which wraps the whole training forward
(`forward.MaskedLMLoss`): its all-reduce overlaps the last micro-batch's backward pass, and the
loss, multiplied by the world size over the global masked count, makes DDP's average the gradient
of the global token-weighted loss. With --fsdp, `sharding.FSDP` shards the same module instead (FSDP2's
`fully_shard`; its reduce-scatter averages the same way).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mlmtune.errors import MlmtuneError, speak_as

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    gpu: int | None = None  # this rank's CUDA device index, None on CPUs
    wait_group: Any = field(default=None, compare=False, repr=False)  # gloo group for long waits

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


# A collective that has not finished in this time is a hang: fail, rather than hold every GPU for hours.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Ranks other than 0 wait this long, on a CPU (gloo) group of their own, while rank 0 tokenizes a corpus.
WAIT_TIMEOUT = timedelta(hours=6)
# Ranks started by environment variables (srun, a script) meet at MASTER_ADDR:MASTER_PORT within this time, or
# say what to check; torchrun's own rendezvous has its own bound (--rdzv-timeout).
RENDEZVOUS_TIMEOUT_ENV, RENDEZVOUS_TIMEOUT = "MLMTUNE_RENDEZVOUS_TIMEOUT", 120.0


def gpu_index(local_rank: int) -> int:
    """This rank's GPU: LOCAL_RANK when it can see all of the node's GPUs, or the one GPU it can see
    when the scheduler shows each task only its own (SLURM with one GPU per task)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise MlmtuneError(f"LOCAL_RANK is {local_rank} but this process sees {count} GPUs; launch one process per "
                       f"GPU (torchrun --nproc_per_node={count})")


def init() -> Dist:
    """Join the process group that torchrun or accelerate set up through the environment.

    The GPU is chosen before the group starts (NCCL binds each rank to it, `device_id`), and the
    group's timeout is COLLECTIVE_TIMEOUT; the long wait for rank 0's tokenization runs on a
    separate gloo group with WAIT_TIMEOUT.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = None
    if torch.cuda.is_available():
        gpu = gpu_index(local)
        torch.cuda.set_device(gpu)
    if not dist.is_initialized():
        store = rendezvous(world)
        rank = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]), "world_size": world}
        if gpu is not None:
            dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=torch.device("cuda", gpu), **rank)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT, **rank)
    wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    speak_as(dist.get_rank())  # one voice per job: rank 0's
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, gpu=gpu, wait_group=wait_group)


@contextlib.contextmanager
def _cpp_stderr_silenced():
    """File descriptor 2 goes to /dev/null inside (what C++ writes there; Python's own writes wait until after)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def rendezvous_timeout() -> float:
    text = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else RENDEZVOUS_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise MlmtuneError(f"{RENDEZVOUS_TIMEOUT_ENV}={text!r}: give the seconds the ranks may take to meet, e.g. 120")
    return seconds


def rendezvous(world: int):
    """The ranks' meeting point when they were started by environment variables (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT: srun, a script), bounded by `rendezvous_timeout()`: rank 0 hosts it and waits for the others, who
    connect to it. None under torchrun (its agent has met the ranks already) or without MASTER_ADDR."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or "MASTER_ADDR" not in os.environ:
        return None  # torchrun's rendezvous, or an init_method torch reads itself
    rank, host, port = int(os.environ.get("RANK", "0")), os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT", "")
    seconds = rendezvous_timeout()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MlmtuneError(f"MASTER_PORT={port!r}: give the port rank 0 listens on (e.g. 29500)")
    try:
        with _cpp_stderr_silenced():  # a failed connect logs a C++ stack trace there; the line below says it all
            store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timedelta(seconds=seconds),
                                  wait_for_workers=True, multi_tenant=True)
    except (RuntimeError, OSError, ValueError) as e:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        waited = (f"rank 0 waited {seconds:g} s at {host}:{port} for the other {world - 1} rank(s)" if rank == 0
                  else f"rank {rank} could not reach rank 0 at {host}:{port} within {seconds:g} s")
        raise MlmtuneError(f"{waited} ({why[:160]}): check MASTER_ADDR and MASTER_PORT, that every rank was started "
                           f"with the same WORLD_SIZE, that the port is open between the nodes (firewall), and which "
                           f"network interface they use (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); "
                           f"{RENDEZVOUS_TIMEOUT_ENV} sets the wait") from None
    store.set_timeout(COLLECTIVE_TIMEOUT)  # met: from now on the store waits as long as a collective may
    return store


def device_for(d: Dist) -> torch.device:
    if d.gpu is not None:
        return torch.device("cuda", d.gpu)
    return torch.device("cpu")


def blind_ranks(d: Dist, folder: Path) -> list[int]:
    """The ranks that cannot read what rank 0 writes in `folder` (every rank takes part): rank 0 writes a token,
    each rank reads it back. All of them when rank 0 cannot write there."""
    if not d.enabled:
        return []
    name: list[Any] = [None]
    if d.main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=".tmp-write-test-", dir=folder)
            token = os.urandom(8).hex()
            with os.fdopen(fd, "w") as fh:
                fh.write(token)
            name = [(Path(path).name, token)]
        except OSError:
            name = [("", "")]
    dist.broadcast_object_list(name, src=0, group=d.wait_group)
    filename, token = name[0]
    try:
        seen = bool(filename) and (folder / filename).read_text() == token
    except OSError:
        seen = False
    every: list[tuple[int, bool] | None] = [None] * d.world
    dist.all_gather_object(every, (d.rank, seen), group=d.wait_group)
    if d.main and filename:
        os.unlink(folder / filename)
    return [rank for rank, ok in every if not ok]


def check_shared_dir(d: Dist, folder: Path) -> None:
    """Every rank must see the files rank 0 writes in `folder` (checkpoints, for --resume): on several
    machines that means a shared filesystem."""
    blind = blind_ranks(d, folder)
    if blind:
        raise MlmtuneError(f"--output-dir {folder} is not shared: rank(s) {', '.join(map(str, blind))} cannot read "
                           f"what rank 0 writes there; on several machines put --output-dir on a filesystem every "
                           f"node mounts, so that checkpoints and --resume reach every rank")


def main_first(d: Dist, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the others (which then find its cache); an MlmtuneError on
    rank 0 is raised on every rank instead of leaving them waiting."""
    if not d.enabled:
        return fn()
    status: list[str | None] = [None]
    result = None
    if d.main:
        try:
            result = fn()
        except MlmtuneError as e:
            status[0] = str(e)
    dist.broadcast_object_list(status, src=0, group=d.wait_group)
    if status[0] is not None:
        raise MlmtuneError(status[0])
    return result if d.main else fn()


def node_first(d: Dist, fn: Callable[[], T]) -> T:
    """Run `fn` on the first rank of each node (LOCAL_RANK 0), all nodes at once, then on the node's other ranks
    (which then find its cache): for a cache that each node keeps on its own disk. The others wait on the gloo
    group; an MlmtuneError on any first rank is raised on every rank."""
    if not d.enabled:
        return fn()
    status, result = None, None
    if d.local_rank == 0:
        try:
            result = fn()
        except MlmtuneError as e:
            status = str(e)
    every: list[str | None] = [None] * d.world
    dist.all_gather_object(every, status, group=d.wait_group)
    errors = [e for e in every if e]
    if errors:
        raise MlmtuneError(errors[0])
    return result if d.local_rank == 0 else fn()


def from_main(d: Dist, fn: Callable[[], T]) -> T:
    """`fn()` computed on rank 0 and sent to every rank (on the gloo group); an MlmtuneError there is raised on
    every rank."""
    if not d.enabled:
        return fn()
    box: list[Any] = [None]
    if d.main:
        try:
            box[0] = ("ok", fn())
        except MlmtuneError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0, group=d.wait_group)
    kind, value = box[0]
    if kind == "error":
        raise MlmtuneError(value)
    return value


def agree(d: Dist, fn: Callable[[], T], what: str) -> T:
    """`fn()` on every rank, then agreement before any collective that needs its result: when it raised on any rank,
    an MlmtuneError naming the ranks and their reasons is raised on every rank (no rank goes on to a collective the
    others never join, which would wait for COLLECTIVE_TIMEOUT)."""
    try:
        result, mine = fn(), ""
    except Exception as e:  # safetensors, pickle, torch and the OS each have their own error types for a bad file
        result, mine = None, (str(e).strip().splitlines() or [type(e).__name__])[0]
    failed = [(rank, why) for rank, why in enumerate(gather_strings(d, mine)) if why]
    if failed:
        where = "" if not d.enabled else f" on rank(s) {', '.join(str(r) for r, _ in failed)}"
        raise MlmtuneError(f"{what}{where}: {failed[0][1]}")
    return result


def gather_strings(d: Dist, mine: str) -> list[str]:
    """Each rank's string, in rank order, on every rank."""
    if not d.enabled:
        return [mine]
    every: list[str | None] = [None] * d.world
    dist.all_gather_object(every, mine, group=d.wait_group)
    return [str(x) for x in every]


def sum_on_device(d: Dist, value: int, device: torch.device) -> int | torch.Tensor:
    """One number summed over the ranks into a 0-d device tensor, queued on the device's stream: the host does
    not wait for it (one process: the number itself)."""
    if not d.enabled:
        return value
    t = torch.full((), float(value), device=device)  # a fill on the device: no copy for the host to wait on
    dist.all_reduce(t)
    return t


def all_reduce_sum(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(d: Dist, value: float, device: torch.device) -> float:
    """The largest of one number over all ranks."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def wrap(d: Dist, module: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel on several ranks (as it is, on one). Build it again
    after changing which parameters train: DDP registers its gradient hooks on the trainable ones."""
    if not d.enabled:
        return module
    # the buffers (position ids) never change: no broadcast before every forward. torch 2.13 renamed the flag.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, not copies of them (one
    # gradient-sized buffer less, and no copy back after every all-reduce)
    return DistributedDataParallel(module, device_ids=[d.gpu] if d.gpu is not None else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


def require_ranks(d: Dist, flag: str) -> None:
    """Fail at once (before any data is read) when an option needs several processes and this is one."""
    if not d.enabled:
        raise MlmtuneError(f"{flag} shards over several processes: launch with torchrun --nproc_per_node N "
                           f"(or accelerate launch), or drop {flag} for one process")


def broadcast_parameters(d: Dist, model: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights (a new head is random)."""
    if not d.enabled:
        return
    with torch.no_grad():
        for p in model.state_dict().values():
            dist.broadcast(p, src=0)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def close(d: Dist) -> None:
    """Leave the job together: every rank waits (on the gloo group, so rank 0 may take long to write the
    model) until all have arrived, then the groups are torn down; no rank exits while another still
    talks to it."""
    if d.enabled:
        if dist.is_initialized():
            dist.barrier(group=d.wait_group)
            dist.destroy_process_group()
