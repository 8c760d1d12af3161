"""Scaling: training tokens/s with 1 and 2 processes (torchrun, gloo) on this machine.

    python benchmarks/scaling.py [--steps 30]

The quickstart model (MiniLM) on the built-in corpus, the same global batch (16 x 128) and
steps; 1 process with all cores, then 2 processes with one thread each. On a 2-core machine
this measures the cost of the gradient all-reduce rather than a speed-up: report it as it is.
On a machine with GPUs, run `torchrun --nproc_per_node N -m mlmtune train ...` by hand.
Prints a table and writes benchmarks/results/MACHINE/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlmtune-scaling-"))
    common = ["--model", "builtin:all-minilm-l6-v2", "--dataset", "builtin:python-docs", "--max-steps",
              str(args.steps), "--learning-rate", "2e-4", "--save-steps", "100000", "--cache-dir", str(work / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    rows = []
    for procs in (1, 2):
        out = work / f"out{procs}"
        launcher = [sys.executable, "-m", "mlmtune"] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mlmtune"]
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs))}
        p = subprocess.run([*launcher, "train", *common, "--batch-size", str(16 // procs), "--output-dir", str(out)],
                           env={**env, **threads}, capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"processes": procs, "threads_each": int(threads["OMP_NUM_THREADS"]),
                     "tokens_per_s": m["train_tokens_per_second"], "eval_loss_after": m["eval_loss_after"],
                     "precision": m["precision"]})
        print(rows[-1], file=sys.stderr)
    for r in rows:
        r["vs_one"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(table(rows, [("processes", "processes", "d"), ("threads_each", "threads each", "d"),
                       ("tokens_per_s", "tokens/s", ",.0f"), ("vs_one", "x 1 process", ".2f"),
                       ("eval_loss_after", f"eval loss after {args.steps} steps", ".4f")]))
    path = write_json("scaling", {"steps": args.steps, "global_batch": 16, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
