"""Two processes under torchrun (gloo, loopback) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


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


@pytest.fixture()
def no_dropout_model(tiny_model_dir, tmp_path):
    """The tiny model without dropout: then one process and two see exactly the same computation
    (the same masks by construction), and only the order of floating-point sums differs."""
    folder = tmp_path / "no-dropout"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_torchrun_two_processes_match_one_process(no_dropout_model, eli5_like, tmp_path):
    common = ["--model", str(no_dropout_model), "--dataset", str(eli5_like), "--text-field", "answers.text",
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
    assert m2["rank_train_tokens"] == [m1["train_tokens"] // 2] * 2
    assert m2["train_steps"] == m1["train_steps"] == 12
    # the replicas are bit-identical at the end: the gradients really were summed over the ranks
    digests = m2["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # same start, same fixed eval masks (sharded over the ranks, summed token-weighted)
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-6)
    assert m2["eval_masked_tokens"] == m1["eval_masked_tokens"]
    # the same masks as one process: the same updates, up to the order of fp32 sums. A rank that
    # trained on its half alone (no gradient sum) lands ~1e-2 away; this is 1e-4.
    assert m1["eval_loss_after"] < m1["eval_loss_before"] - 0.1
    assert m2["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=1e-4)
    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" /
                                                                                     "model.safetensors"))
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst
    # written once, by rank 0
    assert two.stderr.count("Before training:") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(tmp_path / "two")  # an ordinary model folder
    assert torch.equal(AutoModelForMaskedLM.from_pretrained(tmp_path / "two").state_dict()["lm_head.bias"],
                       w2["lm_head.bias"])
