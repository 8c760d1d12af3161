"""mlmtune: masked-language-model fine-tuning, perplexity and fill-mask, offline-first.

The sub-packages follow the data's way: `data` (text -> tokens -> blocks -> masked batches), `model` (loading,
model -> logits -> loss), `inference` (logits -> predictions: fill, scoring, the ONNX export), `evaluation` (the
measurements and `mlmtune eval`), `training` (one run, with an engine: `training.torch_engine`, `keras.engine`),
`serving` (over HTTP). The config schema (`config.py` and its groups), the errors, the Hub, devices, ranks and the
folder lock sit at the top beside `cli`, which drives them from the shell; docs/development.md maps every module.

The Python API, imported on first use (each brings torch and transformers, which `mlmtune --help` must not wait for):

    from mlmtune import TrainConfig, train, FillMask, score, EvalConfig, run_eval, MlmtuneError
"""

import importlib

__version__ = "0.1.0"

_API = {"train": "mlmtune.training.train", "TrainResult": "mlmtune.training.output",
        "TrainConfig": "mlmtune.config", "DataConfig": "mlmtune.config", "EvalConfig": "mlmtune.config",
        **dict.fromkeys(["MeasureConfig", "ScheduleConfig", "OptimConfig", "ComputeConfig", "OutputConfig"],
                        "mlmtune.config_groups"),
        "FillMask": "mlmtune.inference.fill", "score": "mlmtune.inference.scoring",
        "run_eval": "mlmtune.evaluation.evaluate", "MlmtuneError": "mlmtune.errors"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mlmtune' has no attribute {name!r}")
