"""benchmarks/gpu.py --smoke: the GPU benchmark's every path (Trainer variants, mlmtune, fill against the
pipeline) on a tiny model, on whatever device is here, so that the script cannot rot between GPU runs.
Slow (half a minute of child processes): CI runs it with the other slow tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--results", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert result["machine"]["cpu_class"] and result["machine"]["date"]  # every figure names its machine
    assert [r["variant"] for r in result["rows"]] == ["Trainer fp32 (the guide as written)", "Trainer bf16=True",
                                                      "mlmtune", "mlmtune --gradient-checkpointing",
                                                      "mlmtune --attn-implementation eager"]
    # the GPU checks ran (on a CPU: the variants train alike, no MFU, fill's auto precision is fp32) and passed
    assert result["checks"] and all(result["checks"].values())
    assert "batch 2: mlmtune --gradient-checkpointing trains the steps of mlmtune" in result["checks"]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    # both sides timed alike, on full batches only, with the block size given to both
    assert result["block"] == 128 and result["timing"].startswith("median interval between step ends")
    assert all(0 < r["epoch_fraction"] < 1 for r in result["rows"])
    fill = result["fill"]
    assert fill["identical_top5"] == fill["texts"] == 20  # mlmtune's fill gives the pipeline's top-5
    e = result["evaluation"]  # both evaluation precisions scored the same masks
    assert e["blocks"] == 8 and e["masked_tokens"] > 0 and e["loss_rel_diff"] < 0.05


@pytest.mark.slow  # two minutes of child processes: torchrun jobs, a resume
def test_gpu_stop_check_smoke(tmp_path):
    """benchmarks/gpu_stop.py --smoke: the GPU check of the ways a run stops, run with gloo on the CPU, passes every
    check (start-up signal, SIGTERM to every process mid-run and resume, unreachable master, --fsdp with the cloze)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_stop.py"), "--smoke", "--results",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    result = json.loads((tmp_path / "gpu_stop_smoke.json").read_text())
    assert [c["check"][0] for c in result["checks"]] == ["A", "B", "C", "D"]
    assert p.returncode == 0 and all(c["ok"] for c in result["checks"]), json.dumps(result["checks"])[-3000:]
