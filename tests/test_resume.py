"""Nothing lost: SIGKILL anywhere, a full disk, a damaged checkpoint; each run ends where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from compare import RESUMED_BOUND, assert_same_updates, assert_same_weights, unmask_one_token, update_difference

from mlmtune.errors import MlmtuneError
from mlmtune.training import checkpoint as ckpt_mod
from mlmtune.training.train import train


def _assert_same_run(out, reference):
    """The run in `out` ended where the uninterrupted reference run ended: weights, evaluations, eval loss."""
    assert_same_weights(out, reference.weights)
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_loss_after"] == pytest.approx(reference.metrics["eval_loss_after"], rel=1e-6)
    assert [e["step"] for e in m["epochs"]] == [e["step"] for e in reference.metrics["epochs"]]


# A child process that trains and kills itself with SIGKILL at a chosen point: no cleanup runs.
DRIVER = textwrap.dedent("""
    import os, signal, sys, json
    import torch
    from mlmtune.training import checkpoint
    from mlmtune.config import TrainConfig
    from mlmtune.options import resolve
    from mlmtune.training.train import train

    flags, where, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if where == "after_step":
        train(resolve(TrainConfig, {}, flags), progress=False, on_step=lambda s, _: die() if s == n else None)
    elif where == "in_save":  # the n-th torch.save call: a checkpoint half written
        calls = {"n": 0}
        real = torch.save
        def save(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                die()
            return real(*a, **k)
        checkpoint.torch.save = save
        train(resolve(TrainConfig, {}, flags), progress=False)
    elif where == "in_final":  # while the final model is being written
        real = checkpoint._fsync_dir
        def sync(folder):
            if folder.name.startswith(".tmp-final-"):
                die()
            return real(folder)
        checkpoint._fsync_dir = sync
        train(resolve(TrainConfig, {}, flags), progress=False)
""")


@pytest.mark.numerics
@pytest.mark.parametrize("where, n", [("after_step", 5), ("in_save", 3), ("in_final", 0)])
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(configs, tmp_path, reference_run, where, n):
    out = tmp_path / "killed"
    flags = configs.flags(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(flags), where, str(n)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (out / "metrics.json").exists()  # it really died before the end
    complete = ckpt_mod.list_checkpoints(out)
    assert complete, "no complete checkpoint survived"
    for c in complete:  # every checkpoint under its final name is whole
        assert {f.name for f in c.iterdir()} == {"model.safetensors", "optimizer.pt", "state.json"}

    train(configs(out, resume=True), progress=False)
    _assert_same_run(out, reference_run)
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_disk_full_during_save_keeps_the_last_good_checkpoint(configs, tmp_path, reference_run, monkeypatch):
    out = tmp_path / "full-disk"
    real = ckpt_mod.save_model
    calls = {"n": 0}

    def save_model(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ckpt_mod, "save_model", save_model)
    with pytest.raises(MlmtuneError, match=r"saving checkpoint step-0000006 failed \(No space left on device\); "
                                           r"the last good checkpoint is .*step-0000004"):
        train(configs(out), progress=False)
    monkeypatch.setattr(ckpt_mod, "save_model", real)
    assert [c.name for c in ckpt_mod.list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert not list((out / "checkpoints").glob(".tmp-*"))

    train(configs(out, resume=True), progress=False)
    _assert_same_run(out, reference_run)


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(configs, tmp_path, reference_run, capsys):
    out = tmp_path / "damaged"

    def ctrl_c_at_step_7(step, _seconds):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(MlmtuneError, match="interrupted at step 7"):
        train(configs(out), progress=False, on_step=ctrl_c_at_step_7)
    newest = ckpt_mod.list_checkpoints(out)[-1]
    assert newest.name == "step-0000007"  # the Ctrl-C checkpoint
    (newest / "model.safetensors").write_bytes(b"\0" * 100)  # damaged on disk

    capsys.readouterr()
    train(configs(out, resume=True), progress=False)
    err = capsys.readouterr().err
    assert "warning: --resume: checkpoint" in err and "step-0000007" in err
    assert "Resuming from" in err and "step-0000006 (step 6)" in err  # the one before
    _assert_same_run(out, reference_run)


def test_no_readable_checkpoint_is_an_error(reference_run, configs, tmp_path):
    out = reference_run.copy_up_to(2, tmp_path / "unreadable")
    for c in ckpt_mod.list_checkpoints(out):
        (c / "state.json").write_text("{not json")
    with pytest.raises(MlmtuneError, match="none of the 1 checkpoints .* can be read"):
        train(configs(out, resume=True), progress=False)


def _flat_layout(config: dict) -> dict:
    """A saved config as checkpoints held it before TrainConfig had groups: every setting at the top but the
    data's and the downstream probe's, which were nested as `data` and `downstream`."""
    old = {}
    for key, value in config.items():
        if key in ("measure", "schedule", "optim", "compute", "output"):
            old.update(value)  # measure's `downstream` stays a nested dict, as it was
        else:
            old[key] = value
    return old


def test_a_checkpoint_saved_with_the_flat_config_of_older_versions_resumes(configs, tmp_path, reference_run):
    out = reference_run.copy_up_to(4, tmp_path / "flat")
    state_file = ckpt_mod.list_checkpoints(out)[-1] / ckpt_mod.STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"] = _flat_layout(state["config"])
    assert state["config"]["learning_rate"] == configs(out).optim.learning_rate and "optim" not in state["config"]
    assert set(state["config"]["data"]) >= {"dataset", "block_size"} and "downstream" in state["config"]
    state_file.write_text(json.dumps(state))

    with pytest.raises(MlmtuneError, match=r"other settings \(learning_rate: 0\.01 -> 0\.02\)"):
        train(configs(out, resume=True, learning_rate=2e-2), progress=False)  # a flat setting still counts
    with pytest.raises(MlmtuneError, match=r"other settings \(block_size: 32 -> 16\)"):
        train(configs(out, resume=True, block_size=16), progress=False)  # and so does a nested one
    train(configs(out, resume=True), progress=False)
    _assert_same_run(out, reference_run)


def test_output_dir_that_cannot_be_created(configs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(MlmtuneError, match="is not writable"):
        train(configs(blocker / "out"), progress=False)


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"),
                                          (signal.SIGUSR1, "SIGUSR1")])  # the terminal, scancel / eviction, SLURM
def test_a_real_signal_stops_after_the_step_and_saves_it(configs, tmp_path, reference_run, capsys, signum, name):
    out = tmp_path / "signal"
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def send(step, _seconds):
        if step == 3:
            os.kill(os.getpid(), signum)

    with pytest.raises(MlmtuneError, match="interrupted at step 3; checkpoint saved in .*step-0000003"):
        train(configs(out), progress=False, on_step=send)
    assert f"{name} at step 3: finishing this step and saving a checkpoint" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    train(configs(out, resume=True), progress=False)
    _assert_same_run(out, reference_run)


# A child that trains with a real limit on file size (RLIMIT_FSIZE, SIGXFSZ ignored so that write()
# fails with EFBIG instead of killing the process): the save paths meet the errors the real
# libraries raise (safetensors' SafetensorError, torch.save's RuntimeError), not a faked OSError.
FSIZE_DRIVER = textwrap.dedent("""
    import json, resource, signal, sys
    from mlmtune.config import TrainConfig
    from mlmtune.errors import MlmtuneError
    from mlmtune.options import resolve
    from mlmtune.training.train import train

    flags, at_step, limit = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def shrink(step, _seconds):
        if step == at_step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        train(resolve(TrainConfig, {}, flags), progress=False, on_step=shrink)
    except MlmtuneError as e:
        print(f"mlmtune: error: {e}", file=sys.stderr)
        sys.exit(1)
""")


@pytest.mark.parametrize("what, at_step, limit", [
    ("weights (safetensors)", 3, 4096),              # smaller than model.safetensors
    ("optimizer state (torch.save)", 3, "weights"),  # model.safetensors fits, optimizer.pt does not
    ("final model", 8, 4096),                        # the last checkpoint is written, then the limit
])
def test_real_write_failure_keeps_the_last_good_checkpoint(tiny_model_dir, configs, tmp_path, reference_run, what,
                                                           at_step, limit):
    out = tmp_path / "fsize"
    flags = configs.flags(out)  # its blocks are in the session's cache: the limit meets only the run's own writes
    if limit == "weights":
        limit = (tiny_model_dir / "model.safetensors").stat().st_size + 4096
    p = subprocess.run([sys.executable, "-c", FSIZE_DRIVER, json.dumps(flags), str(at_step), str(limit)],
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr and last.startswith("mlmtune: error: ")
    assert "File too large" in last, last
    if what == "final model":
        assert "writing the final model" in last and "checkpoints under" in last
        assert [c.name for c in ckpt_mod.list_checkpoints(out)][-1] == "step-0000008"
        assert not (out / "model.safetensors").exists()
    else:
        assert "saving checkpoint step-0000004 failed (File too large" in last
        assert "); the last good checkpoint is" in last
        assert [c.name for c in ckpt_mod.list_checkpoints(out)] == ["step-0000002"]
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".tmp-*"))
    train(configs(out, resume=True), progress=False)  # the limit is gone
    _assert_same_run(out, reference_run)


@pytest.mark.numerics
def test_the_global_batch_may_be_split_otherwise_on_resume_but_not_changed(configs, tmp_path, tiny_model_dir,
                                                                          monkeypatch):
    """The reference trains 4 blocks a step (4 per process x 1 x 1). Resumed at step 4 as 2 blocks x 2
    accumulation, each step trains on the same blocks with the same masks: it ends on the reference up to the order
    of fp32 sums (RESUMED_BOUND), where one token masked otherwise does not. Resumed with 2 blocks a step, it is
    refused in one line that names both. The model has no dropout: dropout draws per forward pass, so two passes
    of 2 blocks draw other numbers than one of 4 (as other processes do, see test_distributed)."""
    from conftest import Reference
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, RobertaForMaskedLM

    model = tmp_path / "no-dropout"
    RobertaForMaskedLM.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model)
    configs = functools.partial(configs, model=str(model))
    ref = train(configs(tmp_path / "reference"), progress=False)
    reference_run = Reference(ref.output_dir, ref.metrics, load_file(str(ref.output_dir / "model.safetensors")))
    start = load_file(str(reference_run.checkpoint(4) / "model.safetensors"))
    out = reference_run.copy_up_to(4, tmp_path / "split")
    train(configs(out, batch_size=2, gradient_accumulation_steps=2, resume=True), progress=False)
    assert_same_updates(load_file(str(out / "model.safetensors")), reference_run.weights, start, RESUMED_BOUND)
    other = reference_run.copy_up_to(4, tmp_path / "other")
    with pytest.raises(MlmtuneError, match=r"^--resume: .*step-0000004 was trained with a global batch of 4 blocks "
                                           r"\(4 per process x 1 process x 1 accumulation\); this run's is 2 \(2 per "
                                           r"process x 1 process x 1 accumulation\): keep it, e.g. with "
                                           r"--gradient-accumulation-steps 2$"):
        train(configs(other, batch_size=2, resume=True), progress=False)
    calls = unmask_one_token(monkeypatch)
    off = reference_run.copy_up_to(4, tmp_path / "one-token-off")
    train(configs(off, batch_size=2, gradient_accumulation_steps=2, resume=True), progress=False)
    assert calls["n"] > 0
    moved, _ = update_difference(load_file(str(off / "model.safetensors")), reference_run.weights, start)
    assert moved > 100 * RESUMED_BOUND  # measured 1.4


def test_the_same_signal_twice_at_once_is_one_request_and_a_later_one_a_second(monkeypatch):
    """SLURM signals every process of a step and torchrun forwards its own SIGTERM: two, milliseconds apart, ask
    once. The same signal after REPEAT_SECONDS, or another signal, is a second request (on several ranks: at once)."""
    from mlmtune.training import stopping

    stop = stopping.Stop()
    with stop.listening():
        stop.begin_steps(ranks=True, step_now=lambda: 5)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # handled before kill returns: the repeat, ignored
        assert stop.requested.is_set()
        with pytest.raises(stopping.StopNow, match="SIGUSR1"):
            os.kill(os.getpid(), signal.SIGUSR1)
    stop = stopping.Stop()
    monkeypatch.setattr(stopping, "REPEAT_SECONDS", 0.0)
    with stop.listening():
        stop.begin_steps(ranks=True, step_now=lambda: 5)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(stopping.StopNow, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_at_a_step_due_an_evaluation_skips_it_saves_once_and_resume_runs_it(configs, tmp_path, reference_run,
                                                                                    capsys, monkeypatch):
    """SIGTERM (twice, as a job's processes get it) during a step due an evaluation and a checkpoint (the last): the
    run leaves after that step without evaluating it, writes its checkpoint once, and --resume runs the evaluation:
    the run ends as the uninterrupted one, evaluations included."""
    from mlmtune.training.loop import Loop

    k = 8
    assert [e["step"] for e in reference_run.metrics["epochs"]] == [k]  # evaluated at k (and a checkpoint at k)
    real_batches, real_save = Loop.next_batches, ckpt_mod.save_checkpoint
    saved = []

    def next_batches(self, feed):
        if self.state.step == k - 1:  # step k begins
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batches(self, feed)

    def save(out, model, optimizer_state, state, limit):
        saved.append(state.step)
        return real_save(out, model, optimizer_state, state, limit)

    monkeypatch.setattr(Loop, "next_batches", next_batches)
    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save)
    out = tmp_path / "stopped"
    with pytest.raises(MlmtuneError, match=rf"interrupted at step {k}; checkpoint saved in .*step-{k:07d}"):
        train(configs(out), progress=False)
    err = capsys.readouterr().err
    assert err.count(f"SIGTERM at step {k - 1}: finishing this step") == 1
    assert f"step {k}: eval loss" not in err  # no evaluation once the stop was asked for
    assert saved == [s for s in range(2, k + 1, 2)]  # step k written once
    monkeypatch.undo()
    train(configs(out, resume=True), progress=False)
    assert f"step {k}: eval loss" in capsys.readouterr().err
    _assert_same_run(out, reference_run)


def test_a_signal_during_start_up_leaves_at_once_in_one_line_with_the_lock_released(configs, tmp_path):
    """SIGTERM to every process of the run while it loads (here: as soon as it holds its folder's lock): not killed by
    the default handler (-15), but one line and exit 1, the lock released, nothing else written."""
    import time

    from mlmtune.lock import LOCK_NAME

    out = tmp_path / "run"
    f = configs.flags(out)
    p = subprocess.Popen([sys.executable, "-m", "mlmtune", "train", "--model", f["model"], "--dataset", f["dataset"],
                          "--text-field", f["text_field"], "--block-size", "32", "--cache-dir", f["cache_dir"],
                          "--general-eval", "none", "--output-dir", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (out / LOCK_NAME).exists()
    os.killpg(p.pid, signal.SIGTERM)
    os.killpg(p.pid, signal.SIGTERM)  # as SLURM and then torchrun send it
    t0 = time.monotonic()
    _, err = p.communicate(timeout=120)
    assert time.monotonic() - t0 < 30
    assert p.returncode == 1, err[-2000:]
    assert err.strip().splitlines()[-1] == ("mlmtune: error: SIGTERM during start-up, before the first step: left at "
                                            "once, nothing to save")
    assert "Traceback" not in err
    assert not (out / LOCK_NAME).exists() and not (out / "checkpoints").exists()
