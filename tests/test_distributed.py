"""Two processes under torchrun (gloo, loopback) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_torchrun_two_processes_match_one_process(tiny_model_dir, eli5_like, tmp_path):
    common = ["--model", str(tiny_model_dir), "--dataset", str(eli5_like), "--text-field", "answers.text",
              "--block-size", "32", "--max-steps", "12", "--learning-rate", "1e-2", "--precision", "fp32",
              "--save-steps", "6", "--cache-dir", str(tmp_path / "cache")]
    _run([sys.executable, "-m", "mlmtune", "train", *common, "--batch-size", "8",
          "--output-dir", str(tmp_path / "one")], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                "-m", "mlmtune", "train", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")],
               tmp_path)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())

    # both ranks took part, each on its half of every global batch
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert all(t > 0 for t in m2["rank_train_tokens"]) and sum(m2["rank_train_tokens"]) == m1["train_tokens"]
    assert m2["train_steps"] == m1["train_steps"] == 12
    # same start, same fixed eval masks (sharded over the ranks, summed token-weighted)
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-6)
    assert m2["eval_masked_tokens"] == m1["eval_masked_tokens"]
    # a model trained enough to move ends within a few percent (the ranks draw their own masks)
    assert m1["eval_loss_after"] < m1["eval_loss_before"] - 0.1
    assert m2["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=0.03)
    # written once, by rank 0
    assert two.stderr.count("Before training:") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(tmp_path / "two")  # an ordinary model folder
