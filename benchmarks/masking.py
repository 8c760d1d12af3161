"""Masking speed: the time to mask one 64 x 128 micro-batch in each scheme, against the token scheme (the guide's
DataCollatorForLanguageModeling rule), in one run.

    python benchmarks/masking.py [--repeat 50]

The quickstart's tokenizer on the Python docs, cut into blocks of 128 with their word starts; each scheme masks
the same micro-batches `--repeat` times (one generator per batch, as training draws them). Masking runs in the
prefetch thread, off the training step's path; this says how much of a step's time it would take if it did not.
Prints a table and writes benchmarks/results/MACHINE/masking.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, table, write_json  # noqa: E402

ROWS, BLOCK = 64, 128


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    from datasets import Dataset, DatasetDict

    from mlmtune.data.blocks import Blocks, build_blocks
    from mlmtune.data.masking import SCHEMES, Masker
    from mlmtune.model.load import load_tokenizer

    torch.set_num_threads(1)  # as in the prefetch thread, beside the training step
    tok = load_tokenizer("builtin:all-minilm-l6-v2")
    blocks, _ = build_blocks(DatasetDict(train=Dataset.from_dict({"text": corpus_texts()})), tok, BLOCK)
    blocks = Blocks(blocks["train"])
    batches = [torch.arange(i * ROWS, (i + 1) * ROWS) % len(blocks) for i in range(args.repeat)]
    batches = [(blocks[rows], blocks.word_starts(rows)) for rows in batches]
    rows = []
    for scheme in SCHEMES:
        masker = Masker.from_tokenizer(tok, 0.15, scheme)
        times, share = [], []
        for i, (ids, starts) in enumerate(batches):
            t0 = time.perf_counter()
            _, labels = masker(ids, torch.Generator().manual_seed(i), starts)
            times.append(time.perf_counter() - t0)
            share.append(float((labels != -100).float().mean()))
        times.sort()
        rows.append({"scheme": scheme, "ms_per_batch": 1000 * times[len(times) // 2],
                     "chosen_share": sum(share) / len(share)})
    base = rows[0]["ms_per_batch"]
    for r in rows:
        r["vs_token"] = r["ms_per_batch"] / base
    print(table(rows, [("scheme", "scheme", ""), ("ms_per_batch", f"ms per {ROWS} x {BLOCK} batch (median)", ".2f"),
                       ("vs_token", "x token", ".1f"), ("chosen_share", "tokens chosen", ".1%")]))
    path = write_json("masking", {"rows_per_batch": ROWS, "block": BLOCK, "batches": args.repeat, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
