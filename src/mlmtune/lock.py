"""One run per folder: a lock file that names its holder.

Two `mlmtune train` runs on one `--output-dir` would write checkpoints, metrics and weights into the same
folder, and which run's files are left would depend on which finished last. A run takes the folder's lock
before it reads or writes anything there: a file created atomically (O_EXCL) that holds the holder's host,
process id and start time. A second run is refused in one line naming the holder. The lock goes on every
way out (`release`, also from `atexit`); one left by a process that died (SIGKILL, a crash of the machine)
is found stale, on the same host, by its process id, and taken over with a warning. A lock held on another
host cannot be checked from here: the message says how to remove it if that run is gone.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from mlmtune.errors import MlmtuneError, warn

LOCK_NAME = ".mlmtune-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        held = json.loads(path.read_text())
        return held if isinstance(held, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: a holder we cannot name


class FolderLock:
    """The lock of one folder (a file `name` inside it, or beside it for a folder that must stay empty)."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.held = Path(path), what, False

    @classmethod
    def inside(cls, folder: Path, what: str) -> FolderLock:
        return cls(Path(folder) / LOCK_NAME, what)

    @classmethod
    def beside(cls, folder: Path, what: str) -> FolderLock:
        folder = Path(folder)
        return cls(folder.parent / f".{folder.name}{LOCK_NAME}", what)

    def acquire(self) -> FolderLock:
        """Take the lock, or raise MlmtuneError naming the run that holds it."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _holder(self.path)
                if held is None:  # released in between: try again
                    continue
                if not self._stale(held):
                    raise MlmtuneError(self._refusal(held)) from None
                warn(f"{self.what} was locked by process {held.get('pid')}, which is gone (killed?); taking it over")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise MlmtuneError(f"{self.what}: cannot create its lock {self.path} ({e.strerror or e})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise MlmtuneError(f"{self.what}: cannot take its lock {self.path}; another run keeps taking it")

    def _stale(self, held: dict) -> bool:
        if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
            if not held:  # unreadable: written just now by another run, or damaged; an old one is stale
                return time.time() - self.path.stat().st_mtime > 60
            return False
        return not _alive(held["pid"])

    def _refusal(self, held: dict) -> str:
        who = (f"process {held.get('pid')} on {held.get('host')}, since {held.get('since')}" if held
               else "another process")
        there = "" if held.get("host") in (None, socket.gethostname()) else (
            f"; if that run is gone, delete {self.path}")
        return f"{self.what} is in use by another mlmtune run ({who}){there}: wait for it, or choose another folder"

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        held = _holder(self.path)
        if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
