"""One run per folder: a lock file that names its holder.

Two `mlmtune train` runs on one `--output-dir` would write checkpoints, metrics and weights into the same
folder, and which run's files are left would depend on which finished last. A run takes the folder's lock
before it reads or writes anything there: a file created atomically (O_EXCL) that holds the holder's host,
process id and start time. A second run is refused in one line naming the holder. The lock goes on every
way out (`release`, also from `atexit`). One left by a process that died (SIGKILL, a node lost) is found
stale and taken over with a warning: on the same host by its process id; from another host (a requeued job
on another node, with the folder on a shared filesystem) because its holder stopped touching it: a live
holder refreshes the file's time every `BEAT` seconds, and one untouched for `STALE` seconds is dead.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

from mlmtune.errors import MlmtuneError, warn

LOCK_NAME = ".mlmtune-lock"
BEAT, STALE = 30.0, 300.0  # seconds: how often a holder touches its lock, and how long until an untouched one is dead


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
        self._stop = threading.Event()

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
                warn(f"{self.what} was locked by process {held.get('pid')} on {held.get('host')}, which is gone "
                     f"(killed?); taking it over")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise MlmtuneError(f"{self.what}: cannot create its lock {self.path} ({e.strerror or e})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            self._stop.clear()
            threading.Thread(target=self._beat, daemon=True, name="mlmtune-lock").start()
            return self
        raise MlmtuneError(f"{self.what}: cannot take its lock {self.path}; another run keeps taking it")

    def _beat(self) -> None:
        """Touch the lock while it is held: the sign of life another host reads."""
        while not self._stop.wait(BEAT):
            try:
                os.utime(self.path)
            except OSError:
                return

    def _stale(self, held: dict) -> bool:
        try:
            untouched = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            return not _alive(held["pid"])
        return untouched > STALE  # another host's (or an unreadable) lock: dead when its holder stopped beating

    def _refusal(self, held: dict) -> str:
        who = (f"process {held.get('pid')} on {held.get('host')}, since {held.get('since')}" if held
               else "another process")
        there = "" if held.get("host") in (None, socket.gethostname()) else (
            f"; it is taken over {STALE / 60:.0f} minutes after that run stops")
        return f"{self.what} is in use by another mlmtune run ({who}){there}: wait for it, or choose another folder"

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        held = _holder(self.path)
        if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
