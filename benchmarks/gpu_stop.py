"""GPU check of the ways a run stops (issue #28): what the CPU tests show with gloo, shown again with CUDA and NCCL.

    python benchmarks/gpu_stop.py            # on a GPU machine (1 GPU: checks A-C; 2 or more: D too), about 2 minutes
    python benchmarks/gpu_stop.py --smoke    # the same on the CPU with gloo (2 processes), to try the script

A. SIGTERM to every process during start-up: exit 1 within 30 s, one `mlmtune: error:` line, the lock released.
B. SIGTERM to every process of a torchrun job mid-run (launcher and workers: each worker hears two, as under
   `scancel`): exit, one "interrupted at step N" line, exactly the checkpoints of step 5 and N, no traceback; the
   same command with --resume then finishes.
C. A rank started by environment variables whose master is not there: exit 1 within the bound (5 s here) and
   start-up, in one line naming GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.
D. (2 GPUs or more, or --smoke) --fsdp with the cloze on: trains and scores the cloze before and after (it runs
   the FSDP root under no_grad).

A tiny random RoBERTa (2 layers, hidden 32) and the Python docs corpus: what is checked is behaviour, not speed.
Writes benchmarks/results/MACHINE/gpu_stop.json (gpu_stop_smoke.json with --smoke); exits 1 if a check failed.
Needs what benchmarks/gpu.py needs (its docstring), with a tokenizer folder passed as --tokenizer offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402
from gpu import make_model_dir, write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **extra}


def _wait_for(path: Path, p: subprocess.Popen, seconds: float = 300) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return path.exists()


def check_start_up(train: list[str], out: Path) -> dict:
    p = subprocess.Popen([sys.executable, "-m", "mlmtune", *train, "--output-dir", str(out)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    locked = _wait_for(out / ".mlmtune-lock", p)
    os.killpg(p.pid, signal.SIGTERM)
    os.killpg(p.pid, signal.SIGTERM)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=300)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    ok = (locked and p.returncode == 1 and "during start-up, before the first step" in last
          and "Traceback" not in err and not (out / ".mlmtune-lock").exists() and time.monotonic() - t0 < 30)
    return {"check": "A start-up signal", "ok": ok, "returncode": p.returncode,
            "seconds_to_exit": time.monotonic() - t0, "last_line": last}


def check_mid_run(train: list[str], out: Path, nproc: int) -> dict:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
              "127.0.0.1", "--master_port", str(_port()), "-m", "mlmtune", *train, "--save-steps", "5",
              "--output-dir", str(out)]
    p = subprocess.Popen(launch, env=_env(GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    saved5 = _wait_for(out / "checkpoints" / "step-0000005", p)
    os.killpg(p.pid, signal.SIGTERM)  # the launcher and every worker, as SLURM signals a job step
    _, err = p.communicate(timeout=600)
    stopped = re.search(r"interrupted at step (\d+); checkpoint saved", err)
    n = int(stopped.group(1)) if stopped else None
    kept = sorted(c.name for c in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    # torchrun's launcher prints its own SignalException's traceback; the workers' must not have one
    worker_traceback = re.search(r'File ".*/mlmtune/', err) is not None
    ok = saved5 and n is not None and kept == sorted({"step-0000005", f"step-{n:07d}"}) and not worker_traceback
    resumed = subprocess.run([*launch[:8], str(_port()), *launch[9:], "--resume"], env=_env(GLOO_SOCKET_IFNAME="lo"),
                             capture_output=True, text=True, timeout=1200)
    ok = ok and resumed.returncode == 0 and (out / "model.safetensors").exists()
    return {"check": "B SIGTERM to every process mid-run, then --resume", "ok": ok, "stopped_at": n,
            "checkpoints": kept, "resume_returncode": resumed.returncode,
            "tail": (err if not ok else "")[-1500:] + (resumed.stderr[-1500:] if resumed.returncode else "")}


def check_rendezvous(train: list[str], out: Path) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "mlmtune", *train, "--output-dir", str(out)], capture_output=True,
                       text=True, timeout=600, env=_env(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2",
                                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()),
                                                        MLMTUNE_RENDEZVOUS_TIMEOUT="5"))
    lines = p.stderr.strip().splitlines()
    ok = (p.returncode == 1 and len(lines) == 1 and "could not reach rank 0" in lines[0]
          and "NCCL_SOCKET_IFNAME" in lines[0])
    return {"check": "C unreachable master", "ok": ok, "seconds": time.monotonic() - t0,
            "stderr": p.stderr[-1500:]}


def check_fsdp_cloze(train: list[str], out: Path, nproc: int) -> dict:
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "mlmtune", *train,
                        "--fsdp", "--cloze-words", "python", "--output-dir", str(out)],
                       env=_env(GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True, timeout=1200)
    m = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    ok = p.returncode == 0 and m.get("cloze_top1_after") is not None and "Traceback" not in p.stderr
    return {"check": "D --fsdp with the cloze", "ok": ok, "cloze_top1_after": m.get("cloze_top1_after"),
            "tail": "" if ok else p.stderr[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="on the CPU with gloo (2 processes)")
    parser.add_argument("--tokenizer", default="builtin:all-minilm-l6-v2")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if not args.smoke and not gpus:
        raise SystemExit("no CUDA GPU here: run with --smoke to try the checks on the CPU")
    nproc = 2 if args.smoke else min(gpus, 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model_dir(tmp / "model", args.tokenizer, smoke=True)
        corpus = write_corpus(tmp / "corpus.jsonl", 2)
        common = ["train", "--model", str(model), "--dataset", str(corpus), "--text-field", "answers.text",
                  "--block-size", "64", "--batch-size", "4", "--general-eval", "none",
                  "--cache-dir", str(tmp / "cache")]
        train = [*common, "--max-steps", "400", "--cloze-words", "none"]
        results = [check_start_up(train, tmp / "a"), check_mid_run(train, tmp / "b", nproc),
                   check_rendezvous(train, tmp / "c")]
        if nproc > 1:
            results.append(check_fsdp_cloze([*common, "--max-steps", "4"], tmp / "d", nproc))
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}", file=sys.stderr)
    write_json("gpu_stop_smoke" if args.smoke else "gpu_stop", {"processes": nproc, "checks": results},
               args.results)
    raise SystemExit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
