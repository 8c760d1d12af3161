"""The three masking schemes on the quickstart's model and data: one run each, same steps, scored on its own masks
and on the token scheme's (the one yardstick for all).

    python benchmarks/schemes.py [--steps 100]

The quickstart's settings (MiniLM with a new head, the Python docs, lr 1e-3, batch 8, 10 warm-up steps) with
`--time-budget none --max-steps STEPS --masking SCHEME`, each run in its own process. Prints a table and writes
benchmarks/results/MACHINE/schemes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child, table, write_json  # noqa: E402


def child(scheme: str, steps: int, out: str) -> dict:
    from mlmtune.config import QUICKSTART_DEFAULTS, TrainConfig
    from mlmtune.options import resolve
    from mlmtune.training.train import train

    cfg = resolve(TrainConfig, QUICKSTART_DEFAULTS, {"time_budget": None, "max_steps": steps, "masking": scheme,
                                                     "output_dir": out})
    m = train(cfg, progress=False).metrics
    keys = ("eval_loss_before", "eval_loss_after", "perplexity_before", "perplexity_after", "train_seconds",
            "head_warmup_steps", "precision")
    out_metrics = {k: m[k] for k in keys}
    out_metrics.update(token_eval_loss_before=m.get("token_eval_loss_before", m["eval_loss_before"]),
                       token_eval_loss_after=m.get("token_eval_loss_after", m["eval_loss_after"]))
    return out_metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.out)))
        return
    work = Path(tempfile.mkdtemp(prefix="mlmtune-schemes-"))
    rows = []
    for scheme in ("token", "whole-word", "span"):
        r = run_child(os.path.abspath(__file__), "--child", scheme, "--steps", str(args.steps), "--out",
                      str(work / scheme))
        rows.append({"scheme": scheme, **r})
        print(f"{scheme}: {r}", file=sys.stderr)
    print(table(rows, [("scheme", "--masking", ""), ("perplexity_before", "own masks: perplexity before", ",.1f"),
                       ("perplexity_after", "after", ",.1f"), ("token_eval_loss_before", "token masks: loss before",
                                                                ".3f"),
                       ("token_eval_loss_after", "after", ".3f"), ("train_seconds", "training s", ".0f")]))
    path = write_json("schemes", {"steps": args.steps, "model": "builtin:all-minilm-l6-v2 (new head)",
                                  "dataset": "builtin:python-docs", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
