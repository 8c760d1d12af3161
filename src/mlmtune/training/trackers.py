"""The dashboards `--report-to` writes to, one class each: TensorBoard, MLflow, trackio, Weights & Biases.

Each takes a run's scalars at an optimizer step (`log`); the trackers that keep runs (all but TensorBoard) also take
the run's settings as parameters when it starts, and at the end the final metrics.json values and the model card
(`final`). `dashboard.Dashboard` fans a run out to them and keeps training when one fails. Each is an optional
package, imported only when chosen.

Offline first: where each writes when nothing else is said.
- tensorboard: OUTPUT_DIR/runs/.
- mlflow: MLFLOW_TRACKING_URI, else sqlite:///OUTPUT_DIR/mlflow.db, artifacts under OUTPUT_DIR/mlruns/ (SQLite is
  MLflow 3's own default backend; its file store refuses new runs unless MLFLOW_ALLOW_FILE_STORE=true).
- trackio: its local store (TRACKIO_DIR, else ~/.cache/huggingface/trackio), project TRACKIO_PROJECT or mlmtune.
- wandb: its own service (WANDB_MODE=offline keeps the run on this machine), files under OUTPUT_DIR/wandb/ unless
  WANDB_DIR says otherwise; project WANDB_PROJECT or mlmtune.

A tracker that keeps runs has a `run_id`, which the checkpoints keep, so that --resume continues the same run;
`note` says, on a resume, why a new run was started instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

PROJECT = "mlmtune"  # the MLflow experiment, trackio project and W&B project when no variable names one


def default_mlflow_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


class TensorBoard:
    """Event files under OUTPUT_DIR/runs/ with the Trainer's tag names. A resumed run writes to the same folder and
    drops the points the interrupted run logged after its checkpoint, so each curve stays one line."""

    name = "tensorboard"

    def __init__(self, out: Path, settings: dict[str, str], start_step: int, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id, self.note = None, None
        # purge_step: TensorBoard hides what an interrupted run logged after the step it resumes from (the points
        # of that step itself, its checkpoint's, stay: purge_step drops those at or after it)
        self.writer = SummaryWriter(log_dir=str(out / "runs"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def final(self, step: int, metrics: dict[str, float], card: Path) -> None:
        pass  # the curves are TensorBoard's part; the card and metrics.json sit beside its runs/ folder

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """A run in an MLflow experiment, through MlflowClient (no global active run that user code might hold)."""

    name = "mlflow"
    BATCH = 100  # MLflow's limit of parameters in one log_batch

    def __init__(self, out: Path, settings: dict[str, str], start_step: int, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(out)
        self.client, self.note = MlflowClient(tracking_uri=uri), None
        run = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                self.note = f"run {run_id} is not in {uri}"
        if run is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:  # the default store keeps its artifacts beside it, not in the working directory
                where = None if os.environ.get("MLFLOW_TRACKING_URI") else (out / "mlruns").resolve().as_uri()
                experiment_id = self.client.create_experiment(name, artifact_location=where)
            else:
                experiment_id = experiment.experiment_id
            run = self.client.create_run(experiment_id, run_name=out.resolve().name)
        self.run_id = run.info.run_id
        # a continued run keeps the parameters it started with (MLflow refuses to change one); new ones are added
        params = [Param(k, v[:6000]) for k, v in settings.items() if k not in run.data.params]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.BATCH])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def flush(self) -> None:
        pass  # every call is written when it returns

    def final(self, step: int, metrics: dict[str, float], card: Path) -> None:
        self.log(step, metrics)
        self.client.log_artifact(self.run_id, str(card))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio:
    """A run in trackio's local store (or the Space or server that trackio's own variables name)."""

    name = "trackio"

    def __init__(self, out: Path, settings: dict[str, str], start_step: int, run_id: str | None):
        import trackio

        self.trackio, self.note = trackio, None
        # a run is known by its name in trackio: a new one gets the folder's name and the time, to be told apart
        name = run_id or f"{out.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
        with _stdout_to_stderr():  # trackio prints its greetings on stdout, which is mlmtune's results'
            # a continued run takes the settings of the run that continues it (trackio replaces them whole)
            self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, config=settings,
                                    resume="allow" if run_id else "never", embed=False, auto_log_cpu=False,
                                    auto_log_gpu=False)
        self.run_id = name
        if run_id and self.run.name != run_id:
            self.note = f"run {run_id} is not in trackio's store"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        pass  # trackio writes from its own thread

    def final(self, step: int, metrics: dict[str, float], card: Path) -> None:
        self.run.log(metrics, step=step)
        with _stdout_to_stderr():
            self.run.log_artifact(str(card), name="model-card", type="model-card")

    def close(self) -> None:
        with _stdout_to_stderr():
            self.trackio.finish()  # waits for trackio's thread to write what it holds


class WandB:
    """A Weights & Biases run; WANDB_MODE=offline keeps it on this machine (`wandb sync` uploads it later)."""

    name = "wandb"

    def __init__(self, out: Path, settings: dict[str, str], start_step: int, run_id: str | None):
        import wandb

        self.wandb, self.note = wandb, None
        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(out)}  # not ./wandb in the working directory
        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out.resolve().name,
                              **where, **resume)
        self.run.config.update(settings, allow_val_change=True)
        self.run_id = self.run.id
        if run_id and self.run.resumed is False:
            self.note = f"run {run_id} was not found"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        pass

    def final(self, step: int, metrics: dict[str, float], card: Path) -> None:
        self.run.summary.update(metrics)
        artifact = self.wandb.Artifact(f"model-card-{self.run.id}", type="model-card")
        artifact.add_file(str(card))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {t.name: t for t in (TensorBoard, MLflow, Trackio, WandB)}

# what each needs installed: (modules to import, the extra that brings them)
PACKAGES = {"tensorboard": (("tensorboard",), "tensorboard"), "mlflow": (("mlflow",), "mlflow"),
            "trackio": (("trackio",), "trackio"), "wandb": (("wandb",), "wandb")}
# the default SQLite store is the full mlflow package's; mlflow-skinny alone has none
MLFLOW_SQLITE = ("sqlalchemy", "alembic")


@contextlib.contextmanager
def _stdout_to_stderr():
    with contextlib.redirect_stdout(sys.stderr):
        yield
