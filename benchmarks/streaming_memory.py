"""Memory of the data path: `--streaming` against the prepared (cached) path, as the corpus grows.

    python benchmarks/streaming_memory.py [--sizes 25 50 100]

For each corpus size (MB of `.txt`, the Python docs repeated), two child processes read the
whole corpus into blocks with the quickstart tokenizer: the streaming path
(`mlmtune.data.stream.BlockStream`: records -> texts -> blocks on the fly, every block of one pass) and
the non-streaming path (`prepare_blocks`: Arrow files, tokenized, grouped and cached). Peak RSS
(anonymous, and file-backed pages of memory-mapped files) is sampled from /proc. Streaming must
stay flat as the corpus grows. Prints a table and writes benchmarks/results/MACHINE/streaming_memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, table, write_json  # noqa: E402
from memory import run_sampled  # noqa: E402

CHILD = """
import sys
from mlmtune.config import DataConfig
from mlmtune.model.load import load_tokenizer
tok = load_tokenizer("builtin:all-minilm-l6-v2")
mode, corpus, cache = sys.argv[1:4]
if mode == "stream":
    from mlmtune.data.stream import BlockStream
    data = DataConfig(dataset=corpus, streaming=True, eval_records=0)
    stream = BlockStream(data, tok, seed=0, batch_size=16, buffer_size=1000)
    n = 0
    for ids, _ in stream.batches():
        n += len(ids)
        if n >= int(sys.argv[4]):  # one full pass over the corpus
            break
    print(n)
else:
    from mlmtune.data.prepare import prepare_blocks
    blocks, stats = prepare_blocks(DataConfig(dataset=corpus, test_size=0, cache_dir=cache), tok, 0)
    print(stats.blocks["train"])
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlmtune-stream-mem-"))
    para = "\n".join(corpus_texts()) + "\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf")}
    rows = []
    for mb in args.sizes:
        corpus = work / f"corpus-{mb}mb.txt"
        with corpus.open("w") as f:
            written = 0
            while written < mb * 1_000_000:
                f.write(para)
                written += len(para.encode())
        # the prepared path first: it tells how many blocks one full pass of the stream holds
        prepared = run_sampled([sys.executable, "-c", CHILD, "prepare", str(corpus), str(work / f"c{mb}")], env)
        n_blocks = int(prepared["stdout"].strip().splitlines()[-1])
        streamed = run_sampled([sys.executable, "-c", CHILD, "stream", str(corpus), "-", str(n_blocks)], env)
        for name, r in (("prepared (Arrow, cached)", prepared), ("--streaming", streamed)):
            rows.append({"corpus_mb": mb, "path": name, "blocks": n_blocks, "peak_rss_mb": r["peak_rss_mb"],
                         "peak_anon_mb": r["peak_anon_mb"], "seconds": r["seconds"]})
        print(rows[-2], rows[-1], file=sys.stderr)
    print(table(rows, [("corpus_mb", "corpus MB", "d"), ("path", "path", ""), ("blocks", "blocks", ",d"),
                       ("peak_rss_mb", "peak RSS MB", ",.0f"), ("peak_anon_mb", "peak anonymous MB", ",.0f"),
                       ("seconds", "seconds", ",.0f")]))
    path = write_json("streaming_memory", {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
