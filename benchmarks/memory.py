"""Peak memory of `mlmtune train` on a >= 200 MB text corpus, against the memory of the model alone.

    python benchmarks/memory.py [--mb 210] [--steps 20]

Writes a `.txt` corpus of `--mb` megabytes (the Python docs, repeated), then runs, each in its
own process: (a) the baseline, loading the quickstart model and taking the same training steps on
random blocks, no corpus at all; (b) `mlmtune train` on the corpus (read, tokenize, group,
train, evaluate on a 0.2% held-out split). The difference is what the corpus costs in memory.
RSS is sampled every 0.2 s from /proc, split into anonymous memory (what the process holds) and
file-backed pages (memory-mapped Arrow files, page cache the kernel can reclaim). Prints a table and
writes benchmarks/results/MACHINE/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, table, write_json  # noqa: E402

BASELINE = """
import sys, torch
from mlmtune.model.forward import masked_nll_sum
from mlmtune.data.masking import Masker
from mlmtune.model.load import load_model
torch.manual_seed(0)
model, tok = load_model("builtin:all-minilm-l6-v2")
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
masker = Masker.from_tokenizer(tok)
for step in range(int(sys.argv[1])):
    x, y = masker(torch.randint(1000, 30000, (16, 128)), torch.Generator().manual_seed(step))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, n = masked_nll_sum(model, x, y)
    (nll / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
"""


def rss_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MB: heap and tensors, and pages of memory-mapped files.

    File-backed pages (the Arrow files mlmtune reads through a memory map) are page cache the
    kernel can drop under pressure; anonymous pages are what the process really holds.
    """
    anon = file = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) / 1024
    except OSError:
        pass
    return anon, file


def run_sampled(cmd: list[str], env: dict) -> dict:
    """Run a command, sampling its RSS; returns peak, the time of the peak and the stderr tail."""
    samples: list[tuple[float, float, float]] = []
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines: list[str] = []

    def read_stderr():
        for line in p.stderr:
            stderr_lines.append(f"{time.perf_counter() - t0:7.1f}s {line.rstrip()}")

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while p.poll() is None:
        samples.append((time.perf_counter() - t0, *rss_mb(p.pid)))
        time.sleep(0.2)
    reader.join(5)
    stdout = p.stdout.read()
    if p.returncode != 0:
        raise RuntimeError("\n".join(stderr_lines[-30:]))
    peak_t, anon, file = max(samples, key=lambda s: s[1] + s[2]) if samples else (0.0, 0.0, 0.0)
    return {"peak_rss_mb": anon + file, "peak_anon_mb": max(s[1] for s in samples), "file_at_peak_mb": file,
            "peak_at_s": peak_t, "seconds": time.perf_counter() - t0, "stdout": stdout,
            "log": [line for line in stderr_lines if "%|" not in line and line.split("s ", 1)[-1].strip()][-12:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=210)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlmtune-memory-"))
    corpus = work / "corpus.txt"
    para = "\n".join(corpus_texts()) + "\n"
    with corpus.open("w") as f:
        written, copy = 0, 0
        while written < args.mb * 1_000_000:
            f.write(para)
            written += len(para.encode())
            copy += 1
    size_mb = corpus.stat().st_size / 1e6
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLMTUNE_CACHE": str(work / "cache"),
           "HF_DATASETS_CACHE": str(work / "hf-cache")}

    base = run_sampled([sys.executable, "-c", BASELINE, str(args.steps)], env)
    run = run_sampled([sys.executable, "-m", "mlmtune", "train", "--model", "builtin:all-minilm-l6-v2",
                       "--dataset", str(corpus), "--test-size", "0.002", "--max-steps", str(args.steps),
                       "--batch-size", "16", "--learning-rate", "1e-4", "--output-dir", str(work / "out")], env)
    metrics = json.loads((work / "out" / "metrics.json").read_text())
    rows = [{"run": "model only: load + same training steps, no corpus", **base},
            {"run": f"mlmtune train on a {size_mb:,.0f} MB .txt corpus", **run}]
    overhead = run["peak_anon_mb"] - base["peak_anon_mb"]
    print(table(rows, [("run", "run", ""), ("peak_rss_mb", "peak RSS MB", ",.0f"),
                       ("peak_anon_mb", "peak anonymous MB", ",.0f"), ("file_at_peak_mb", "mapped files MB", ",.0f"),
                       ("seconds", "seconds", ",.0f")]))
    tokens = metrics["train_blocks"] * 128
    print(f"\ncorpus {size_mb:,.0f} MB, {tokens:,} training tokens in {metrics['train_blocks']:,} blocks; "
          f"the corpus adds {overhead:,.0f} MB of anonymous memory at peak ({overhead / size_mb:.2f} x its size); "
          f"RSS peaks at {run['peak_at_s']:.0f}s of {run['seconds']:.0f}s")
    for r in rows:
        r.pop("log", None)
        r.pop("stdout", None)
    path = write_json("memory", {"corpus_mb": size_mb, "train_tokens": tokens, "rows": rows,
                                 "corpus_anonymous_overhead_mb": overhead})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
