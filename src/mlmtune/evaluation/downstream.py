"""The downstream probe (`probe.py`) where mlmtune's commands use it: `mlmtune probe` over several models side by
side, a training run's probe before and after (`train --downstream`), and the lines, metrics and figures that
report it.
"""

from __future__ import annotations

from typing import Any

import torch

from mlmtune.config import ProbeConfig
from mlmtune.device import resolve_device
from mlmtune.evaluation.probe import probe
from mlmtune.evaluation.task import TaskData
from mlmtune.model.load import load_model
from mlmtune.model.sentence import SentenceEncoder, sentence_encoder
from mlmtune.probe_config import TaskConfig

METHOD_NAMES = {"linear": "linear probe", "finetune": "fine-tuned classifier"}


def run_probe(cfg: ProbeConfig, progress: bool = True) -> dict[str, Any]:
    """`mlmtune probe`: each model's probe on the same task, examples and seeds.

    Returns:
        A dict: task (what was scored, in words), classes, method, seeds and models, each model's probe (`probe`'s
        dict, with its name as `model`).
    """
    device = resolve_device(cfg.device)
    data = TaskData(cfg.probe, cfg.seed)  # read once: every model sees the same examples
    models = []
    for name in cfg.model:
        model, tokenizer = load_model(name)
        models.append({"model": name, **probe(model, tokenizer, data, cfg.probe, cfg.seed, device,
                                                progress=progress, encoder=sentence_encoder(name))})
        del model
    return {"task": data.describe([cfg.seed]), "classes": data.classes, "method": cfg.probe.method,
            "seeds": models[0]["seeds"], "models": models}


def _pm(mean: float, std: float, runs: int) -> str:
    return f"{mean:.1%}" + (f" ± {std:.1%}" if runs > 1 else "")


def format_table(result: dict[str, Any]) -> str:
    """`mlmtune probe`'s table: one row per model, accuracy and macro-F1 as mean ± standard deviation."""
    seeds = result["seeds"]
    runs = len(seeds)
    width = max(len("model"), *(len(m["model"]) for m in result["models"]))
    lines = [f"task: {result['task']}",
             f"{METHOD_NAMES[result['method']]}, {runs} run{'s' if runs > 1 else ''} (seed{'s' if runs > 1 else ''} "
             f"{', '.join(map(str, seeds))}); mean ± standard deviation over the runs" if runs > 1 else
             f"{METHOD_NAMES[result['method']]}, one run (deterministic on the task's own split, seed {seeds[0]})",
             "",
             f"{'model':<{width}}  {'accuracy':>16}  {'macro-F1':>16}"]
    for m in result["models"]:
        lines.append(f"{m['model']:<{width}}  {_pm(m['accuracy'], m['accuracy_std'], runs):>16}  "
                     f"{_pm(m['f1'], m['f1_std'], runs):>16}")
    return "\n".join(lines)


class RunProbe:
    """A training run's probe: the task read once (rank 0), scored with the model as loaded and as trained."""

    def __init__(self, cfg: TaskConfig, seed: int, device: torch.device, encoder: SentenceEncoder | None = None):
        self.cfg, self.seed, self.device = cfg, seed, device
        self.encoder = encoder  # a sentence encoder: the linear probe reads its own sentence embedding
        self.data = TaskData(cfg, seed)

    def describe(self) -> str:
        pooled = self.cfg.method == "linear" and self.encoder is not None and self.encoder.problem is None
        on = f" on its sentence embedding ({self.encoder.describe()})" if pooled else ""
        return (f"Downstream: {self.data.describe([self.seed])}; a {METHOD_NAMES[self.cfg.method]}{on}, "
                f"scored before and after training")

    def __call__(self, model, tokenizer) -> dict[str, Any]:
        """The probe of `model` (left where it was), in fp32 as every evaluation of a run."""
        return {"downstream": self.cfg.task, **probe(model, tokenizer, self.data, self.cfg, self.seed, self.device,
                                                     encoder=self.encoder)}


def downstream_line(when: str, entry: dict[str, Any]) -> str:
    runs = len(entry["runs"])
    return (f"{when}, downstream ({entry['downstream']}, {METHOD_NAMES[entry['method']]}, {runs} run"
            f"{'s' if runs > 1 else ''}): accuracy {_pm(entry['accuracy'], entry['accuracy_std'], runs)}, "
            f"macro-F1 {_pm(entry['f1'], entry['f1_std'], runs)}")


def eval_keys(entry: dict[str, Any]) -> dict[str, Any]:
    """`mlmtune eval --downstream`'s keys: the run's `downstream_*_after` figures, without the suffix."""
    return {"downstream": entry["downstream"], "downstream_method": entry["method"],
            "downstream_seeds": entry["seeds"], "downstream_classes": entry["classes"],
            "downstream_train_examples": entry["train_examples"], "downstream_test_examples": entry["test_examples"],
            **{f"downstream_{k}": entry[k] for k in ("accuracy", "accuracy_std", "f1", "f1_std", "runs")}}


def downstream_metrics(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The probe before and after training, and what it scored."""
    some = after or before
    if some is None:
        return {}
    out = {"downstream": some["downstream"], "downstream_method": some["method"],
           "downstream_seeds": some["seeds"], "downstream_classes": some["classes"],
           "downstream_train_examples": some["train_examples"], "downstream_test_examples": some["test_examples"]}
    for when, e in (("before", before), ("after", after)):
        for key in ("accuracy", "accuracy_std", "f1", "f1_std"):
            out[f"downstream_{key}_{when}"] = e[key] if e else None
        out[f"downstream_runs_{when}"] = e["runs"] if e else None
    return out


def summary_line(m: dict[str, Any]) -> str | None:
    """The run's last line on the probe: accuracy and macro-F1 before -> after, with the spread over the runs."""
    if m.get("downstream_accuracy_before") is None or m.get("downstream_accuracy_after") is None:
        return None
    runs = len(m["downstream_seeds"])
    spread = f", mean ± sd of {runs} runs" if runs > 1 else ""
    return (f"downstream ({m['downstream']}, {METHOD_NAMES[m['downstream_method']]}{spread}): accuracy "
            f"{_pm(m['downstream_accuracy_before'], m['downstream_accuracy_std_before'], runs)} -> "
            f"{_pm(m['downstream_accuracy_after'], m['downstream_accuracy_std_after'], runs)}, macro-F1 "
            f"{_pm(m['downstream_f1_before'], m['downstream_f1_std_before'], runs)} -> "
            f"{_pm(m['downstream_f1_after'], m['downstream_f1_std_after'], runs)}")
