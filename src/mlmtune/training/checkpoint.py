"""Checkpoints under OUTPUT_DIR/checkpoints: written whole or not at all (`resume.py` finds them again).

A checkpoint is a folder `step-0000123` holding the weights (safetensors), the optimizer state and `state.json`
(step, history, the config it was made with); under --fsdp the weights and optimizer state are each rank's shards
instead (`dcp/`, torch.distributed.checkpoint), checked on every rank before the collective load (`check_shards`).
It is written under a temporary name and renamed when complete, so a folder with the final name is always whole;
leftovers of an interrupted save are ignored and cleaned up. The final model folder is written the same way
(`write_final`). The learning rate is a function of the step (`schedule.learning_rate_at`), so there is no scheduler
state to keep.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from mlmtune import distributed
from mlmtune.config import CONFIG_FILENAME
from mlmtune.distributed import Dist
from mlmtune.errors import MlmtuneError

STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d+)$")

# What a failed write raises on its way through the libraries: the OS's OSError (ENOSPC, EFBIG,
# EACCES), safetensors' SafetensorError, and torch.save's RuntimeError ("file write failed").
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_error(e: BaseException, folder: Path) -> str:
    """The reason of a failed write into `folder`, in a few words.

    The OS's reason where the error carries one (OSError, or safetensors' "(os error 28)");
    torch.save's "unexpected pos" carries none, so the likely causes are checked: free space and
    the process's file size limit.
    """
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.search(r"os error (\d+)", text)
    if m:
        return os.strerror(int(m.group(1)))
    try:
        if shutil.disk_usage(folder).free < 64 << 20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        return f"{os.strerror(errno.EFBIG)}: this process may write files of at most {soft:,} bytes (ulimit -f)"
    return text


@dataclass
class TrainState:
    """What the loop needs, beyond the weights and the optimizer state, to continue exactly."""

    step: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    eval_before: dict[str, Any] | None = None
    general_before: dict[str, Any] | None = None  # the general corpus' sample, before training (--general-eval)
    cloze_before: dict[str, Any] | None = None  # the domain cloze before training (--cloze-words)
    downstream_before: dict[str, Any] | None = None  # the downstream probe before training (--downstream)
    embedding_before: dict[str, Any] | None = None  # a sentence encoder's embedding check before training
    epochs: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    grad_scaler: dict[str, Any] | None = None  # fp16's loss scale and growth tracker
    world_size: int | None = None  # processes that trained it (None: a checkpoint from before this was kept)
    budget: dict[str, Any] | None = None  # --time-budget's plan, for the re-plan on several ranks (`budget.replan`)
    trackers: dict[str, str] = field(default_factory=dict)  # --report-to's runs (mlflow: its run id), to continue


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def is_run_dir(output_dir: Path) -> bool:
    """Whether a folder holds an mlmtune training run (checkpoints or a saved config)."""
    return checkpoints_dir(output_dir).is_dir() or (output_dir / CONFIG_FILENAME).is_file()


# the temporary names mlmtune gives a save in progress: nothing else is ever cleaned up
_PARTIAL = {"checkpoints": re.compile(r"^\.tmp-step-\d+-"), "output": re.compile(r"^\.tmp-(final|write-test)-")}


def remove_partial_saves(output_dir: Path) -> None:
    """Delete what a save killed half-way left behind (never a complete checkpoint, never a file
    whose name mlmtune does not give its own temporary saves)."""
    for root, pattern in ((checkpoints_dir(output_dir), _PARTIAL["checkpoints"]), (output_dir, _PARTIAL["output"])):
        if root.is_dir():
            for p in root.iterdir():
                if pattern.match(p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save_checkpoint(output_dir: Path, model, optimizer_state: dict, state: TrainState, keep: int) -> Path:
    """Write a checkpoint atomically and keep only the newest `keep`.

    The states come in already taken (`state_dict()`): under FSDP taking them is a collective every rank
    joins, while only rank 0 writes.

    Raises:
        MlmtuneError: the save failed (disk full, permissions); earlier checkpoints are untouched.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"step-{state.step:07d}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except WRITE_ERRORS as e:
        previous = list_checkpoints(output_dir)
        kept = f"the last good checkpoint is {previous[-1]}" if previous else "no earlier checkpoint exists"
        raise MlmtuneError(f"saving checkpoint {final.name} failed ({write_error(e, root)}); {kept}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


SHARDS = "dcp"  # under --fsdp a checkpoint's weights and optimizer state: each rank's shards (DCP), in this subfolder


def save_sharded_checkpoint(output_dir: Path, d: Dist, write_shards: Callable[[Path], Any], state: TrainState,
                            keep: int) -> PendingSave:
    """--fsdp: every rank writes its shards (`write_shards(folder)`, torch.distributed.checkpoint) into a temporary
    folder whose name all ranks know; `PendingSave.finish` then has rank 0 add the loop state and rename it into
    place once every rank has written. Nothing is gathered, so no rank needs the whole model's memory. Every rank
    joins. `write_shards` may return a future (DCP's async_save: the shards were copied to host memory, the files
    are written in the background while training goes on), which `finish` waits for.

    Raises:
        MlmtuneError: on every rank, when the write failed on any; earlier checkpoints are untouched.
    """
    root = checkpoints_dir(output_dir)
    pending = PendingSave(output_dir, d, root / f"step-{state.step:07d}", json.dumps(state.__dict__, indent=1), keep)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(pending.tmp, ignore_errors=True)
        pending.tmp.mkdir()

    try:
        distributed.main_first(d, lambda: _guard_write(prepare, root) if d.main else None)
        pending.handle = distributed.agree(d, lambda: write_shards(pending.tmp / SHARDS), "writing the shards failed")
    except MlmtuneError as e:
        raise pending.failed(e) from None
    return pending


class PendingSave:
    """A sharded checkpoint on its way: its shards written (or being written in the background); `finish`
    publishes it."""

    def __init__(self, output_dir: Path, d: Dist, final: Path, state_json: str, keep: int):
        self.output_dir, self.d, self.final, self.state_json, self.keep = output_dir, d, final, state_json, keep
        self.tmp = final.parent / f".tmp-{final.name}-shards"  # one name for every rank (a partial save if left)
        self.handle: Any = None  # async_save's future, or None when the shards are already written

    def failed(self, e: MlmtuneError) -> MlmtuneError:
        if self.d.main:
            shutil.rmtree(self.tmp, ignore_errors=True)
        previous = list_checkpoints(self.output_dir)
        kept = f"the last good checkpoint is {previous[-1]}" if previous else "no earlier checkpoint exists"
        return MlmtuneError(f"saving checkpoint {self.final.name} failed ({e}); {kept}")

    def finish(self) -> Path:
        """Every rank: wait for its shards, agree that all were written, then rank 0 writes the state and renames
        the folder into place (and drops the checkpoints beyond `keep`)."""
        d, final, tmp = self.d, self.final, self.tmp

        def publish() -> None:
            (tmp / STATE_FILE).write_text(self.state_json)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)

        try:
            if self.handle is not None:
                distributed.agree(d, self.handle.result, "writing the shards failed")
            distributed.main_first(d, lambda: _guard_write(publish, final.parent) if d.main else None)
        except MlmtuneError as e:
            raise self.failed(e) from None
        if d.main:
            for old in list_checkpoints(self.output_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final


def _guard_write(fn: Callable[[], None], folder: Path) -> None:
    try:
        fn()
    except WRITE_ERRORS as e:
        raise MlmtuneError(write_error(e, folder)) from None


def check_shards(folder: Path) -> None:
    """A sharded checkpoint is whole: its `.metadata` reads, and every file it names is there, at least as long as
    the last byte it points to. Run on every rank before the collective load, so that a missing or truncated shard
    is an error on all ranks rather than a rank that never joins.

    Raises:
        MlmtuneError: what is missing or short.
    """
    from torch.distributed.checkpoint import FileSystemReader

    if not (folder / ".metadata").is_file():
        raise MlmtuneError(f"{folder}/.metadata is missing")
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # a pickle of its own: any error is a damaged file
        raise MlmtuneError(f"{folder}/.metadata cannot be read ({type(e).__name__})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise MlmtuneError(f"shard {path} is missing")
        if path.stat().st_size < size:
            raise MlmtuneError(f"shard {path} is truncated ({path.stat().st_size:,} of {size:,} bytes)")


def _fsync_dir(folder: Path) -> None:
    """Flush the files of a folder (and of its subfolders) to disk before it is renamed into place."""
    for f in folder.iterdir():
        if f.is_dir():
            _fsync_dir(f)
            continue
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def _move_into(source: Path, target: Path) -> None:
    """Rename each file of `source` into `target`; a subfolder (a sentence encoder's `1_Pooling/`) goes in whole,
    or file by file into the one an earlier write of the same run left there."""
    for f in sorted(source.iterdir()):
        if f.is_dir() and (target / f.name).is_dir():
            _move_into(f, target / f.name)
        else:
            os.replace(f, target / f.name)


def write_final(output_dir: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` into a temporary folder, then move each file into `output_dir`.

    A run killed while writing leaves the temporary folder (removed by the next run), never a
    half-written model.safetensors under its real name.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=output_dir))
    try:
        write(tmp)
        _fsync_dir(tmp)
        _move_into(tmp, output_dir)
    except WRITE_ERRORS as e:
        raise MlmtuneError(f"writing the final model to {output_dir} failed ({write_error(e, output_dir)}); "
                           f"the checkpoints under {checkpoints_dir(output_dir)} are intact: fix it and rerun "
                           f"with --resume") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
