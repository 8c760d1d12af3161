"""One training run: `train()`'s lifecycle (`train.py`) and what it works with (`run.py`), the engines
(`engine.py`, `torch_engine.py`; Keras in `mlmtune.keras`), the step loop (`loop.py`), the batches fed ahead
(`feed.py`), steps and learning rates (`schedule.py`, `budget.py`), checkpoints (`checkpoint.py`) and --resume
(`resume.py`), stopping on signals (`stopping.py`),
FSDP (`sharding.py`), speed (`throughput.py`), trackers (`dashboard.py`, `trackers.py`), the grown vocabulary
(`vocab.py`), the checks before a run (`preflight.py`, `check.py`) and the output folder (`output.py`, `card.py`)."""
