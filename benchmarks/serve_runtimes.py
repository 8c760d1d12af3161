"""`mlmtune serve` on each runtime: torch fp32, onnx fp32, onnx int8, and the transformers pipeline behind a plain
server, at 1, 8 and 32 concurrent clients; and the int8 graph's top-1 agreement with torch on held-out masks.

    python benchmarks/serve_runtimes.py [--model mlmtune-quickstart] [--requests 300] [--limit-s 60]

The model is `--model` (the quickstart's output: `mlmtune quickstart` writes mlmtune-quickstart/), or without it the
quickstart's MiniLM with its seeded new head, not adapted (`_common.quickstart_model_folder`), exported once with
`mlmtune export --quantize int8`. Each server is a real process on a free 127.0.0.1 port; each
level sends `--requests` POST /fill requests (one text, top 5) or stops at `--limit-s`. Resident memory is the
server's peak (VmHWM) after its last level. The pipeline's server answers each request with
`pipeline("fill-mask")`, one at a time (the pipeline does not batch concurrent requests). Then, in this process:
top-1 agreement of onnx fp32 and int8 with torch fp32 at the masked positions of the quickstart's held-out split
(15% of the word pieces, seed 0), and fill throughput of the head-at-the-masks graph against the stock
full-vocabulary `model.onnx`. Writes benchmarks/results/MACHINE/serve_runtimes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastapi import Request  # at module level: the route's annotation is resolved here (postponed annotations)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quickstart_model_folder, table, write_json  # noqa: E402
from fill_throughput import sentences  # noqa: E402
from serve_load import free_port, load, wait_ready  # noqa: E402

LEVELS = (1, 8, 32)
RUNTIMES = {"torch fp32": ["--runtime", "torch"], "onnx fp32": ["--runtime", "onnx"],
            "onnx int8": ["--runtime", "onnx", "--quantized"], "transformers pipeline": None}


def pipeline_server(model: str, port: int) -> None:
    """The baseline: `pipeline("fill-mask")` behind FastAPI, one request at a time."""
    import threading

    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    fill, lock, app = pipeline("fill-mask", model=model, device="cpu"), threading.Lock(), FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok", "runtime": "transformers pipeline"}

    @app.post("/fill")
    async def answer(request: Request):
        body = await request.json()

        def run():
            with lock:
                out = fill(body["text"], top_k=body.get("top_k", 5))
            return [{**p, "score": float(p["score"])} for p in out]  # numpy floats, made JSON

        return await asyncio.get_running_loop().run_in_executor(None, run)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_server(name: str, folder: Path, texts: list[str], requests: int, limit_s: float) -> list[dict]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    flags = RUNTIMES[name]
    argv = ([sys.executable, "-m", "mlmtune", "serve", "--model", str(folder), "--port", str(port), *flags]
            if flags is not None else [sys.executable, __file__, "--pipeline-server", str(folder), str(port)])
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    rows = []
    try:
        wait_ready(p, port, lambda: (log.seek(0), log.read()[-2000:])[1])
        asyncio.run(load(f"http://127.0.0.1:{port}/fill", texts, 4, 20))  # warm-up
        for clients in LEVELS:
            r = asyncio.run(load(f"http://127.0.0.1:{port}/fill", texts, clients, requests, limit_s))
            rows.append({"runtime": name, "clients": clients, **r})
            print(f"{name}, {clients} clients: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, "
                  f"p99 {r['p99_ms']:.0f} ms, errors {r['errors']}", file=sys.stderr)
        rss = peak_rss_mb(p.pid)
    finally:
        p.terminate()
        p.wait(30)
    for row in rows:
        row["peak_rss_mb"] = rss
    return rows


@torch.inference_mode()
def agreement(folder: Path, n_texts: int = 200) -> dict:
    """Top-1 agreement with torch fp32 at 15% of the word pieces (seed 0) of the quickstart's held-out split."""
    from mlmtune.config import QUICKSTART_DATASET, DataConfig
    from mlmtune.data.text import load_texts
    from mlmtune.model.forward import logits_at_positions
    from mlmtune.model.load import load_model
    from mlmtune.model.onnx_runtime import OnnxMaskedLM

    model, tok = load_model(str(folder))
    held_out = list(load_texts(DataConfig(dataset=QUICKSTART_DATASET), 42)["test"]["text"][:n_texts])
    g = torch.Generator().manual_seed(0)
    runtimes = {"onnx fp32": OnnxMaskedLM.from_folder(folder), "onnx int8": OnnxMaskedLM.from_folder(folder, True)}
    agree = {k: 0 for k in runtimes}
    total = 0
    for start in range(0, len(held_out), 16):
        enc = tok(held_out[start : start + 16], truncation=True, max_length=128, padding=True, return_tensors="pt",
                  return_special_tokens_mask=True)
        chosen = (torch.rand(enc["input_ids"].shape, generator=g) < 0.15) & (enc["special_tokens_mask"] == 0) \
            & enc["attention_mask"].bool()
        ids = enc["input_ids"].masked_fill(chosen, tok.mask_token_id)
        positions = torch.nonzero(chosen.reshape(-1)).squeeze(1)
        reference = logits_at_positions(model, ids, positions, enc["attention_mask"]).argmax(-1)
        for k, runtime in runtimes.items():
            agree[k] += int((runtime.logits_at_positions(ids, positions, enc["attention_mask"]).argmax(-1)
                             == reference).sum())
        total += len(positions)
    return {"texts": len(held_out), "masked_positions": total, **{k: v / total for k, v in agree.items()}}


def graphs(folder: Path, texts: list[str], rounds: int = 3) -> dict:
    """Fill throughput (texts/s, batches of 32) of the head-at-the-masks graph and the full-vocabulary one."""
    from mlmtune.inference.fill import FillMask
    from mlmtune.model.load import load_tokenizer
    from mlmtune.model.onnx_runtime import OnnxMaskedLM

    tok = load_tokenizer(str(folder))
    out = {}
    for quantized in (False, True):
        for graph in ("masked", "full"):
            filler = FillMask(OnnxMaskedLM.from_folder(folder, quantized, graph), tok, batch_size=32, device="cpu")
            filler.fill(texts[:32])
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                filler.fill(texts)
                best = min(best, time.perf_counter() - t0)
            out[f"{graph}{' int8' if quantized else ''}"] = len(texts) / best
    return out


def main() -> None:
    if sys.argv[1:2] == ["--pipeline-server"]:
        pipeline_server(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--limit-s", type=float, default=60)
    parser.add_argument("--model", type=Path, help="a trained model folder (default: the quickstart's start)")
    args = parser.parse_args()

    from mlmtune.inference.onnx_export import export_folder

    folder = Path(tempfile.mkdtemp(prefix="mlmtune-bench-onnx-")) / "model"
    report = export_folder(str(args.model or quickstart_model_folder()), folder, "int8")
    texts = sentences(500)
    rows = [row for name in RUNTIMES for row in run_server(name, folder, texts, args.requests, args.limit_s)]
    agree = agreement(folder)
    graph_speed = graphs(folder, texts[:256])

    print(table(rows, [("runtime", "runtime", ""), ("clients", "clients", "d"), ("requests_per_s", "req/s", ",.1f"),
                       ("p50_ms", "p50 ms", ",.0f"), ("p99_ms", "p99 ms", ",.0f"), ("errors", "errors", "d"),
                       ("peak_rss_mb", "peak RSS MB", ",.0f")]))
    by = {(r["runtime"], r["clients"]): r["requests_per_s"] for r in rows}
    speedup = {c: by[("onnx int8", c)] / by[("torch fp32", c)] for c in LEVELS}
    print(f"onnx int8 / torch fp32 throughput: {', '.join(f'{c} clients {s:.2f}x' for c, s in speedup.items())}")
    print(f"top-1 agreement with torch fp32 on {agree['masked_positions']} held-out masks: onnx fp32 "
          f"{agree['onnx fp32']:.2%}, onnx int8 {agree['onnx int8']:.2%}")
    print(f"fill texts/s by graph: {graph_speed}")
    sizes = report.sizes_mb
    path = write_json("serve_runtimes", {
        "model": (f"{args.model.name}: the quickstart's trained output" if args.model else
                  "builtin:all-minilm-l6-v2 with its seeded new head, not adapted (the quickstart's start)"),
        "requests_per_level": args.requests, "limit_s": args.limit_s, "rows": rows,
        "int8_over_torch_throughput": {str(c): s for c, s in speedup.items()}, "agreement": agree,
        "fill_texts_per_s_by_graph": graph_speed, "graph_sizes_mb": sizes,
        "load_average_1_5_15_min": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
