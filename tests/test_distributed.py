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
    # a full checkpoint, not a shard: the one-process run's tensors, to the same bound on the encoder's first two
    # steps (the new head is not in the start)
    c1, c2 = _step6(one_process), _step6(tmp_path / "fsdp")
    assert c1.keys() == c2.keys() and all(c1[k].shape == c2[k].shape for k in c1)
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
    assert m2["world_size"] == 2 and m2["rank_weights_sha256"][0] == m2["rank_weights_sha256"][1]
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
def test_sigterm_to_torchrun_saves_one_checkpoint_and_resumes_exactly(no_dropout_model, eli5_like, tmp_path):
    """SIGTERM to the launcher (what scancel and a pod eviction send): the ranks agree to stop within one step of
    it, write one checkpoint, leave together without a traceback, and --resume ends on the uninterrupted run."""
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
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank0 = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = list(logs.rglob("0/stderr.log"))
        if found and "head warm-up done" in found[0].read_text():  # step 5 of 1000: mid-run
            rank0 = found[0]
            break
        time.sleep(0.02)
    assert rank0 is not None
    launcher.send_signal(signal.SIGTERM)
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
    from mlmtune.torch_engine import TorchEngine

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
