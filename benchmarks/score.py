"""Scoring speed: `mlmtune score` against a plain loop that masks one position at a time with transformers, on the
same model and texts, in one run.

    python benchmarks/score.py [--n 100]

The quickstart's MiniLM folder (its new head seeded), `--n` Python-docs sentences of 8 to 40 words. The
baseline is what people write by hand (and what minicons does one text at a time): for each token, a copy
with that token masked, one forward pass per copy through `AutoModelForMaskedLM`, the full vocabulary
projection at every position. mlmtune batches every copy of every text into padded passes with the head at
the scored positions only. Both compute the `original` PLL; their totals must agree. Prints a table and
writes benchmarks/results/MACHINE/score.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, quickstart_model_folder, table, write_json  # noqa: E402


def plain_loop(model, tokenizer, texts: list[str]) -> list[float]:
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            special = set(tokenizer.all_special_ids)
            total = 0.0
            for j, t in enumerate(ids):
                if t in special:
                    continue
                masked = list(ids)
                masked[j] = tokenizer.mask_token_id
                total += float(model(input_ids=torch.tensor([masked])).logits[0, j].log_softmax(-1)[t])
            out.append(total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmtune.inference.scoring import Scorer

    folder = quickstart_model_folder()
    texts = [t for t in corpus_texts() if 8 <= len(t.split()) <= 40][: args.n]
    model, tok = AutoModelForMaskedLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    scorer = Scorer.from_pretrained(str(folder), batch_size=64, device="cpu")
    tokens = sum(len(tok(t)["input_ids"]) - 2 for t in texts)
    rows, results = [], {}
    for name, fn in (("plain loop: one masked copy per forward pass (transformers)", lambda: plain_loop(model, tok,
                                                                                                      texts)),
                     ("mlmtune score (copies batched, head at the scored positions)",
                      lambda: [r.pll for r in scorer.score(texts, metric="original")])):
        fn() if "mlmtune" in name else plain_loop(model, tok, texts[:2])  # warm-up
        t0 = time.perf_counter()
        results[name] = fn()
        seconds = time.perf_counter() - t0
        rows.append({"method": name, "seconds": seconds, "texts_per_s": len(texts) / seconds,
                     "tokens_per_s": tokens / seconds})
    for r in rows:
        r["vs_loop"] = r["texts_per_s"] / rows[0]["texts_per_s"]
    a, b = results.values()
    worst = max(abs(x - y) for x, y in zip(a, b))
    print(table(rows, [("method", "method", ""), ("seconds", "seconds", ".2f"), ("texts_per_s", "texts/s", ",.1f"),
                       ("tokens_per_s", "scored tokens/s", ",.0f"), ("vs_loop", "x loop", ".1f")]))
    print(f"\n{len(texts)} texts, {tokens:,} scored tokens; largest PLL difference between the two: {worst:.1e}")
    path = write_json("score", {"texts": len(texts), "tokens": tokens, "rows": rows, "max_pll_diff": worst})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
