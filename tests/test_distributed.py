"""Two processes under torchrun (gloo, loopback) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compare import RANKS_BOUND, RESUMED_BOUND, assert_same_updates, unmask_one_token, update_difference
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


@pytest.fixture(scope="module")
def no_dropout_model(tiny_model_dir, tmp_path_factory):
    """The tiny model's encoder without dropout and without its head: then one process and two see
    exactly the same computation (the same masks by construction, the same new head from the seed),
    and only the order of floating-point sums differs."""
    from transformers import AutoTokenizer, RobertaForMaskedLM

    folder = tmp_path_factory.mktemp("no-dropout")
    model = RobertaForMaskedLM.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)
    model.roberta.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_token_off(no_dropout_model, eli5_like, tmp_path_factory):
    """The reference's run with one token of its first micro-batch left unmasked: the final weights of the
    smallest real change, which every bound on the order of sums must tell from the reference."""
    from mlmtune.cli import main

    root = tmp_path_factory.mktemp("one-token-off")
    with pytest.MonkeyPatch.context() as mp:
        calls = unmask_one_token(mp)
        assert main(["train", *_common(no_dropout_model, eli5_like, root / "cache"), "--batch-size", "6",
                     "--output-dir", str(root / "run")]) == 0
    assert calls["n"] > 0
    return load_file(str(root / "run" / "model.safetensors"))


def _step6(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))


def _assert_same_updates(one, other, bound: float = RANKS_BOUND) -> dict[str, torch.Tensor]:
    """The run in folder `other` ended where the one-process run in `one` ended, up to the order of fp32 sums (in
    units of what `one`'s steps 6 to 12 moved each tensor); returns `one`'s weights."""
    w1, w2 = (load_file(str(run / "model.safetensors")) for run in (one, other))
    assert w1.keys() == w2.keys()  # full weights, ordinary names
    assert_same_updates(w2, w1, _step6(one), bound)
    return w1


def _common(model, eli5_like, cache) -> list[str]:
    """4 head-only steps, then the whole model, 10 accumulated micro-batches per step, and an epoch's last
    micro-batch of 2 blocks, which leaves rank 1 with none of it on two ranks."""
    return ["--model", str(model), "--dataset", str(eli5_like), "--text-field", "answers.text",
            "--block-size", "32", "--max-steps", "12", "--learning-rate", "1e-2", "--precision", "fp32",
            "--gradient-accumulation-steps", "10", "--head-warmup-steps", "4", "--head-learning-rate", "1e-2",
            "--save-steps", "6", "--cache-dir", str(cache)]


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "mlmtune", "train", *args],
                cwd)


@pytest.fixture(scope="module")
def task(tmp_path_factory, docs_texts) -> list[str]:
    """--downstream flags: a small labelled task (whether a docs paragraph comes before or after the middle of the
    docs), probed linearly on two seeds."""
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    texts = docs_texts[:400:2]
    path.write_text("".join(json.dumps({"text": t[:200], "label": i < len(texts) // 2}) + "\n"
                            for i, t in enumerate(texts)))
    return ["--downstream", str(path), "--downstream-seeds", "2"]


@pytest.fixture(scope="module")
def one_process(no_dropout_model, eli5_like, task, tmp_path_factory):
    """The reference: one process with the whole global batch of 6 blocks (and the downstream probe)."""
    root = tmp_path_factory.mktemp("one-process")
    _run([sys.executable, "-m", "mlmtune", "train", *_common(no_dropout_model, eli5_like, root / "cache"), *task,
          "--batch-size", "6", "--output-dir", str(root / "one")], root)
    return root / "one"


def _same_probe(m1: dict, m2: dict) -> None:
    """The downstream probe of two runs: rank 0 probes the same start, and a final model the same to 1e-4, so at
    most one borderline test text (of each run) may go the other way."""
    assert m2["downstream_runs_before"] == m1["downstream_runs_before"]
    for r1, r2 in zip(m1["downstream_runs_after"], m2["downstream_runs_after"]):
        assert abs(r1["accuracy"] - r2["accuracy"]) <= 1 / m1["downstream_test_examples"] + 1e-12


@pytest.mark.numerics
def test_torchrun_two_processes_match_one_process(no_dropout_model, one_process, one_token_off, eli5_like, task,
                                                    tmp_path):
    """DDP over gloo: the head-only steps run DDP over the head, then DDP is built again for the whole
    model; rank 1's empty share of the epoch's tail runs a block without labels, so that DDP's collectives
    still match."""
    common = _common(no_dropout_model, eli5_like, tmp_path / "cache")
    two = _torchrun([*common, *task, "--batch-size", "3", "--output-dir", str(tmp_path / "two"),
                     "--report-to", "trackio"], tmp_path)
    m1 = json.loads((one_process / "metrics.json").read_text())
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
    w1 = _assert_same_updates(one_process, tmp_path / "two")
    # one token masked otherwise is no order of sums (measured 2.6)
    assert update_difference(one_token_off, w1, _step6(one_process))[0] > 100 * RANKS_BOUND
    _same_probe(m1, m2)  # rank 0 probes, before training and with the full model after it
    # written once, by rank 0
    assert two.stderr.count("Before training:") == 1 and two.stdout.count("model saved in") == 1
    _reported_once(tmp_path / "two", m2)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    # an ordinary model folder: transformers loads from it the weights the run wrote, bit for bit
    from transformers import AutoModelForMaskedLM

    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "two").state_dict()
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert all(torch.equal(loaded[k], w2[k]) for k in w2)


def _reported_once(out, metrics: dict) -> None:
    """Rank 0 alone reported to trackio (the session's TRACKIO_DIR, which torchrun's ranks inherit): one run of the
    job in the store, each step's mean loss over the ranks once, and the final metrics once."""
    from trackio.api import Api
    from trackio.sqlite_storage import SQLiteStorage

    runs = [r for r in Api().runs("mlmtune") if r.name.startswith(f"{out.name}-")]
    assert len(runs) == 1
    logs = SQLiteStorage.get_logs("mlmtune", runs[0].name, run_id=runs[0].id)
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == \
        [(p["step"], p["loss"]) for p in metrics["train_loss"]]
    assert [r["eval_loss_after"] for r in logs if "eval_loss_after" in r] == [metrics["eval_loss_after"]]


@pytest.mark.slow  # ~20 s, three torchrun jobs: the default suite keeps DDP on two processes and the shard digests
@pytest.mark.numerics
def test_fsdp_matches_one_process_and_resumes(no_dropout_model, one_process, eli5_like, task, tmp_path):
    """--fsdp over gloo (FSDP2, one unit per encoder layer, the tied embeddings and head in the root): the
    same updates as one process, ordinary full checkpoints and output, and a sharded run resumed from its
    step-6 checkpoint ends where the uninterrupted one ends."""
    common = [*_common(no_dropout_model, eli5_like, tmp_path / "cache"), *task, "--batch-size", "3", "--fsdp"]
    two = _torchrun([*common, "--output-dir", str(tmp_path / "fsdp")], tmp_path)
    assert "2 processes (FSDP)" in two.stderr
    m1 = json.loads((one_process / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-6)  # evaluated through the shards
    assert m1["eval_loss_after"] < m1["eval_loss_before"] - 0.1
    assert m2["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=1e-4)
    _assert_same_updates(one_process, tmp_path / "fsdp")
    _same_probe(m1, m2)  # rank 0 probed the gathered full model, not its shard
    step6 = tmp_path / "fsdp" / "checkpoints" / "step-0000006"
    # each rank's shards (DCP), nothing gathered; read whole here, they hold the one-process run's tensors, to the
    # same bound on the encoder's first two steps (the new head is not in the start)
    assert not (step6 / "model.safetensors").exists()
    assert sorted(p.name for p in (step6 / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    c1, c2 = _step6(one_process), _dcp_weights(step6 / "dcp", tmp_path / "step6.pt")
    assert c1.keys() <= c2.keys()  # and the tied decoder, which the full files store once
    c2 = {k: c2[k] for k in c1}
    assert all(c1[k].shape == c2[k].shape for k in c1)
    start = {f"roberta.{k}": v for k, v in load_file(str(no_dropout_model / "model.safetensors")).items()}
    assert_same_updates(c2, c1, start, RANKS_BOUND)

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(step6, part / "checkpoints" / step6.name)
    resumed = _torchrun([*common, "--output-dir", str(part), "--resume"], tmp_path)
    assert "Resuming from" in resumed.stderr and "step 6" in resumed.stderr
    w2, w3 = (load_file(str(run / "model.safetensors")) for run in (tmp_path / "fsdp", part))
    # bit for bit: the same sums in the same order; the optimizer's moments came back into the shards too
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    m3 = json.loads((part / "metrics.json").read_text())
    assert m3["eval_loss_after"] == pytest.approx(m2["eval_loss_after"], rel=1e-6)
    assert m3["downstream_runs_before"] == m2["downstream_runs_before"]  # kept in the checkpoint, not probed again
    assert "Before training, downstream" not in resumed.stderr
    # the output is an ordinary Hugging Face folder, written from the gathered weights
    from transformers import AutoModelForMaskedLM

    loaded = AutoModelForMaskedLM.from_pretrained(part).state_dict()
    assert all(torch.equal(loaded[k], w3[k]) for k in w3)


def _dcp_weights(folder, scratch) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's full weights, read in one process by torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)
    return torch.load(scratch, weights_only=True)["model"]


@pytest.mark.slow  # the generic DDP and FSDP paths are the RoBERTa tests above; these add the new families
@pytest.mark.numerics
@pytest.mark.parametrize("family, sharding", [
    ("modernbert_dir", []),
    ("eurobert_dir", []),
    ("modernbert_dir", ["--fsdp"]),
])
def test_todays_encoders_on_two_processes_match_one(request, family, sharding, eli5_like, tmp_path):
    """ModernBERT (global and local attention) and EuroBERT under DDP, and ModernBERT under FSDP: the same updates
    as one process with the whole global batch (their default dropout is 0, so only the order of fp32 sums
    differs)."""
    model = request.getfixturevalue(family)
    common = _common(model, eli5_like, tmp_path / "cache")
    _run([sys.executable, "-m", "mlmtune", "train", *common, "--batch-size", "6", "--output-dir",
          str(tmp_path / "one")], tmp_path)
    _torchrun([*common, *sharding, "--batch-size", "3", "--output-dir", str(tmp_path / "two")], tmp_path)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["rank_weights_disagree"] == []
    # DDP's replicas are bit-identical; FSDP's digests are of each rank's own shards
    assert (m2["rank_weights_sha256"][0] == m2["rank_weights_sha256"][1]) == (not sharding)
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-6)
    assert m1["eval_loss_after"] < m1["eval_loss_before"] - 0.1
    assert m2["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=1e-4)
    _assert_same_updates(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # the DDP and FSDP paths are the tests above; this adds a grown vocabulary and the general check
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]])
def test_added_words_and_the_general_check_on_two_processes_match_one(no_dropout_model, eli5_like, tmp_path,
                                                                       sharding):
    """--add-tokens and --general-eval under DDP and FSDP: the same words, the same grown model, the same general
    perplexity before and after as one process."""
    words = tmp_path / "words.txt"
    words.write_text("interpreter\nidentifier\ncoroutine\n")
    common = [*_common(no_dropout_model, eli5_like, tmp_path / "cache"), "--add-tokens", str(words),
              "--general-eval", "builtin:wikipedia"]
    _run([sys.executable, "-m", "mlmtune", "train", *common, "--batch-size", "6", "--output-dir",
          str(tmp_path / "one")], tmp_path)
    _torchrun([*common, *sharding, "--batch-size", "3", "--output-dir", str(tmp_path / "two")], tmp_path)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["added_tokens"] == m2["added_tokens"] == 3
    assert (tmp_path / "two" / "added_tokens.txt").read_text() == "interpreter\nidentifier\ncoroutine\n"
    for key in ("general_loss_before", "eval_loss_before", "nll_per_word_before"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
    for key in ("general_loss_after", "eval_loss_after", "nll_per_word_after"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4), key
    _assert_same_updates(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # two torchrun jobs and a third that resumes
@pytest.mark.parametrize("to", ["launcher", "every process"])
def test_sigterm_to_torchrun_saves_one_checkpoint_and_resumes_exactly(no_dropout_model, eli5_like, tmp_path, to):
    """SIGTERM to the launcher (a pod eviction), or to every process of the job at once (scancel: each worker then
    hears it twice, from SLURM and from torchrun, milliseconds apart: one request): the ranks agree to stop within
    one step of it, write one checkpoint, leave together without a traceback, and --resume ends on the
    uninterrupted run."""
    import re
    import signal
    import time

    args = ["--model", str(no_dropout_model), "--dataset", str(eli5_like), "--text-field", "answers.text",
            "--block-size", "32", "--max-steps", "1000", "--learning-rate", "1e-2", "--precision", "fp32",
            "--batch-size", "2", "--save-steps", "5000", "--head-warmup-steps", "5",
            "--cache-dir", str(tmp_path / "cache"), "--general-eval", "none"]
    _torchrun([*args, "--output-dir", str(tmp_path / "whole")], tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = tmp_path / "logs"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--master_addr",
         "127.0.0.1", "--master_port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3", "-m",
         "mlmtune", "train", *args, "--output-dir", str(tmp_path / "cut")], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    rank0 = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = list(logs.rglob("0/stderr.log"))
        if found and "head warm-up done" in found[0].read_text():  # step 5 of 1000: mid-run
            rank0 = found[0]
            break
        time.sleep(0.02)
    assert rank0 is not None
    if to == "launcher":
        launcher.send_signal(signal.SIGTERM)
    else:
        os.killpg(launcher.pid, signal.SIGTERM)  # the launcher and both workers, as SLURM signals a job step
    launcher.communicate(timeout=120)
    err0 = rank0.read_text()
    err1 = next(logs.rglob("1/stderr.log")).read_text()
    at = int(re.search(r"SIGTERM at step (\d+): finishing this step", err0).group(1))
    stopped = int(re.search(r"interrupted at step (\d+); checkpoint saved", err0).group(1))
    assert at < stopped <= at + 2 < 1000  # the step in progress, and at most one more to agree
    assert "Traceback" not in err0 and "Traceback" not in err1
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == [f"step-{stopped:07d}"]  # one checkpoint: the one the signal asked for
    _torchrun([*args, "--output-dir", str(tmp_path / "cut"), "--resume"], tmp_path)
    w1 = load_file(str(tmp_path / "whole" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the same sums in the same order: bit for bit


@pytest.mark.slow  # a torchrun job, then one process resuming it
@pytest.mark.numerics
def test_a_two_process_run_resumes_on_one_process_with_the_same_global_batch(no_dropout_model, eli5_like, tmp_path,
                                                                             capsys):
    """2 processes x 3 blocks x 10 accumulation, stopped at step 6, resumed by 1 process x 3 x 20: every step
    trains on the same blocks with the same masks, so it ends on the uninterrupted 2-process run. 1 x 3 x 10 is
    another global batch: refused."""
    from mlmtune.cli import main

    common = _common(no_dropout_model, eli5_like, tmp_path / "cache")
    _torchrun([*common, "--batch-size", "3", "--output-dir", str(tmp_path / "two")], tmp_path)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-0000006", part / "checkpoints" / "step-0000006")
    assert main(["train", *common, "--batch-size", "3", "--gradient-accumulation-steps", "10", "--resume",
                 "--output-dir", str(part)]) == 1
    assert ("was trained with a global batch of 60 blocks (3 per process x 2 processes x 10 accumulation); this run's "
            "is 30 (3 per process x 1 process x 10 accumulation): keep it, e.g. with --gradient-accumulation-steps "
            "20") in capsys.readouterr().err
    _run([sys.executable, "-m", "mlmtune", "train", *common, "--batch-size", "3", "--gradient-accumulation-steps",
          "20", "--resume", "--output-dir", str(part)], tmp_path)
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    w1 = load_file(str(part / "model.safetensors"))
    # the same blocks and masks: only the order of fp32 sums differs (over 2 ranks, or 20 micro-batches in one),
    # from a step whose AdamW moments both runs share
    assert_same_updates(w1, w2, _step6(tmp_path / "two"), RESUMED_BOUND)
    m1, m2 = (json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("two", "part"))
    assert m2["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=1e-6)


def test_a_time_budget_with_fsdp_is_refused_before_any_work(configs, tmp_path, monkeypatch):
    """The budget's probe times an unsharded copy of the model on one device: out of memory for exactly the
    models that need --fsdp. Refused at once (as two ranks would see it)."""
    from mlmtune import distributed
    from mlmtune.errors import MlmtuneError
    from mlmtune.training.torch_engine import TorchEngine

    monkeypatch.setattr(distributed, "init", lambda: distributed.Dist(rank=0, world=2))
    with pytest.raises(MlmtuneError, match=r"^--time-budget with --fsdp: its probe would time an unsharded copy"):
        TorchEngine.open(configs(tmp_path / "run", fsdp=True, time_budget="5m"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two torchrun launchers
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]])  # DDP, and FSDP on a (nodes, ranks per node) mesh: HSDP
def test_two_nodes_with_their_own_caches_match_one_process(no_dropout_model, one_process, eli5_like, tmp_path,
                                                           sharding):
    """Two "nodes" on one machine: two torchrun launchers (--nnodes 2, --node-rank 0 and 1, one process each),
    each with its own block cache (MLMTUNE_CACHE) and one shared --output-dir. Each node's first rank tokenizes
    into its own cache, once; the run makes the updates of one process with the whole global batch."""
    port = _free_port()
    common = [a for a in _common(no_dropout_model, eli5_like, tmp_path / "unused")]
    at = common.index("--cache-dir")
    del common[at : at + 2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--nnodes", "2", "--node-rank",
         str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "mlmtune", "train", *common,
         *sharding, "--batch-size", "3", "--output-dir", str(tmp_path / "run")],
        cwd=tmp_path, env={**env, "MLMTUNE_CACHE": str(tmp_path / f"cache-{node}")}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "is not shared by every rank: the first rank of each node tokenizes" in outs[0][1]
    if sharding:
        assert "2 processes (HSDP: sharded within each of 2 nodes)" in outs[0][1]
    for node in (0, 1):  # built once per node, in the node's own cache
        assert len(list((tmp_path / f"cache-{node}" / "blocks").glob("*/mlmtune_prepared.json"))) == 1
    m1 = json.loads((one_process / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-6)
    _assert_same_updates(one_process, tmp_path / "run")


@pytest.mark.slow  # two more runs; the FSDP path itself is the test above
def test_a_sentence_encoder_under_fsdp_is_checked_and_kept_as_on_one_process(no_dropout_model, eli5_like, tmp_path):
    """Rank 0 checks the embeddings of the full model (as loaded, and gathered at the end) and writes the
    sentence-transformers files: the figures one process gets, and the same modules."""
    from conftest import sentence_folder

    encoder = sentence_folder(no_dropout_model, tmp_path / "encoder")
    common = _common(encoder, eli5_like, tmp_path / "cache")
    _run([sys.executable, "-m", "mlmtune", "train", *common, "--batch-size", "6", "--output-dir",
          str(tmp_path / "one")], tmp_path)
    two = _torchrun([*common, "--batch-size", "3", "--fsdp", "--output-dir", str(tmp_path / "fsdp")], tmp_path)
    assert two.stderr.count("After training, embeddings") == 1  # rank 0 alone
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert m2["embedding_mrr10_before"] == m1["embedding_mrr10_before"]
    assert m1["embedding_mrr10_after"] < m1["embedding_mrr10_before"] - 0.05  # training moved it
    assert m2["embedding_mrr10_after"] == pytest.approx(m1["embedding_mrr10_after"], abs=1e-6)
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (tmp_path / "fsdp" / name).read_bytes() == (encoder / name).read_bytes()


@pytest.mark.parametrize("rank, said", [
    (1, "rank 1 could not reach rank 0 at 127.0.0.1:{port} within 3 s"),
    pytest.param(0, "rank 0 waited 3 s at 127.0.0.1:{port} for the other 1 rank(s)", marks=pytest.mark.slow)])
def test_ranks_started_by_environment_variables_that_cannot_meet_fail_within_the_bound(configs, tmp_path, rank, said):
    """srun-style ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) whose master is not there (or whose other rank
    never comes): one line saying what to check after MLMTUNE_RENDEZVOUS_TIMEOUT, not a silent 30-minute wait."""
    import time

    f, port = configs.flags(tmp_path / "run"), _free_port()
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "MLMTUNE_RENDEZVOUS_TIMEOUT": "3", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "mlmtune", "train", "--model", f["model"], "--dataset", f["dataset"],
                        "--text-field", f["text_field"], "--output-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert time.monotonic() - t0 < 90  # start-up and 3 s, not the collective's 30 minutes
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlmtune: error: {said.format(port=port)} ("), p.stderr
    assert "GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME" in lines[0] and "firewall" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written before the ranks met


@pytest.mark.slow  # two processes
def test_ranks_started_by_environment_variables_meet_and_train(configs, tmp_path):
    """The other side of the bound: two srun-style ranks (no torchrun) meet at rank 0's store and train as one job."""
    f, port = configs.flags(tmp_path / "run"), _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mlmtune", "train", "--model", f["model"], "--dataset", f["dataset"], "--text-field",
         f["text_field"], "--block-size", "32", "--max-steps", "2", "--general-eval", "none", "--precision", "fp32",
         "--cache-dir", f["cache_dir"], "--output-dir", str(tmp_path / "run")],
        env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and all(t > 0 for t in metrics["rank_train_tokens"])


def _digest_worker(rank: int, store: str, out: str) -> None:
    """One of two gloo ranks: for each mesh (none: DDP's replicas; HSDP over two one-rank nodes; FSDP on one node)
    a tiny model sharded on it (FSDP2), rank 1's first local shard nudged or not, and the digests and the disagreeing
    groups written to `out`."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mlmtune import distributed
    from mlmtune.training import sharding

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    d = distributed.Dist(rank=rank, world=2)
    meshes = {"ddp": None, "hsdp": init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")),
              "fsdp": init_device_mesh("cpu", (2,))}
    results = {}
    for name, mesh in meshes.items():
        for perturb in (False, True):
            torch.manual_seed(0)  # the same start on both ranks
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
            if mesh is not None:
                for layer in model:
                    fully_shard(layer, mesh=mesh)
            if perturb and rank == 1:
                with torch.no_grad():
                    w = model[0].weight
                    (w.to_local() if hasattr(w, "to_local") else w)[0, 0] += 1e-3
            digests = sharding.weights_digests(d, model)
            groups = sharding.replica_groups(d, model)
            results[f"{name}-{perturb}"] = {"digests": digests, "groups": groups,
                                            "disagree": sharding.disagreeing(digests, groups)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    tdist.destroy_process_group()


@pytest.mark.slow  # two spawned processes (about 10 s, mostly imports)
def test_the_weight_digest_compares_shards_and_catches_a_perturbed_one(tmp_path):
    """The digest is of each rank's own shards, not of the gathered tensors (which every rank would hash alike):
    a shard nudged on rank 1 is caught wherever another rank must hold the same bytes (DDP's replicas, HSDP's
    nodes), and FSDP's distinct shards on one node are not mistaken for a disagreement."""
    import torch.multiprocessing as mp

    out = tmp_path / "digests.json"
    mp.spawn(_digest_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    r = json.loads(out.read_text())
    for mesh in ("ddp", "hsdp"):  # whole replicas / each node holds every shard: ranks 0 and 1 must agree
        assert r[f"{mesh}-False"]["groups"] == [[0, 1]]
        assert r[f"{mesh}-False"]["digests"][0] == r[f"{mesh}-False"]["digests"][1]
        assert r[f"{mesh}-False"]["disagree"] == []
        assert r[f"{mesh}-True"]["digests"][0] != r[f"{mesh}-True"]["digests"][1]
        assert r[f"{mesh}-True"]["disagree"] == [[0, 1]]
    # FSDP on one node: two different halves of each tensor, nothing that must agree
    assert r["fsdp-False"]["groups"] == [[0], [1]]
    assert r["fsdp-False"]["digests"][0] != r["fsdp-False"]["digests"][1] and r["fsdp-False"]["disagree"] == []
    assert r["fsdp-True"]["digests"][0] == r["fsdp-False"]["digests"][0]  # rank 0's shard is untouched
    assert r["fsdp-True"]["digests"][1] != r["fsdp-False"]["digests"][1]  # rank 1's own shard shows the change


@pytest.mark.slow  # a torchrun job and one process, in bf16
def test_fsdp_in_bf16_gathers_bf16_weights_and_trains_as_one_process(no_dropout_model, eli5_like, tmp_path):
    """--fsdp --precision bf16: the shards are gathered in bf16 and the gradients reduced in fp32 (FSDP2's
    MixedPrecisionPolicy), evaluation runs under the same policy; the run ends where one bf16 process with the whole
    global batch ends, to bf16's rounding, and its fp32 master weights and checkpoints stay fp32."""
    common = [*_common(no_dropout_model, eli5_like, tmp_path / "cache"), "--precision", "bf16"]
    common[common.index("fp32") - 1 : common.index("fp32") + 1] = []  # the first --precision fp32 out
    _run([sys.executable, "-m", "mlmtune", "train", *common, "--batch-size", "6", "--output-dir",
          str(tmp_path / "one")], tmp_path)
    two = _torchrun([*common, "--fsdp", "--batch-size", "3", "--output-dir", str(tmp_path / "two")], tmp_path)
    assert "2 processes (FSDP, bf16 all-gathers, fp32 gradient reduction)" in two.stderr
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["eval_precision"] == m2["eval_precision"] == "bf16"
    assert m1["eval_loss_after"] < m1["eval_loss_before"] - 0.1
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-4)  # 1.3e-6 measured
    assert m2["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=1e-3)  # 1.3e-4; training moved it 0.14
    weights = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


_SLOW_RANK = '''
import json, sys, time
import torch.distributed as dist
from mlmtune.config import TrainConfig
from mlmtune.options import resolve
from mlmtune.training.train import train

flags, pause = json.loads(sys.argv[1]), float(sys.argv[2])

def slow_rank_1(step, seconds):  # a straggler: rank 1 takes `pause` longer over every step
    if pause and dist.get_rank() == 1:
        time.sleep(pause)

train(resolve(TrainConfig, {}, flags), progress=False, on_step=slow_rank_1)
'''


@pytest.mark.slow  # a torchrun job of a 12 s budget and another that resumes it
def test_a_time_budget_on_two_processes_replans_for_the_slowest_rank_and_resumes_exactly(configs, tmp_path):
    """The probe times one device without communication (rank 0, at full speed); rank 1 is 0.3 s slower a step.
    After its first steps the run measures every rank, takes the slowest, and plans again: far fewer steps, which
    fit the budget at the slow rank's pace. A run resumed from a checkpoint after the re-plan keeps its total and
    its schedule: it ends with the uninterrupted run's weights."""
    script = tmp_path / "slow_rank.py"
    script.write_text(_SLOW_RANK)
    flags = configs.flags(tmp_path / "run", max_steps=None, time_budget="12s", save_steps=10, batch_size=3)

    def launch(flags: dict, pause: float) -> subprocess.CompletedProcess:
        return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                     "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), json.dumps(flags),
                     str(pause)], tmp_path)

    run = launch(flags, 0.3)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    plan = m["time_budget_plan"]
    assert plan["replanned_at"] == 5 and "the slowest of 2 processes takes" in run.stderr
    assert plan["measured_step_seconds"] >= 0.3 > 3 * plan["step_seconds"]  # the straggler, not the probe
    steps = m["train_steps"]
    assert 5 < steps < plan["planned_steps"] / 2
    assert (steps - 5) * 0.3 <= 12  # what is left of the budget at the slow rank's pace, at least
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "mlmtune_config.yaml").read_text())["schedule"]["max_steps"] == steps
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000010"
    assert steps > 10
    assert json.loads((checkpoint / "state.json").read_text())["config"]["schedule"]["max_steps"] == steps

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, part / "checkpoints" / checkpoint.name)
    launch({**flags, "output_dir": str(part), "resume": True}, 0.0)  # no straggler now: the plan holds anyway
    m2 = json.loads((part / "metrics.json").read_text())
    assert m2["train_steps"] == steps and m2["time_budget_plan"]["replanned_at"] == 5
    w1, w2 = (load_file(str(r / "model.safetensors")) for r in (tmp_path / "run", part))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


_RECORDING_STREAM = '''
import json, sys
from pathlib import Path
import torch.distributed as dist
from mlmtune.data import stream
from mlmtune.config import TrainConfig
from mlmtune.options import resolve
from mlmtune.training.train import train

flags, log = json.loads(sys.argv[1]), Path(sys.argv[2])
blocks = stream.stream_blocks

def recording(texts, *args, **kwargs):  # the texts this rank's training stream tokenizes, one JSON line each
    def seen():
        with (log / f"rank{dist.get_rank()}.jsonl").open("a") as f:
            for text in texts:
                f.write(json.dumps(text) + "\\n")
                yield text
    return blocks(seen(), *args, **kwargs)

stream.stream_blocks = recording
train(resolve(TrainConfig, {}, flags), progress=False)
'''


@pytest.mark.slow  # two torchrun jobs
def test_a_stream_on_two_processes_tokenizes_each_record_once_and_resumes_exactly(configs, docs_texts, tmp_path):
    """--streaming under torchrun: each rank tokenizes its own records, none of the other's, and together the
    corpus after the held-out records; the run resumed from its step-4 checkpoint ends bit-identical."""
    corpus = tmp_path / "corpus.txt"
    texts = [t.replace("\n", " ") for t in docs_texts[:400] if t.strip()]
    corpus.write_text("\n".join(texts) + "\n")
    script = tmp_path / "recording.py"
    script.write_text(_RECORDING_STREAM)
    flags = configs.flags(tmp_path / "run", dataset=str(corpus), text_field="text", streaming=True, eval_records=60,
                          batch_size=2, max_steps=8, save_steps=4)

    def launch(flags: dict, log) -> subprocess.CompletedProcess:
        log.mkdir()
        return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                     "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), json.dumps(flags),
                     str(log)], tmp_path)

    launch(flags, tmp_path / "log")
    seen = [[json.loads(x) for x in (tmp_path / "log" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])  # no record tokenized by both ranks
    assert sorted(seen[0] + seen[1]) == sorted(texts[60:])  # every training record once (8 steps: one pass)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["train_steps"] == 8 and m["rank_weights_disagree"] == [] and m["eval_loss_after"] < m["eval_loss_before"]

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    step4 = tmp_path / "run" / "checkpoints" / "step-0000004"
    shutil.copytree(step4, part / "checkpoints" / step4.name)
    launch({**flags, "output_dir": str(part), "resume": True}, tmp_path / "log2")
    w1, w2 = (load_file(str(r / "model.safetensors")) for r in (tmp_path / "run", part))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow  # a torchrun job, then two resumes that must fail at once
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_shard_fails_every_rank_at_once(no_dropout_model, eli5_like, tmp_path, damage):
    """Loading shards is a collective: a missing or short shard file is found by every rank before it, and both
    ranks stop with one line, in seconds (the collective timeout is 30 minutes; this run gets 120 s)."""
    import time

    common = [*_common(no_dropout_model, eli5_like, tmp_path / "cache"), "--batch-size", "3", "--fsdp",
              "--max-steps", "6", "--general-eval", "none", "--cloze-words", "none"]
    _torchrun([*common, "--output-dir", str(tmp_path / "run")], tmp_path)
    shard = tmp_path / "run" / "checkpoints" / "step-0000006" / "dcp" / "__1_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = tmp_path / "logs"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--log-dir", str(logs),
                        "--redirects", "3", "-m", "mlmtune", "train", *common, "--output-dir",
                        str(tmp_path / "run"), "--resume"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert p.returncode != 0 and time.monotonic() - t0 < 120
    for rank in (0, 1):
        err = next(logs.rglob(f"{rank}/stderr.log")).read_text()
        assert "Traceback" not in err
        last = [line for line in err.splitlines() if line.startswith("mlmtune: error:")]
        assert len(last) == 1, err[-2000:]
        assert "none of the 1 checkpoints" in last[0]
    err0 = next(logs.rglob("0/stderr.log")).read_text()
    assert f"shard {shard} is {damage}" in err0 and "on rank(s) 0, 1" in err0


@pytest.mark.slow  # two torchrun jobs (one compiles with inductor: ~1 minute on 2 cores)
@pytest.mark.numerics
def test_gradient_checkpointing_and_compile_under_fsdp(no_dropout_model, one_process, eli5_like, tmp_path,
                                                       inductor_agrees):
    """--gradient-checkpointing under DDP and FSDP makes the one-process run's updates (the recomputed layers are
    the same sums); --compile under FSDP, each layer compiled before it is sharded, trains close to it (inductor
    sums in its own order), or where inductor compiles the layers wrong, every rank refuses in one line."""
    common = [*_common(no_dropout_model, eli5_like, tmp_path / "cache"), "--batch-size", "3",
              "--gradient-checkpointing", "--general-eval", "none", "--cloze-words", "none"]
    m1 = json.loads((one_process / "metrics.json").read_text())
    _torchrun([*common, "--output-dir", str(tmp_path / "ddp")], tmp_path)
    _assert_same_updates(one_process, tmp_path / "ddp")
    args = [*common, "--fsdp", "--compile", "--output-dir", str(tmp_path / "fsdp")]
    if not inductor_agrees:
        with pytest.raises(AssertionError, match="--compile: torch.compile's model gives other logits"):
            _torchrun(args, tmp_path)
        assert not (tmp_path / "fsdp" / "model.safetensors").exists()
        return
    compiled = _torchrun(args, tmp_path)
    assert "2 processes (FSDP)" in compiled.stderr
    m2 = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    moved = m1["eval_loss_before"] - m1["eval_loss_after"]
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-6)
    assert abs(m2["eval_loss_after"] - m1["eval_loss_after"]) < 0.05 * moved
    # each rank's own shards: different bytes by design, and no replica group that disagrees
    assert m2["rank_weights_sha256"][0] != m2["rank_weights_sha256"][1] and m2["rank_weights_disagree"] == []
