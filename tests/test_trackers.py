"""`--report-to`: what TensorBoard, MLflow and trackio hold after a run, read back with their own readers.

One run, interrupted at step 5 and resumed to step 8, reports to three trackers at once; every tracker's curve is
checked against metrics.json, which the run writes on its own path, and its parameters against the saved config.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mlmtune.cli import main
from mlmtune.errors import MlmtuneError
from mlmtune.training.train import train

STOP_AT = 5


@dataclass(frozen=True)
class Tracked:
    out: Path
    metrics: dict
    said: str  # what the resumed run said on stderr


def _ctrl_c_at(step: int):
    def on_step(s: int, _seconds: float) -> None:
        if s == step:
            raise KeyboardInterrupt

    return on_step


@pytest.fixture(scope="module")
def tracked(configs, tmp_path_factory) -> Tracked:
    """8 steps reported to tensorboard, mlflow (its default store) and trackio, interrupted after step 5."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    capture = tmp_path_factory.mktemp("tracked-stderr") / "stderr.txt"
    flags = {"report_to": "tensorboard,mlflow,trackio", "save_steps": 4}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("TRACKIO_PROJECT", raising=False)
        with pytest.raises(MlmtuneError, match=f"interrupted at step {STOP_AT}"):
            train(configs(out, **flags), progress=False, on_step=_ctrl_c_at(STOP_AT))
        saved = json.loads((out / "checkpoints" / f"step-{STOP_AT:07d}" / "state.json").read_text())
        assert set(saved["trackers"]) == {"mlflow", "trackio"}
        with capture.open("w") as f:
            mp.setattr(sys, "stderr", f)
            train(configs(out, resume=True, **flags), progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 8
    return Tracked(out, metrics, capture.read_text())


def _losses(metrics: dict) -> list[tuple[int, float]]:
    return [(p["step"], p["loss"]) for p in metrics["train_loss"]]


def _config_leaves(out: Path, started: bool = False) -> dict[str, str]:
    """The saved mlmtune_config.yaml (the resumed run's) as dotted keys and the str of each value; `started`: the
    settings of the run that started the tracker run, which differ in --resume only."""
    def walk(d: dict, prefix: str = "") -> dict[str, str]:
        flat = {}
        for k, v in d.items():
            flat.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)})
        return flat

    saved = walk(yaml.safe_load((out / "mlmtune_config.yaml").read_text()))
    assert saved["output.resume"] == "True"
    return {**saved, "output.resume": "False"} if started else saved


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_mlflow_holds_the_run_as_metrics_json_and_the_config_say(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked.out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlmtune")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed run continued it
    run = runs[0]
    assert f"--report-to mlflow: continuing run {run.info.run_id} from step {STOP_AT}" in tracked.said
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history == _losses(tracked.metrics)  # steps 1-5 before the interruption, 6-8 after, each once
    evals = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss"))
    assert evals[0] == (0, tracked.metrics["eval_loss_before"]) and evals[-1] == (8, tracked.metrics["eval_loss_after"])
    final = _numbers(tracked.metrics)
    assert final["eval_loss_after"] < final["eval_loss_before"]
    assert {k: run.data.metrics[k] for k in final} == final
    assert run.data.params == _config_leaves(tracked.out, started=True)  # MLflow refuses to change a parameter
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["README.md"]
    card = Path(client.download_artifacts(run.info.run_id, "README.md", str(tracked.out.parent / "download")))
    assert card.read_bytes() == (tracked.out / "README.md").read_bytes()
    assert run.info.artifact_uri.startswith((tracked.out / "mlruns").as_uri())  # not ./mlruns where tests run


def test_trackio_holds_the_run_as_metrics_json_and_the_config_say(tracked):
    from trackio.api import Api
    from trackio.sqlite_storage import SQLiteStorage

    runs = [r for r in Api().runs("mlmtune") if r.name.startswith(f"{tracked.out.name}-")]
    assert len(runs) == 1
    run = runs[0]
    assert f"--report-to trackio: continuing run {run.name} from step {STOP_AT}" in tracked.said
    logs = SQLiteStorage.get_logs("mlmtune", run.name, run_id=run.id)
    assert sorted((r["step"], r["train/loss"]) for r in logs if "train/loss" in r) == _losses(tracked.metrics)
    final = [r for r in logs if "eval_loss_after" in r]
    assert len(final) == 1 and all(final[0][k] == v for k, v in _numbers(tracked.metrics).items())
    assert {k: v for k, v in run.config.items() if not k.startswith("_")} == _config_leaves(tracked.out)  # the last
    artifacts = SQLiteStorage.get_run_artifacts("mlmtune", run.name, run.id)
    assert "model-card" in json.dumps(artifacts, default=str)


def test_tensorboard_beside_them_holds_the_same_curve(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked.out / "runs")).Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == \
        _losses(tracked.metrics)  # TensorBoard keeps float32


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_goes_on(configs, tmp_path, monkeypatch, capsys):
    """MLflow's store gone after step 3 (every call raising, as a dead server does): one warning, and the run ends
    with its model, metrics and the TensorBoard curve whole."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = MlflowClient.log_batch
    calls = {"n": 0}

    def gone(self, run_id, metrics=(), params=(), tags=(), **kw):
        if any(m.key == "train/loss" and m.step > 3 for m in metrics):
            calls["n"] += 1
            raise ConnectionError("Connection refused")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", gone)
    out = tmp_path / "run"
    m = train(configs(out, report_to="mlflow,tensorboard", max_steps=6, save_steps=6), progress=False).metrics
    err = capsys.readouterr().err
    assert calls["n"] == 1  # dropped after its first failure: no retry each step
    assert err.count("warning: --report-to mlflow failed (ConnectionError: Connection refused); training goes on "
                     "without it") == 1
    assert m["train_steps"] == 6 and (out / "model.safetensors").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mlmtune").experiment_id])
    assert [x.step for x in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [e.step for e in EventAccumulator(str(out / "runs")).Reload().Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("report_to, message", [
    ("mlfow", r"--report-to: 'mlfow' is not one of none, tensorboard, mlflow, trackio, wandb"),
    ("none,mlflow", r"--report-to none reports nowhere, so it stands alone"),
    ("mlflow,mlflow", r"--report-to names mlflow twice"),
])
def test_bad_report_to_is_one_line_and_writes_nothing(configs, tmp_path, capsys, report_to, message):
    flags = configs.flags(tmp_path / "run", report_to=report_to)
    args = ["train", *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.match(f"mlmtune: error: {message}", err), err
    assert not (tmp_path / "run").exists()


def test_a_tracker_not_installed_is_named_before_any_work(configs, tmp_path, monkeypatch, capsys):
    """`import trackio` failing (None in sys.modules, as where it is not installed): the CLI's one line, with the
    install command, exit 1, no folder; `mlmtune check` names it too."""
    monkeypatch.setitem(sys.modules, "trackio", None)
    flags = configs.flags(tmp_path / "run", report_to="tensorboard,trackio")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    assert main(["train", *args]) == 1
    assert capsys.readouterr().err.strip() == (
        "mlmtune: error: --report-to trackio needs the trackio package: pip install 'mlmtune[trackio]'")
    assert not (tmp_path / "run").exists()
    assert main(["check", "--no-probe", *args]) == 1
    assert "error  --report-to trackio needs the trackio package: pip install 'mlmtune[trackio]'" in \
        capsys.readouterr().out


def test_a_config_file_may_list_the_trackers_as_the_trainer_yaml_does(tmp_path):
    from mlmtune.config import TrainConfig
    from mlmtune.config_groups import report_targets
    from mlmtune.options import load_config_file, resolve

    path = tmp_path / "run.yaml"
    path.write_text("dataset: notes.txt\nreport_to: [tensorboard, mlflow]\n")
    cfg = resolve(TrainConfig, load_config_file(path), {})
    assert report_targets(cfg.output.report_to) == ("tensorboard", "mlflow")
    path.write_text("dataset: notes.txt\nreport_to: [none, mlflow]\n")
    with pytest.raises(MlmtuneError, match="--report-to none reports nowhere"):
        resolve(TrainConfig, load_config_file(path), {})


def test_an_mlflow_server_that_does_not_answer_is_a_warning_not_a_failed_run(configs, tmp_path, monkeypatch, capsys):
    """A real MLflow client against a port nobody listens on (retries off, so that the test does not wait)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    out = tmp_path / "run"
    m = train(configs(out, report_to="mlflow", max_steps=2, save_steps=2), progress=False).metrics
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --report-to")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --report-to mlflow: cannot start a run (")
    assert warnings[0].endswith("; training goes on without it")
    assert m["train_steps"] == 2 and (out / "metrics.json").is_file()
    assert not (out / "mlflow.db").exists()  # the store named is the server, not a local default


def test_mlflow_skinny_alone_is_told_to_install_mlflow_unless_a_store_is_named(monkeypatch):
    from mlmtune.training.dashboard import missing

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # what mlflow-skinny lacks
    assert missing("tensorboard,mlflow") == [
        "--report-to mlflow needs the mlflow package: pip install 'mlmtune[mlflow]' (mlflow-skinny alone has no "
        "SQLite store: install mlflow, or set MLFLOW_TRACKING_URI)"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert missing("tensorboard,mlflow") == []
