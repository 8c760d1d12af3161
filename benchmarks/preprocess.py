"""Preprocessing: tokenize + group a >= 1M-token corpus, the guide's functions against mlmtune's.

    python benchmarks/preprocess.py [--repeat 9]

The corpus is the built-in Python docs repeated `--repeat` times, as ELI5-shaped records (text in
a nested `answers.text` list). The guide: `flatten()`, its `preprocess_function` and its
`sum`-based `group_texts`, each a batched `map` with num_proc=4, as written. mlmtune: the same
stages through `mlmtune.data.text.select_text` and `mlmtune.data.blocks` (tokenize, group_blocks). Both use the
quickstart's fast WordPiece tokenizer and block size 128. Prints a table and writes
benchmarks/results/MACHINE/preprocess.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, table, write_json  # noqa: E402
from _guide import make_group_texts, make_preprocess_function  # noqa: E402

BLOCK = 128


def guide(records, tokenizer) -> dict:
    t0 = time.perf_counter()
    eli5 = records.flatten()

    preprocess_function = make_preprocess_function(tokenizer)

    tokenized = eli5.map(preprocess_function, batched=True, num_proc=4, remove_columns=eli5.column_names)
    t1 = time.perf_counter()
    block_size = BLOCK

    group_texts = make_group_texts(block_size)

    lm = tokenized.map(group_texts, batched=True, num_proc=4)
    t2 = time.perf_counter()
    tokens = sum(len(x) for x in tokenized["input_ids"])
    return {"tokenize_s": t1 - t0, "group_s": t2 - t1, "tokens": tokens, "blocks": len(lm),
            "dropped": tokens - BLOCK * len(lm)}


def mlmtune(records, tokenizer) -> dict:
    from mlmtune.data.blocks import group_blocks, tokenize
    from mlmtune.data.text import select_text

    t0 = time.perf_counter()
    tokenized = tokenize(select_text(records, "answers.text"), tokenizer)
    t1 = time.perf_counter()
    blocks, dropped = group_blocks(tokenized, BLOCK)
    t2 = time.perf_counter()
    return {"tokenize_s": t1 - t0, "group_s": t2 - t1, "tokens": len(blocks) * BLOCK + dropped,
            "blocks": len(blocks), "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()

    from datasets import Dataset, disable_caching

    from mlmtune.model.load import load_tokenizer

    disable_caching()  # both sides compute, neither reads the other's cache
    tokenizer = load_tokenizer("builtin:all-minilm-l6-v2")
    texts = corpus_texts(args.repeat)
    records = Dataset.from_dict({"answers": [{"text": [t]} for t in texts]})
    rows = []
    for name, fn in (("guide (num_proc=4, sum-based group_texts)", guide), ("mlmtune", mlmtune)):
        r = fn(records, tokenizer)
        rows.append({"pipeline": name, **r, "total_s": r["tokenize_s"] + r["group_s"]})
        print(f"{name}: {r}", file=sys.stderr)
    g, m = rows
    speedup = {"tokenize": g["tokenize_s"] / m["tokenize_s"], "group": g["group_s"] / m["group_s"],
               "total": g["total_s"] / m["total_s"]}
    print(table(rows, [("pipeline", "pipeline", ""), ("tokens", "tokens", ",d"), ("tokenize_s", "tokenize s", ".2f"),
                       ("group_s", "group s", ".3f"), ("total_s", "total s", ".2f"), ("blocks", "blocks", ",d"),
                       ("dropped", "tokens dropped", ",d")]))
    print(f"\nspeed-up: tokenize {speedup['tokenize']:.1f}x, group {speedup['group']:.1f}x, "
          f"total {speedup['total']:.1f}x")
    path = write_json("preprocess", {"texts": len(texts), "block": BLOCK, "rows": rows, "speedup": speedup})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
