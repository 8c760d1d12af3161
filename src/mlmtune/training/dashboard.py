"""A run's numbers while it trains, for the dashboards users already watch (`--report-to`).

One `Dashboard` per run fans its numbers out to each tracker `--report-to` names (`trackers.py`: tensorboard,
mlflow, trackio, wandb), with the Trainer's tag names (`train/loss`, `train/learning_rate`, `eval/loss`, ...).
Only rank 0 of a job reports. A tracker that fails (a server gone, a disk full) is dropped with one warning and
the run trains on: a dashboard is never worth the run. A missing package is found before any work (`require`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlmtune.config_groups import report_targets
from mlmtune.errors import MlmtuneError, say, warn
from mlmtune.training.trackers import MLFLOW_SQLITE, PACKAGES, TRACKERS


def missing(report_to: str) -> list[str]:
    """What the trackers of `report_to` lack on this machine, one line each (empty: nothing)."""
    found = []
    for name in report_targets(report_to):
        modules, extra = PACKAGES[name]
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            modules = (*modules, *MLFLOW_SQLITE)  # the default store, OUTPUT_DIR/mlflow.db
        if not all(_importable(m) for m in modules):
            found.append(f"--report-to {name} needs the {extra} package: pip install 'mlmtune[{extra}]'"
                         + (" (mlflow-skinny alone has no SQLite store: install mlflow, or set "
                            "MLFLOW_TRACKING_URI)" if name == "mlflow" and _importable("mlflow") else ""))
    return found


def require(report_to: str) -> None:
    """Fail at the start of a run, before any work, when a dashboard's package is missing."""
    lines = missing(report_to)
    if lines:
        raise MlmtuneError("; ".join(lines))


def _importable(module: str) -> bool:
    try:
        __import__(module)  # an import statement's way, which sees what replaces builtins.__import__
    except ImportError:
        return False
    return True


def settings_of(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A run's resolved config as flat parameters: `data.block_size` -> "32"."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(settings_of(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def final_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json a tracker keeps as the run's results (its lists and texts stay in the file)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Dashboard:
    """Writes a run's scalars to the trackers of `report_to`, or nowhere (`report_to="none"`, or a rank other than
    0).

    Args:
        report_to: the --report-to value (comma-separated names).
        output_dir: the run's folder.
        start_step: the step a resumed run starts from (0: a new run).
        enabled: False on the ranks other than 0.
        config: the run's resolved config, which the trackers that keep runs record as parameters.
        runs: the tracker runs of the checkpoint a resumed run continues (`runs` of the run that saved it).
    """

    def __init__(self, report_to: str, output_dir: Path, start_step: int = 0, enabled: bool = True,
                 config: dict[str, Any] | None = None, runs: dict[str, str] | None = None):
        self.trackers: list = []
        self.runs: dict[str, str] = {}  # tracker -> its run, kept in the checkpoints so that --resume continues it
        if not enabled:
            return
        require(report_to)
        settings, runs = settings_of(config or {}), runs or {}
        for name in report_targets(report_to):
            try:
                tracker = TRACKERS[name](Path(output_dir), settings, start_step, runs.get(name))
            except Exception as e:  # each package has its own errors for a store it cannot reach
                warn(f"--report-to {name}: cannot start a run ({_reason(e)}); training goes on without it")
                continue
            self.trackers.append(tracker)
            if tracker.run_id is None:
                continue
            self.runs[name] = tracker.run_id
            if start_step and tracker.run_id == runs.get(name):
                say(f"--report-to {name}: continuing run {tracker.run_id} from step {start_step}")
            elif start_step:
                why = tracker.note or "the checkpoint names no run of it"
                say(f"--report-to {name}: {why}; run {tracker.run_id} starts at step {start_step}")

    def _log(self, step: int, scalars: dict[str, float], flush: bool = False) -> None:
        for tracker in list(self.trackers):
            self._each(tracker, lambda t: t.log(step, scalars))
            if flush and tracker in self.trackers:
                self._each(tracker, lambda t: t.flush())

    def _each(self, tracker, call) -> None:
        try:
            call(tracker)
        except Exception as e:  # a dashboard is never worth the run: drop it, say so once, train on
            self.trackers.remove(tracker)
            warn(f"--report-to {tracker.name} failed ({_reason(e)}); training goes on without it")

    def train(self, step: int, loss: float, learning_rate: float, tokens_per_second: float | None) -> None:
        scalars = {"train/loss": loss, "train/learning_rate": learning_rate}
        if tokens_per_second is not None:
            scalars["train/tokens_per_second"] = tokens_per_second
        self._log(step, scalars)

    def eval(self, step: int, loss: float, perplexity: float) -> None:
        # an evaluation is rare and worth seeing at once
        self._log(step, {"eval/loss": loss, "eval/perplexity": perplexity}, flush=True)

    def general(self, step: int, entry: dict) -> None:
        """The general corpus' check (`--general-eval`), before and after training."""
        self._log(step, {"eval_general/loss": entry["general_loss"],
                         "eval_general/perplexity": entry["general_perplexity"]}, flush=True)

    def cloze(self, step: int, entry: dict) -> None:
        """The domain cloze (`--cloze-words`), before and after training."""
        self._log(step, {"eval_cloze/top1": entry["cloze_top1"], "eval_cloze/top3": entry["cloze_top3"]}, flush=True)

    def downstream(self, step: int, entry: dict) -> None:
        """The downstream probe (`--downstream`), before and after training: the mean over its runs."""
        self._log(step, {"eval_downstream/accuracy": entry["accuracy"], "eval_downstream/f1": entry["f1"]},
                  flush=True)

    def embedding(self, step: int, entry: dict) -> None:
        """A sentence encoder's embedding check, before and after training."""
        self._log(step, {"eval_embedding/mrr10": entry["embedding_mrr10"],
                         "eval_embedding/recall1": entry["embedding_recall1"]}, flush=True)

    def final(self, step: int, metrics: dict[str, Any], card: Path) -> None:
        """The run's results: the numbers of metrics.json, and the model card as an artifact."""
        values = final_values(metrics)
        for tracker in list(self.trackers):
            self._each(tracker, lambda t: t.final(step, values, card))

    def close(self) -> None:
        for tracker in list(self.trackers):
            self._each(tracker, lambda t: t.close())
        self.trackers = []


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
