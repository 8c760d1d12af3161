"""One run per folder: a lock file that names its holder.

Two `mlmtune train` runs on one `--output-dir` would write checkpoints, metrics and weights into the same
folder, and which run's files are left would depend on which finished last. A run takes the folder's lock
before it reads or writes anything there: a file created atomically (O_EXCL) that holds the holder's host,
process id and start time, and what names that process for sure: the kernel's boot id, its pid namespace and
the time it started after boot (/proc). A second run is refused in one line naming the holder. The lock goes on
every way out (`release`, also from `atexit`). One left by a process that died (SIGKILL, a node lost, a
container restarted) is found stale and taken over with a warning saying why:

- on the same host, the same boot and pid namespace: its process id is gone, or names another process now (a
  start time that differs: the id was reused);
- the same host name after a reboot (another boot id): no process outlives a boot;
- the same host name in another pid namespace (a restarted container keeps its host name, and its new
  processes reuse the old ids): the holder cannot be looked up from here, so, as from another host, its beat
  tells: a live holder refreshes the file's time every `BEAT` seconds, and one untouched for `CONTAINER_STALE`
  seconds is dead;
- another host (a requeued job on another node, with the folder on a shared filesystem): untouched for
  `STALE` seconds.

Lock files written before these fields existed (host, pid, since) are read as before: by process id.
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
CONTAINER_STALE = 2 * BEAT + 5  # seconds: the same host, another pid namespace (a restarted container)


def boot_id() -> str | None:
    """The kernel's id of this boot (Linux), the same in every container on the machine."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace (Linux): a new container has a new one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat, field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # after the name, which may hold spaces: field 3 onwards
    except (OSError, IndexError, ValueError):
        return None


def identity() -> dict:
    """What this process writes into a lock it takes."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for key, value in (("boot_id", boot_id()), ("pid_ns", pid_namespace()), ("start", start_time(os.getpid()))):
        if value is not None:
            me[key] = value
    return me


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
        me = identity()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _holder(self.path)
                if held is None:  # released in between: try again
                    continue
                gone = self._gone(held)
                if gone is None:
                    raise MlmtuneError(self._refusal(held)) from None
                warn(f"{self.what} was locked by process {held.get('pid')} on {held.get('host')}, which is gone "
                     f"({gone}); taking it over")
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

    def _gone(self, held: dict) -> str | None:
        """Why the holder of `held` is gone (see the module's docstring), or None while it may be alive."""
        try:
            untouched = time.time() - self.path.stat().st_mtime
        except OSError:
            return "killed?"
        pid = held.get("pid")
        if held.get("host") != socket.gethostname() or not isinstance(pid, int):
            # another host's (or an unreadable) lock: dead when its holder stopped beating
            return "killed?" if untouched > STALE else None
        if held.get("boot_id") not in (None, boot_id()):
            return "the machine has restarted since"
        if held.get("pid_ns") not in (None, pid_namespace()):  # a previous container's, or another's
            return f"another container's, untouched for {untouched:.0f} s" if untouched > CONTAINER_STALE else None
        if not _alive(pid):
            return "killed?"
        if held.get("start") not in (None, start_time(pid)):
            return f"process {pid} is another program now"
        return None

    def _refusal(self, held: dict) -> str:
        who = (f"process {held.get('pid')} on {held.get('host')}, since {held.get('since')}" if held
               else "another process")
        there = "" if held.get("host") in (None, socket.gethostname()) else (
            f"; it is taken over {STALE / 60:.0f} minutes after that run stops")
        if not there and held.get("pid_ns") not in (None, pid_namespace()):
            there = f" in another container; it is taken over {CONTAINER_STALE:.0f} s after that run stops"
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
