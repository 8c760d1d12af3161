"""Two processes under torchrun (gloo, loopback) against one process with the same global batch."""

from __future__ import annotations

import json
import os
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
    """The tiny model's encoder without dropout and without its head: then one process and two see
    exactly the same computation (the same masks by construction, the same new head from the seed),
    and only the order of floating-point sums differs."""
    from transformers import AutoTokenizer, RobertaForMaskedLM

    folder = tmp_path / "no-dropout"
    model = RobertaForMaskedLM.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)
    model.roberta.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_torchrun_two_processes_match_one_process(no_dropout_model, eli5_like, tmp_path):
    """DDP over gloo: 4 head-only steps (DDP over the head), then the whole model (DDP built again),
    10 accumulated micro-batches per step, and an epoch's last micro-batch of 2 blocks, which leaves
    rank 1 with none of it (it runs a block without labels, so that DDP's collectives still match)."""
    common = ["--model", str(no_dropout_model), "--dataset", str(eli5_like), "--text-field", "answers.text",
              "--block-size", "32", "--max-steps", "12", "--learning-rate", "1e-2", "--precision", "fp32",
              "--gradient-accumulation-steps", "10", "--head-warmup-steps", "4", "--head-learning-rate", "1e-2",
              "--save-steps", "6", "--cache-dir", str(tmp_path / "cache")]
    _run([sys.executable, "-m", "mlmtune", "train", *common, "--batch-size", "6",
          "--output-dir", str(tmp_path / "one")], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                "-m", "mlmtune", "train", *common, "--batch-size", "3", "--output-dir", str(tmp_path / "two")],
               tmp_path)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())

    # both ranks took part, each on its half of every global batch; the 2-block tail went to rank 0
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m1["train_blocks"] % 6 == 2 and m1["train_tokens"] == m1["train_blocks"] * 32  # the epoch, tail included
    assert sum(m2["rank_train_tokens"]) == m1["train_tokens"]
    assert m2["rank_train_tokens"][0] - m2["rank_train_tokens"][1] == 2 * 32
    assert m2["train_steps"] == m1["train_steps"] == 12 and m2["head_warmup_steps"] == 4
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
