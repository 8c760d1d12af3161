"""One run per folder: a second run on a folder in use is refused in one line naming the holder and does not
harm it; a lock left by a killed run is taken over; prepare folders and cache entries follow the same rule."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mlmtune.cli import main
from mlmtune.errors import MlmtuneError
from mlmtune.lock import LOCK_NAME, FolderLock
from mlmtune.training.train import train


def _flags(configs, out, steps: int = 4) -> list[str]:
    f = configs.flags(out)
    return ["--model", f["model"], "--dataset", f["dataset"], "--text-field", f["text_field"], "--block-size", "32",
            "--max-steps", str(steps), "--learning-rate", "1e-2", "--save-steps", "1000", "--precision", "fp32",
            "--cache-dir", f["cache_dir"], "--general-eval", "none", "--output-dir", str(out)]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_finishes(configs, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mlmtune", "train", *_flags(configs, out, steps=400)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / LOCK_NAME).exists()
    for extra in ([], ["--resume"]):
        assert main(["train", *_flags(configs, out), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"mlmtune: error: --output-dir {out} is in use by another mlmtune run (process {first.pid} on "
                       f"{socket.gethostname()}, since {json.loads((out / LOCK_NAME).read_text())['since']}): wait "
                       f"for it, or choose another folder")
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 400  # the first run, whole
    assert not (out / LOCK_NAME).exists()  # released on the way out


def test_a_lock_left_by_a_killed_run_is_taken_over(configs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "then"}))
    result = train(configs(out, max_steps=1), progress=False)
    assert result.metrics["train_steps"] == 1
    assert "which is gone (killed?); taking it over" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


def test_a_lock_is_released_when_the_run_fails(configs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="is not in the dataset"):
        train(configs(out, text_field="nope"), progress=False)
    assert not (out / LOCK_NAME).exists()
    assert train(configs(out, max_steps=1), progress=False).metrics["train_steps"] == 1  # the folder is free


def test_prepare_folders_and_cache_entries_have_one_writer(configs, tmp_path, capsys, monkeypatch):
    f = configs.flags(tmp_path)
    target = tmp_path / "prepared"
    held = FolderLock.beside(target, "x")
    held.path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "now"}))
    args = ["prepare", "--model", f["model"], "--dataset", f["dataset"], "--text-field", "answers.text",
            "--block-size", "32", "--output-dir", str(target)]
    assert main(args) == 1
    assert f"--output-dir {target} is in use by another mlmtune run (process {os.getppid()}" in capsys.readouterr().err
    assert not target.exists()
    held.path.unlink()
    assert main(args) == 0 and not held.path.exists()

    # a cache entry another run writes now: this run tokenizes on its own and trains
    from mlmtune.data import prepare

    cache = tmp_path / "cache"
    real = prepare.FolderLock.acquire

    def busy(self):
        if "cache entry" in self.what:
            raise prepare.MlmtuneError(f"{self.what} is in use by another mlmtune run")
        return real(self)

    monkeypatch.setattr(prepare.FolderLock, "acquire", busy)
    m = train(configs(tmp_path / "run", max_steps=1, cache_dir=str(cache)), progress=False).metrics
    assert m["train_steps"] == 1
    assert "tokenizing without the cache" in capsys.readouterr().err
    assert not any((cache / "blocks").glob("*/dataset_dict.json"))  # nothing written beside the other run


def test_a_lock_from_another_host_is_taken_over_only_when_its_holder_stopped_beating(configs, tmp_path, capsys):
    """A requeued job on another node: the killed run's lock is on the shared folder, from a host whose processes
    cannot be checked from here. Touched recently (its holder beats every 30 s): refused; untouched for longer
    than 5 minutes: dead, taken over."""
    from mlmtune.lock import STALE

    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "earlier"}))
    assert main(["train", *_flags(configs, out)]) == 1
    assert ("is in use by another mlmtune run (process 4242 on node-17, since earlier); it is taken over 5 minutes "
            "after that run stops") in capsys.readouterr().err
    old = time.time() - STALE - 10
    os.utime(lock, (old, old))
    assert train(configs(out, max_steps=1), progress=False).metrics["train_steps"] == 1
    assert "locked by process 4242 on node-17, which is gone (killed?); taking it over" in capsys.readouterr().err


def test_a_held_lock_beats(tmp_path, monkeypatch):
    from mlmtune import lock as lock_mod

    monkeypatch.setattr(lock_mod, "BEAT", 0.05)
    held = FolderLock.inside(tmp_path, "here").acquire()
    try:
        old = time.time() - 1000
        os.utime(held.path, (old, old))
        # wait for the beat itself (no sleep stands in for it): the holder touches the file again within seconds
        deadline = time.monotonic() + 30
        while held.path.stat().st_mtime < old + 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert time.time() - held.path.stat().st_mtime < 5  # touched again by the holder
    finally:
        held.release()
    assert not held.path.exists()


def _live_holder(**fields) -> dict:
    """A lock of this host whose process id is alive (the test's parent), as a previous container left it."""
    from mlmtune.lock import boot_id, pid_namespace, start_time

    pid = os.getppid()
    held = {"host": socket.gethostname(), "pid": pid, "since": "then", "boot_id": boot_id(),
            "pid_ns": pid_namespace(), "start": start_time(pid)}
    return {**held, **fields}


@pytest.mark.parametrize("fields, why", [
    ({"start": 1}, "process {pid} is another program now"),  # the id names another process: reused
    ({"boot_id": "00000000-0000-0000-0000-000000000000"}, "the machine has restarted since"),
])
def test_a_lock_whose_live_pid_is_another_process_now_is_taken_over(tmp_path, capsys, fields, why):
    """A restarted container keeps its host name and its new processes reuse the old ids: the id alone says "alive".
    The start time after boot and the boot id say who it was; the one-line warning says why it is taken over."""
    from mlmtune.lock import start_time

    assert start_time(os.getppid()) not in (None, 1)  # /proc answers here: the test means something
    held = _live_holder(**fields)
    (tmp_path / LOCK_NAME).write_text(json.dumps(held))
    lock = FolderLock.inside(tmp_path, "here").acquire()
    try:
        err = capsys.readouterr().err.strip()
        assert err == (f"warning: here was locked by process {held['pid']} on {held['host']}, which is gone "
                       f"({why.format(pid=held['pid'])}); taking it over")
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_a_live_process_is_refused_in_the_new_and_the_old_format(tmp_path):
    """The same holder, alive: refused whether its lock names it fully or only by host and pid (an older mlmtune's)."""
    for held in (_live_holder(), {"host": socket.gethostname(), "pid": os.getppid(), "since": "then"}):
        (tmp_path / LOCK_NAME).write_text(json.dumps(held))
        with pytest.raises(MlmtuneError, match=rf"^here is in use by another mlmtune run \(process {os.getppid()} "):
            FolderLock.inside(tmp_path, "here").acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text()) == held  # not harmed


def test_a_lock_from_another_pid_namespace_is_taken_over_when_its_beat_stopped(tmp_path, capsys):
    """Another container with this host name: its process cannot be looked up from here, so its beat decides."""
    from mlmtune.lock import CONTAINER_STALE, pid_namespace

    assert pid_namespace() is not None
    held = _live_holder(pid_ns=pid_namespace() + 1)
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps(held))
    with pytest.raises(MlmtuneError, match=rf"in another container; it is taken over {CONTAINER_STALE:.0f} s after"):
        FolderLock.inside(tmp_path, "here").acquire()
    old = time.time() - CONTAINER_STALE - 5
    os.utime(path, (old, old))
    FolderLock.inside(tmp_path, "here").acquire().release()
    assert "which is gone (another container's, untouched for " in capsys.readouterr().err
