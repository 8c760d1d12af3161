"""Fill-mask throughput: 1000 sentences through mlmtune's FillMask against pipeline("fill-mask").

    python benchmarks/fill_throughput.py [--n 1000]

The same model folder (the quickstart's MiniLM with its seeded new head) for both; the
sentences are Python-docs sentences with one word masked. Baselines: the pipeline as users call
it (a list of texts, batch size 1) and the pipeline with batch_size=32. Checks that the top-k
tokens are identical for every sentence and reports the largest score difference. Prints a
table and writes benchmarks/results/MACHINE/fill_throughput.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, quickstart_model_folder, table, write_json  # noqa: E402


def sentences(n: int) -> list[str]:
    out = []
    for para in corpus_texts():
        for s in re.split(r"(?<=\.)\s+", para):
            words = s.split()
            if 8 <= len(words) <= 40 and all(w.isascii() for w in words):
                words[len(words) // 2] = "[MASK]"
                out.append(" ".join(words))
                if len(out) == n:
                    return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()

    from transformers import pipeline

    from mlmtune.inference.fill import FillMask

    folder = quickstart_model_folder()
    texts = sentences(args.n)

    pipe = pipeline("fill-mask", model=str(folder), device="cpu")
    filler = FillMask.from_pretrained(str(folder), batch_size=32)
    pipe(texts[:8], top_k=args.top_k)  # warm-up, both
    filler.fill(texts[:8], top_k=args.top_k)

    results, rows = {}, []
    for name, call in (
        ("pipeline('fill-mask') (batch 1)", lambda: pipe(texts, top_k=args.top_k)),
        ("pipeline('fill-mask', batch_size=32)", lambda: pipe(texts, top_k=args.top_k, batch_size=32)),
        ("mlmtune FillMask (batch 32, sparse head)", lambda: filler.fill(texts, top_k=args.top_k)),
    ):
        t = time.perf_counter()
        results[name] = call()
        seconds = time.perf_counter() - t
        rows.append({"method": name, "seconds": seconds, "texts_per_s": len(texts) / seconds})
        print(f"{name}: {seconds:.2f}s", file=sys.stderr)
    for r in rows:
        r["vs_pipeline"] = r["texts_per_s"] / rows[0]["texts_per_s"]

    ref, ours = results[rows[0]["method"]], results[rows[2]["method"]]
    mismatches = sum([p["token"] for p in a] != [p["token"] for p in b] for a, b in zip(ours, ref))
    max_diff = max(abs(p["score"] - q["score"]) for a, b in zip(ours, ref) for p, q in zip(a, b))
    print(table(rows, [("method", "method", ""), ("seconds", "seconds", ".2f"), ("texts_per_s", "texts/s", ",.0f"),
                       ("vs_pipeline", "x pipeline", ".1f")]))
    print(f"\n{len(texts)} sentences, top-{args.top_k}: {mismatches} with a different top-k token list; "
          f"largest score difference {max_diff:.2e}")
    path = write_json("fill_throughput", {"n": len(texts), "top_k": args.top_k, "rows": rows,
                                          "topk_mismatches": mismatches, "max_score_diff": max_diff})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
